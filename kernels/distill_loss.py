"""Triton kernel of the fused temperature-softmax distillation loss (``fastkd.distill_loss``).

Math (per row; q = softmax(x_s / T), p = softmax(x_t / T), c = loss_scale * row_scale), in shifted form:
u_s = (x_s - max x_s) / T, u_t = (x_t - max x_t) / T, Z = sum exp(u), log q = u_s - log Z_s,
log p = u_t - log Z_t:

    KL        D = sum p (u_t - u_s) + log Z_s - log Z_t     dD/ds = q - p      dD/dt = p (log p - log q - D)
    REVERSE   D = sum q (u_s - u_t) + log Z_t - log Z_s     dD/ds = q (log q - log p - D)   dD/dt = p - q
    JSD(b)    m = b p + (1 - b) q,  D = b KL(p||m) + (1 - b) KL(q||m)
              dD/ds = (1 - b) q (log q - log m - KL(q||m))     dD/dt = b p (log p - log m - KL(p||m))

Every term is a difference of shifted logits (x - max is exact in floating point), so a large common
offset of the logits (1e6, 1e30) costs no precision; the unshifted `sum p (t - s) + lse_s - lse_t`
would cancel two numbers of the offset's size.

The kernel writes ``c * D`` per row and the gradients ``c / T * dD/d(s, t)`` in the input dtype, so
backward is one in-place scale by the upstream gradient (``kernels/scale_grad.py``, which does nothing
when that gradient is the scalar 1: the check happens on the device).

One program per row. Pass 1 is an online softmax over both rows with per-lane running maxima of the
raw logits, which also accumulates the KL / reverse-KL numerator sum e_w (u_w - u_o) relative to the
current maxima (rescaled and shifted when either maximum grows); pass 2 recomputes p and q from the
row maxima and writes the gradients (JSD needs a pass 2 for KL(.||m) and a pass 3 for its
gradients). Zero probabilities contribute nothing, so -inf logits (masked vocabulary entries) are
legitimate. NaN contract: NaN or +inf in a kept row, or a row that is all -inf (undefined softmax),
gives NaN loss and NaN gradients for that row. Row offsets are int64, so tensors of more than 2**31
elements are addressed correctly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

KL = tl.constexpr(0)  # constexpr: the compiled kernels read them as globals
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _online_update(m, z, x, inv_t):
    """One step of a per-lane online sum of exp((x - m) / T) with m the running raw maximum.

    Returns (m_new, z_new, e, f, d): e = exp((x - m_new) / T), f = exp((m - m_new) / T) the factor of
    the old sum, d = (m_new - m) / T the shift of the old terms (0 when m did not change)."""
    m_new = tl.maximum(m, x)
    grew = m_new != m
    f = tl.where(grew, tl.where(m == float("-inf"), 0.0, tl.exp((m - m_new) * inv_t)), 1.0).to(z.dtype)
    d = tl.where(grew, (m_new - m) * inv_t, 0.0).to(z.dtype)
    e = tl.where(x == float("-inf"), 0.0, tl.exp((x - m_new) * inv_t)).to(z.dtype)
    z = z * f + e
    return m_new, z, e, f, d


@triton.jit
def _shifted(x, m, inv_t):
    """(x - m) / T, and -inf for x = -inf even where the lane maximum m is still -inf (not -inf - -inf = NaN)."""
    return tl.where(x == float("-inf"), float("-inf"), (x - m) * inv_t)


@triton.jit
def _a_update(a, z_w_old, f_w, d_w, d_o, e_w, u_w, u_o):
    """a = sum e_w (u_w - u_o) relative to the current maxima, after both maxima moved by d_w, d_o.

    a is +inf where e_w > 0 meets u_o = -inf; old terms whose factor f_w underflowed to 0 have zero
    probability and are dropped (not 0 * inf = NaN)."""
    old = tl.where((z_w_old == 0.0) | (f_w == 0.0), 0.0, f_w * (a + z_w_old * (d_o - d_w)))
    return old + tl.where(e_w == 0.0, 0.0, e_w * (u_w - u_o))


@triton.jit
def distill_loss_kernel(
    s_ptr,  # student logits [N, V], row stride = stride_s (elements), input dtype
    t_ptr,  # teacher logits [N, V], row stride = stride_t
    rs_ptr,  # row_scale [N] fp32: 0 skips the row; reduction weights (1/kept rows for batchmean)
    loss_ptr,  # out: per-row loss [N] fp32 (= loss_scale * row_scale * D)
    gs_ptr,  # out: student gradient [N, V], input dtype (unused when not WRITE_GS)
    gt_ptr,  # out: teacher gradient [N, V], input dtype (unused when not WRITE_GT)
    V,  # vocabulary size
    stride_s,
    stride_t,
    inv_t_hi,  # 1 / temperature, as an fp32 pair hi + lo (Triton passes Python floats as fp32; the
    inv_t_lo,  #   pair keeps ~48 bits for the float64 path, see _f32_pair)
    loss_scale_hi,  # T**2 when scale_by_t2, else 1 (fp32 pair)
    loss_scale_lo,
    beta_hi,  # JSD weight (fp32 pair)
    beta_lo,
    DIV: tl.constexpr,  # 0 KL(p||q), 1 KL(q||p), 2 JSD(beta)
    WRITE_GS: tl.constexpr,
    WRITE_GT: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,  # compute dtype: tl.float32, or tl.float64 for float64 logits
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
    loss_scale = tl.cast(loss_scale_hi, ACC) + tl.cast(loss_scale_lo, ACC)
    beta = tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC)
    c = tl.load(rs_ptr + row).to(ACC) * loss_scale
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    gs_row = gs_ptr + row * V
    gt_row = gt_ptr + row * V
    cols = tl.arange(0, BLOCK)
    if c == 0.0:
        # ignored row: loss 0, zero gradients, nothing read
        tl.store(loss_ptr + row, 0.0)
        for off in range(0, V, BLOCK):
            idx = off + cols
            msk = idx < V
            if WRITE_GS:
                tl.store(gs_row + idx, tl.zeros([BLOCK], dtype=ACC).to(gs_ptr.dtype.element_ty), mask=msk)
            if WRITE_GT:
                tl.store(gt_row + idx, tl.zeros([BLOCK], dtype=ACC).to(gt_ptr.dtype.element_ty), mask=msk)
        return

    # ---- pass 1: per-lane online sums of exp((x - m) / T), m the running raw maxima, and the
    # KL / reverse-KL numerator a = sum e_w (u_w - u_o) relative to the current maxima
    m_s = tl.full([BLOCK], float("-inf"), ACC)
    m_t = tl.full([BLOCK], float("-inf"), ACC)
    z_s = tl.zeros([BLOCK], ACC)
    z_t = tl.zeros([BLOCK], ACC)
    a = tl.zeros([BLOCK], ACC)
    for off in range(0, V, BLOCK):
        idx = off + cols
        msk = idx < V
        xs = tl.load(s_row + idx, mask=msk, other=float("-inf")).to(ACC)
        xt = tl.load(t_row + idx, mask=msk, other=float("-inf")).to(ACC)
        zs_old = z_s
        zt_old = z_t
        m_s, z_s, e_s, f_s, d_s = _online_update(m_s, z_s, xs, inv_t)
        m_t, z_t, e_t, f_t, d_t = _online_update(m_t, z_t, xt, inv_t)
        if DIV == KL:
            a = _a_update(a, zt_old, f_t, d_t, d_s, e_t, (xt - m_t) * inv_t, _shifted(xs, m_s, inv_t))
        if DIV == REVERSE_KL:
            a = _a_update(a, zs_old, f_s, d_s, d_t, e_s, (xs - m_s) * inv_t, _shifted(xt, m_t, inv_t))
    # combine the lanes at the row maxima M (a row of all -inf has M = -inf: NaN below, as the contract says)
    M_s = tl.max(m_s, axis=0)
    M_t = tl.max(m_t, axis=0)
    g_s = tl.where(m_s == float("-inf"), 0.0, tl.exp((m_s - M_s) * inv_t))
    g_t = tl.where(m_t == float("-inf"), 0.0, tl.exp((m_t - M_t) * inv_t))
    Z_s = tl.sum(z_s * g_s, axis=0)
    Z_t = tl.sum(z_t * g_t, axis=0)
    lz_s = tl.log(Z_s)
    lz_t = tl.log(Z_t)
    if DIV == KL:
        A = tl.sum(tl.where((z_t == 0.0) | (g_t == 0.0), 0.0, g_t * (a + z_t * ((M_s - m_s) - (M_t - m_t)) * inv_t)), axis=0)
    else:
        A = tl.sum(tl.where((z_s == 0.0) | (g_s == 0.0), 0.0, g_s * (a + z_s * ((M_t - m_t) - (M_s - m_s)) * inv_t)), axis=0)

    cg = c * inv_t
    if DIV != JSD:
        if DIV == KL:
            D = A / Z_t + lz_s - lz_t
        else:
            D = A / Z_s + lz_t - lz_s
        tl.store(loss_ptr + row, c * D)
        if WRITE_GS or WRITE_GT:
            for off in range(0, V, BLOCK):
                idx = off + cols
                msk = idx < V
                s = (tl.load(s_row + idx, mask=msk, other=float("-inf")).to(ACC) - M_s) * inv_t
                t = (tl.load(t_row + idx, mask=msk, other=float("-inf")).to(ACC) - M_t) * inv_t
                q = tl.exp(s - lz_s)
                p = tl.exp(t - lz_t)
                if DIV == KL:
                    g_s = (q - p) * cg
                    g_t = tl.where(p == 0.0, 0.0, p * ((t - lz_t) - (s - lz_s) - D) * cg)
                else:
                    g_s = tl.where(q == 0.0, 0.0, q * ((s - lz_s) - (t - lz_t) - D) * cg)
                    g_t = (p - q) * cg
                if WRITE_GS:
                    tl.store(gs_row + idx, g_s.to(gs_ptr.dtype.element_ty), mask=msk)
                if WRITE_GT:
                    tl.store(gt_row + idx, g_t.to(gt_ptr.dtype.element_ty), mask=msk)
    else:
        b1 = beta
        b0 = 1.0 - beta
        kp = tl.zeros([BLOCK], ACC)
        kq = tl.zeros([BLOCK], ACC)
        for off in range(0, V, BLOCK):
            idx = off + cols
            msk = idx < V
            s = (tl.load(s_row + idx, mask=msk, other=float("-inf")).to(ACC) - M_s) * inv_t
            t = (tl.load(t_row + idx, mask=msk, other=float("-inf")).to(ACC) - M_t) * inv_t
            q = tl.exp(s - lz_s)
            p = tl.exp(t - lz_t)
            lm = tl.log(b1 * p + b0 * q)
            kp += tl.where(p == 0.0, 0.0, p * ((t - lz_t) - lm))
            kq += tl.where(q == 0.0, 0.0, q * ((s - lz_s) - lm))
        klp = tl.sum(kp, axis=0)
        klq = tl.sum(kq, axis=0)
        tl.store(loss_ptr + row, c * (b1 * klp + b0 * klq))
        if WRITE_GS or WRITE_GT:
            for off in range(0, V, BLOCK):
                idx = off + cols
                msk = idx < V
                s = (tl.load(s_row + idx, mask=msk, other=float("-inf")).to(ACC) - M_s) * inv_t
                t = (tl.load(t_row + idx, mask=msk, other=float("-inf")).to(ACC) - M_t) * inv_t
                q = tl.exp(s - lz_s)
                p = tl.exp(t - lz_t)
                lm = tl.log(b1 * p + b0 * q)
                if WRITE_GS:
                    g_s = tl.where(q == 0.0, 0.0, b0 * q * ((s - lz_s) - lm - klq) * cg)
                    tl.store(gs_row + idx, g_s.to(gs_ptr.dtype.element_ty), mask=msk)
                if WRITE_GT:
                    g_t = tl.where(p == 0.0, 0.0, b1 * p * ((t - lz_t) - lm - klp) * cg)
                    tl.store(gt_row + idx, g_t.to(gt_ptr.dtype.element_ty), mask=msk)


def _f32_pair(x: float) -> tuple[float, float]:
    """x as hi + lo, both float32-representable: hi = fp32(x), lo = fp32(x - hi)."""
    hi = float(np.float32(x))
    lo = float(np.float32(x - hi)) if math.isfinite(hi) else 0.0
    return hi, lo


def _block_for(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps): 16-byte loads per thread, at most 4096 elements per step."""
    block = min(4096 if dtype == torch.float32 else 8192, triton.next_power_of_2(max(V, 16)))
    warps = 8 if block >= 4096 else (4 if block >= 1024 else 2)
    return block, warps


def distill_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_scale: torch.Tensor,
    temperature: float,
    divergence: int,
    beta: float,
    loss_scale: float,
    reduce: bool,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host launcher: [N, V] logits (rows contiguous) -> (loss, grad_student, grad_teacher)."""
    N, V = student.shape
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    rows = torch.empty(N, device=student.device, dtype=acc)
    gs = torch.empty((N, V) if grad_student else (0,), device=student.device, dtype=student.dtype)
    gt = torch.empty((N, V) if grad_teacher else (0,), device=teacher.device, dtype=teacher.dtype)
    if N > 0:
        block, warps = _block_for(V, student.dtype)
        distill_loss_kernel[(N,)](
            student, teacher, row_scale, rows, gs, gt, V, student.stride(0), teacher.stride(0),
            *_f32_pair(1.0 / temperature), *_f32_pair(loss_scale), *_f32_pair(beta),
            DIV=divergence, WRITE_GS=grad_student, WRITE_GT=grad_teacher, BLOCK=block, ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=warps,
        )  # fmt: skip
    loss = rows.sum() if reduce else rows
    return loss, gs, gt
