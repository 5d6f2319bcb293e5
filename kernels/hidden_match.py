"""Triton kernels of the fused multi-layer hidden-state matching loss (``fastkd.hidden_match``).

Math (per layer l and token row n; P = S W_l^T + b_l the projected student row, T the teacher row,
H = Ht, w = row_scale[l, n] the reduction weight, nP = max(|P|, eps), nT = max(|T|, eps),
c = P.T / (nP nT)):

    MSE     loss = w/H sum (P - T)^2          dP = w 2/H (P - T)            dT = -dP
    COSINE  loss = w (1 - c)                  dP = w (aP P + bP T)          dT = w (aT T + bT P)
            aP = [|P| > eps] c / nP^2,  bP = -1 / (nP nT)      (aT, bT: P and T swapped)
    NMSE    loss = w/H sum (P/nP - T/nT)^2    as COSINE with k = 2/H: aP = k ([|P| > eps] ? c : 1) / nP^2,
                                                                      bP = -k / (nP nT)

and the parameter gradients dS_l = dP_l W_l, dW_l = dP_l^T S_l (summed over l for a shared W),
db_l = colsum(dP_l). An all-zero row (norm below eps) gives finite values, never NaN.

Kernels, all layers in each launch (grid axis 2 = layer):

* ``hm_project_kernel``  grid (row tiles, column tiles, L): P tile = S tile @ W_l^T (+ b) with the
  loss in the epilogue. MSE is separable over columns, so the epilogue writes dP (and dT) and one
  partial sum of squares per (row, column tile) directly. COSINE / NMSE need whole-row norms: the
  epilogue stores P and the partial sums |P|^2, |T|^2, P.T per (row, column tile).
* ``hm_rows_kernel``     grid (row tiles, L), COSINE / NMSE only: reduces the partial sums and
  turns P into dP in place (and writes dT, and NMSE's loss).
* ``hm_bmm_kernel``      a batched matmul with arbitrary strides (batch stride 0 = shared): dS = dP W
  and dW = dP^T S.

The dP buffer ``[L, N, Ht]`` (input dtype) lives only during the call; nothing is saved for
backward except the gradients, which backward scales in place (``kernels/scale_grad.py``).
Offsets are int64 (program ids cast before pointer arithmetic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from fastkd.kernels.distill_loss import _f32_pair

MSE = 0
COSINE = 1
NMSE = 2


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b; UPCAST computes in float32 (the interpreter mis-multiplies bfloat16 tiles)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC, out_dtype=acc.dtype)
    # out_dtype must match the accumulator (compiled Triton asserts it: float64 tiles accumulate in float64)
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)


@triton.jit
def hm_project_kernel(
    s_ptr,  # student states [L, N, Hs] contiguous, input dtype
    w_ptr,  # weight [L, Ht, Hs] (stride_wl = Ht*Hs) or shared [Ht, Hs] (stride_wl = 0); unused if not HAS_W
    b_ptr,  # bias [L, Ht] (stride_bl = Ht) or shared [Ht] (stride_bl = 0); unused if not HAS_B
    t_ptr,  # teacher states [L, N, Ht] contiguous, input dtype
    rs_ptr,  # row_scale [L, N], ACC dtype: the reduction weight of each row (0 = excluded)
    p_ptr,  # out: [L, N, Ht] input dtype: dP (MSE, when WRITE_DP) or P (COSINE / NMSE)
    dt_ptr,  # out: teacher gradient [L, N, Ht] input dtype (MSE with WRITE_DT only)
    part_ptr,  # out: partial row sums [NPART, L, N, n_col_tiles] fp32/ACC: MSE (P-T)^2; else |P|^2, |T|^2, P.T
    N,
    Hs,
    Ht,
    n_col_tiles,
    stride_wl,
    stride_bl,
    LOSS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    WRITE_P: tl.constexpr,  # store the P / dP tile at all
    WRITE_DT: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    cmask = cols < Ht
    tile_mask = rmask[:, None] & cmask[None, :]
    s_base = s_ptr + layer * N * Hs
    if HAS_W:
        w_base = w_ptr + layer * stride_wl
        acc = tl.zeros([BM, BN], dtype=ACC)
        ks = tl.arange(0, BK)
        for k0 in range(0, Hs, BK):
            kk = k0 + ks
            kmask = kk < Hs
            a = tl.load(s_base + rows[:, None] * Hs + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            # W^T tile [BK, BN]: element (k, j) = W[j, k]
            bt = tl.load(w_base + cols[None, :] * Hs + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = _dot(a, bt, acc, UPCAST, PREC)
    else:
        acc = tl.load(s_base + rows[:, None] * Hs + cols[None, :], mask=tile_mask, other=0.0).to(ACC)
    if HAS_B:
        acc += tl.load(b_ptr + layer * stride_bl + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    off = layer * N * Ht + rows[:, None] * Ht + cols[None, :]
    t = tl.load(t_ptr + off, mask=tile_mask, other=0.0).to(ACC)
    w = tl.load(rs_ptr + layer * N + rows, mask=rmask, other=0.0).to(ACC)
    keep = w != 0.0
    part_off = layer * N * n_col_tiles + rows * n_col_tiles + pid_n
    plane = tl.num_programs(2).to(tl.int64) * N * n_col_tiles  # one [L, N, n_col_tiles] plane
    if LOSS == 0:
        d = tl.where(tile_mask, acc - t, 0.0)
        tl.store(part_ptr + part_off, tl.sum(d * d, axis=1).to(part_ptr.dtype.element_ty), mask=rmask)
        g = tl.where(keep[:, None], d * (w * 2.0 / Ht)[:, None], 0.0)
        if WRITE_P:
            tl.store(p_ptr + off, g.to(p_ptr.dtype.element_ty), mask=tile_mask)
        if WRITE_DT:
            tl.store(dt_ptr + off, (-g).to(dt_ptr.dtype.element_ty), mask=tile_mask)
    else:
        x = tl.where(tile_mask, acc, 0.0)
        tl.store(p_ptr + off, x.to(p_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(part_ptr + part_off, tl.sum(x * x, axis=1).to(part_ptr.dtype.element_ty), mask=rmask)
        tl.store(part_ptr + plane + part_off, tl.sum(t * t, axis=1).to(part_ptr.dtype.element_ty), mask=rmask)
        tl.store(part_ptr + 2 * plane + part_off, tl.sum(x * t, axis=1).to(part_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def hm_rows_kernel(
    p_ptr,  # projected rows P [L, N, Ht], input dtype (from hm_project_kernel)
    t_ptr,  # teacher states [L, N, Ht] contiguous
    rs_ptr,  # row_scale [L, N] ACC
    part_ptr,  # partial sums [3, L, N, n_col_tiles]: |P|^2, |T|^2, P.T
    dp_ptr,  # out: dP [L, N, Ht] input dtype (may be p_ptr: in place); unused if not WRITE_DP
    dt_ptr,  # out: teacher gradient [L, N, Ht]; unused if not WRITE_DT
    loss_ptr,  # out: per-row loss [L, N] ACC (w * loss)
    N,
    Ht,
    n_col_tiles,
    eps_hi,  # eps as an fp32 pair hi + lo (Triton passes Python floats as fp32: 1e-8 alone would be
    eps_lo,  #   off by 6e-9 relative in the float64 path, see distill_loss._f32_pair)
    LOSS: tl.constexpr,
    WRITE_DP: tl.constexpr,
    WRITE_DT: tl.constexpr,
    ACC: tl.constexpr,
    BR: tl.constexpr,  # rows per program
    BC: tl.constexpr,  # columns per step
    BP: tl.constexpr,  # >= n_col_tiles
):
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    rows = pid * BR + tl.arange(0, BR)
    rmask = rows < N
    plane = tl.num_programs(1).to(tl.int64) * N * n_col_tiles
    pc = tl.arange(0, BP)
    poff = layer * N * n_col_tiles + rows[:, None] * n_col_tiles + pc[None, :]
    pmask = rmask[:, None] & (pc[None, :] < n_col_tiles)
    pp = tl.sum(tl.load(part_ptr + poff, mask=pmask, other=0.0).to(ACC), axis=1)
    tt = tl.sum(tl.load(part_ptr + plane + poff, mask=pmask, other=0.0).to(ACC), axis=1)
    pt = tl.sum(tl.load(part_ptr + 2 * plane + poff, mask=pmask, other=0.0).to(ACC), axis=1)
    w = tl.load(rs_ptr + layer * N + rows, mask=rmask, other=0.0).to(ACC)
    keep = w != 0.0
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    rp = tl.sqrt(pp)
    rt = tl.sqrt(tt)
    big_p = rp > eps
    big_t = rt > eps
    n_p = tl.where(big_p, rp, eps)
    n_t = tl.where(big_t, rt, eps)
    inv_p = 1.0 / n_p
    inv_t = 1.0 / n_t
    inv = inv_p * inv_t
    c = pt * inv
    if LOSS == 1:
        aP = w * tl.where(big_p, c * inv_p * inv_p, 0.0)
        aT = w * tl.where(big_t, c * inv_t * inv_t, 0.0)
        bP = -w * inv
        loss = w * (1.0 - c)
    else:
        k = w * 2.0 / Ht
        aP = k * tl.where(big_p, c, 1.0) * inv_p * inv_p
        aT = k * tl.where(big_t, c, 1.0) * inv_t * inv_t
        bP = -k * inv
        loss = tl.zeros([BR], dtype=ACC)
    ls = tl.zeros([BR], dtype=ACC)
    cs = tl.arange(0, BC)
    base = layer * N * Ht + rows[:, None] * Ht
    if WRITE_DP or WRITE_DT or LOSS == 2:
        for c0 in range(0, Ht, BC):
            cols = c0 + cs
            m = rmask[:, None] & (cols[None, :] < Ht)
            x = tl.load(p_ptr + base + cols[None, :], mask=m, other=0.0).to(ACC)
            y = tl.load(t_ptr + base + cols[None, :], mask=m, other=0.0).to(ACC)
            if LOSS == 2:
                d = x * inv_p[:, None] - y * inv_t[:, None]
                ls += tl.sum(d * d, axis=1)
            if WRITE_DP:
                g = tl.where(keep[:, None], aP[:, None] * x + bP[:, None] * y, 0.0)
                tl.store(dp_ptr + base + cols[None, :], g.to(dp_ptr.dtype.element_ty), mask=m)
            if WRITE_DT:
                g = tl.where(keep[:, None], aT[:, None] * y + bP[:, None] * x, 0.0)
                tl.store(dt_ptr + base + cols[None, :], g.to(dt_ptr.dtype.element_ty), mask=m)
    if LOSS == 2:
        loss = w * ls / Ht
    tl.store(loss_ptr + layer * N + rows, tl.where(keep, loss, 0.0), mask=rmask)


@triton.jit
def _tile_offsets(r, c, s_r, s_c):
    """Element offsets r * s_r + c * s_c of a [len(r), len(c)] tile, in int64.

    r, c are int32 index vectors and the strides int32 arguments when they fit, so the products
    would wrap at 2**31 (the K index times a row stride of N*Ht or N*Hs elements in the weight
    gradient); both are widened before multiplying."""
    return r.to(tl.int64)[:, None] * s_r + c.to(tl.int64)[None, :] * s_c


@triton.jit
def hm_bmm_kernel(
    a_ptr,  # A [Z, M, K] with strides (sa_z, sa_m, sa_k); sa_z = 0 broadcasts
    b_ptr,  # B [Z, K, Nc] with strides (sb_z, sb_k, sb_n)
    c_ptr,  # out: C [Z, M, Nc] contiguous, C = A @ B (in c's dtype)
    M,
    Nc,
    K,
    sa_z,
    sa_m,
    sa_k,
    sb_z,
    sb_k,
    sb_n,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    z = tl.program_id(2).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < Nc
    ks = tl.arange(0, BK)
    a_base = a_ptr + z * sa_z
    b_base = b_ptr + z * sb_z
    acc = tl.zeros([BM, BN], dtype=ACC)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        kmask = kk < K
        a = tl.load(a_base + _tile_offsets(rows, kk, sa_m, sa_k), mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + _tile_offsets(kk, cols, sb_k, sb_n), mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, PREC)
    off = z * M * Nc + rows[:, None] * Nc + cols[None, :]
    tl.store(c_ptr + off, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_config(dtype: torch.dtype) -> tuple[bool, str, object]:
    """(UPCAST, input precision, accumulator type) for tl.dot on this dtype."""
    if dtype == torch.float64:
        return False, "ieee", tl.float64
    if dtype == torch.float32:
        # honour torch's float32 matmul setting: "highest" (the default) = exact fp32, else TF32
        return False, ("ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"), tl.float32
    return (dtype == torch.bfloat16 and _interpret()), "tf32", tl.float32


def _blk(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, a_strides, b_strides, Z: int, M: int, Nc: int, K: int):
    upcast, prec, acc = _dot_config(a.dtype)
    BM, BN, BK = _blk(M, 64), _blk(Nc, 64), _blk(K, 32)
    if M == 0 or Nc == 0 or Z == 0:
        return out
    hm_bmm_kernel[(triton.cdiv(M, BM), triton.cdiv(Nc, BN), Z)](
        a, b, out, M, Nc, K, *a_strides, *b_strides,
        UPCAST=upcast, PREC=prec, ACC=acc, BM=BM, BN=BN, BK=BK, num_warps=4,
    )  # fmt: skip
    return out


def hidden_match_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    row_scale: torch.Tensor,
    loss: int,
    eps: float,
    reduce: bool,
    grad_student: bool,
    grad_weight: bool,
    grad_bias: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host launcher: student [L, N, Hs], teacher [L, N, Ht] (contiguous, same dtype) ->
    (loss, grad_student, grad_weight, grad_bias, grad_teacher); gradients not asked for are empty."""
    L, N, Hs = student.shape
    Ht = teacher.shape[2]
    dev, dtype = student.device, student.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    has_w, has_b = weight is not None, bias is not None
    grad_weight = grad_weight and has_w
    grad_bias = grad_bias and has_b
    need_dp = grad_student or grad_weight or grad_bias
    gS = torch.empty_like(student) if grad_student else student.new_empty((0,))
    gT = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    # outputs must not alias each other (torch.library): a fresh empty tensor for each one not computed
    gW, gb = student.new_empty((0,)), student.new_empty((0,))
    if L == 0 or N == 0:
        out = torch.zeros((), device=dev, dtype=acc_dtype) if reduce else torch.zeros(L, N, device=dev, dtype=acc_dtype)
        if grad_weight:
            gW = torch.zeros_like(weight)
        if grad_bias:
            gb = torch.zeros_like(bias)
        return out, gS, gW, gb, gT

    upcast, prec, acc = _dot_config(dtype)
    BM, BN, BK = _blk(N, 64), _blk(Ht, 64), _blk(Hs, 32)
    n_col_tiles = triton.cdiv(Ht, BN)
    # dP goes straight into dS when there is no projection (dS = dP); otherwise into a buffer.
    dp_into_gs = grad_student and not has_w
    norm_loss = loss != MSE
    need_buf = norm_loss or (need_dp and not dp_into_gs)
    buf = torch.empty((L, N, Ht), device=dev, dtype=dtype) if need_buf else student.new_empty((0,))
    dp = gS if dp_into_gs else buf
    npart = 1 if loss == MSE else 3
    part = torch.empty((npart, L, N, n_col_tiles), device=dev, dtype=acc_dtype)
    w_arg = weight if has_w else student
    b_arg = bias if has_b else student
    stride_wl = (Ht * Hs if weight.dim() == 3 else 0) if has_w else 0
    stride_bl = (Ht if bias.dim() == 2 else 0) if has_b else 0
    hm_project_kernel[(triton.cdiv(N, BM), n_col_tiles, L)](
        student, w_arg, b_arg, teacher, row_scale, buf if norm_loss else dp, gT, part,
        N, Hs, Ht, n_col_tiles, stride_wl, stride_bl,
        LOSS=loss, HAS_W=has_w, HAS_B=has_b, WRITE_P=norm_loss or need_dp, WRITE_DT=grad_teacher and not norm_loss,
        UPCAST=upcast, PREC=prec, ACC=acc, BM=BM, BN=BN, BK=BK, num_warps=4,
    )  # fmt: skip
    if norm_loss:
        rows = torch.empty((L, N), device=dev, dtype=acc_dtype)
        BR = 16
        hm_rows_kernel[(triton.cdiv(N, BR), L)](
            buf, teacher, row_scale, part, dp, gT, rows, N, Ht, n_col_tiles, *_f32_pair(eps),
            LOSS=loss, WRITE_DP=need_dp, WRITE_DT=grad_teacher, ACC=acc, BR=BR, BC=_blk(Ht, 128),
            BP=triton.next_power_of_2(max(n_col_tiles, 1)), num_warps=4,
        )  # fmt: skip
    else:
        s = part[0].sum(-1)
        rows = torch.where(row_scale != 0, s * row_scale / Ht, torch.zeros((), device=dev, dtype=acc_dtype))
    out = rows.sum() if reduce else rows

    if grad_student and has_w:
        # dS_l = dP_l [N, Ht] @ W_l [Ht, Hs]
        _bmm(dp, weight, gS, (N * Ht, Ht, 1), (stride_wl, Hs, 1), L, N, Hs, Ht)
    if grad_weight:
        gw_acc = torch.empty(weight.shape, device=dev, dtype=acc_dtype)
        if weight.dim() == 3:  # dW_l = dP_l^T [Ht, N] @ S_l [N, Hs]
            _bmm(dp, student, gw_acc, (N * Ht, 1, Ht), (N * Hs, Hs, 1), L, Ht, Hs, N)
        else:  # shared: one reduction over all L*N rows
            _bmm(dp, student, gw_acc, (0, 1, Ht), (0, Hs, 1), 1, Ht, Hs, L * N)
        gW = gw_acc.to(weight.dtype)
    if grad_bias:
        gb = (dp.sum(dim=1, dtype=acc_dtype) if bias.dim() == 2 else dp.sum(dim=(0, 1), dtype=acc_dtype)).to(bias.dtype)
    return out, gS, gW, gb, gT
