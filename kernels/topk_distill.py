"""Triton kernel of the top-K distillation loss (``fastkd.topk_distill_loss``).

Math (per row; x the student's raw logits [V], ids k_1..k_K distinct, y_k the teacher's raw logits at
those ids, T the temperature, c = loss_scale * row_scale):

    s = x / T, lse_s = logsumexp(s) over all V, q_j = exp(s_j - lse_s)        (the full student softmax)
    t_k = y_k / T
    without teacher_logsumexp:  p_k = exp(t_k - logsumexp_k t)                  (renormalised, r = 0)
    with teacher_logsumexp L (over the full vocabulary of teacher logits / T):
                                p_k = exp(t_k - L),  r = max(0, 1 - sum_k p_k)    (the teacher's tail mass)
    q_tail = 1 - sum_k q_{k_k}                                                   (the student's tail mass)
    D = sum_k p_k (log p_k - log q_{k_k}) + r log(r / q_tail)       (the last term only when r > TAIL_TOL:
                                                 1e-6, 1e-12 in float64; a smaller r is rounding, e.g. K = V)

Gradient (P = sum p_k, Q = sum q_{k_k}, P + r = 1; d log q_{k_k}/ds_j = [j = k_k] - q_j and
d q_tail/ds_j = -q_j ([j in ids] - Q)):

    dD/ds_j = q_j - p_k                 for j = k_k
    dD/ds_j = q_j (1 - r / q_tail)      for j not among the ids

The kernel writes ``c * D`` per row and ``c / T * dD/ds`` in the input dtype. One program per row:
an online logsumexp over the student row, the K gathered entries (P, Q in float64), one pass
writing the tail formula over the row, a barrier, and the K id entries written over it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastkd.kernels.distill_loss import _f32_pair


@triton.jit
def topk_distill_kernel(
    s_ptr,  # student logits [N, V], rows contiguous (row stride V), input dtype
    id_ptr,  # teacher ids [N, K] int64
    tv_ptr,  # teacher logits at the ids [N, K], ACC dtype
    lse_ptr,  # teacher logsumexp [N], ACC dtype (read only when HAS_LSE)
    rs_ptr,  # row_scale [N], ACC dtype: 0 skips the row
    loss_ptr,  # out: per-row loss [N], ACC dtype
    g_ptr,  # out: student gradient [N, V], input dtype (unused when not WRITE_G)
    V,
    K,
    inv_t_hi,
    inv_t_lo,
    loss_scale_hi,
    loss_scale_lo,
    HAS_LSE: tl.constexpr,
    TAIL_TOL: tl.constexpr,
    WRITE_G: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
    loss_scale = tl.cast(loss_scale_hi, ACC) + tl.cast(loss_scale_lo, ACC)
    c = tl.load(rs_ptr + row).to(ACC) * loss_scale
    s_row = s_ptr + row * V
    g_row = g_ptr + row * V
    cols = tl.arange(0, BLOCK)
    kcols = tl.arange(0, BLOCK_K)
    if c == 0.0:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_G:
            for off in range(0, V, BLOCK):
                idx = off + cols
                tl.store(g_row + idx, tl.zeros([BLOCK], dtype=ACC).to(g_ptr.dtype.element_ty), mask=idx < V)
        return

    # ---- student logsumexp (online, per lane)
    m = tl.full([BLOCK], float("-inf"), ACC)
    z = tl.zeros([BLOCK], ACC)
    for off in range(0, V, BLOCK):
        idx = off + cols
        x = tl.load(s_row + idx, mask=idx < V, other=float("-inf")).to(ACC) * inv_t
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        z = z * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    mm = tl.max(m, axis=0)
    mm_safe = tl.where(mm == float("-inf"), 0.0, mm)
    lse_s = mm_safe + tl.log(tl.sum(z * tl.where(m == float("-inf"), 0.0, tl.exp(m - mm_safe)), axis=0))

    # ---- teacher logsumexp over the K entries (renormalised) or the stored full-vocabulary one
    k_base = row * K
    if HAS_LSE:
        lse_t = tl.load(lse_ptr + row).to(ACC)
    else:
        mt = tl.full([BLOCK_K], float("-inf"), ACC)
        zt = tl.zeros([BLOCK_K], ACC)
        for off in range(0, K, BLOCK_K):
            kk = off + kcols
            t = tl.load(tv_ptr + k_base + kk, mask=kk < K, other=float("-inf")).to(ACC) * inv_t
            mt_new = tl.maximum(mt, t)
            mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new).to(ACC)
            zt = zt * tl.exp(mt - mt_safe) + tl.exp(t - mt_safe)
            mt = mt_new
        mmt = tl.max(mt, axis=0)
        mmt_safe = tl.where(mmt == float("-inf"), 0.0, mmt)
        lse_t = mmt_safe + tl.log(tl.sum(zt * tl.where(mt == float("-inf"), 0.0, tl.exp(mt - mmt_safe)), axis=0))

    # ---- the K gathered entries: P, Q (float64: q_tail = 1 - Q), D
    Pv = tl.zeros([BLOCK_K], tl.float64)
    Qv = tl.zeros([BLOCK_K], tl.float64)
    Dv = tl.zeros([BLOCK_K], ACC)
    for off in range(0, K, BLOCK_K):
        kk = off + kcols
        mk = kk < K
        t = tl.load(tv_ptr + k_base + kk, mask=mk, other=float("-inf")).to(ACC) * inv_t
        ids = tl.load(id_ptr + k_base + kk, mask=mk, other=0)
        x = tl.load(s_row + ids, mask=mk, other=float("-inf")).to(ACC) * inv_t
        lp = t - lse_t
        lq = x - lse_s
        p = tl.exp(lp)
        Pv += p.to(tl.float64)
        Qv += tl.exp(lq).to(tl.float64)
        Dv += tl.where(p == 0.0, 0.0, p * (lp - lq))
    P = tl.sum(Pv, axis=0)
    Q = tl.sum(Qv, axis=0)
    D = tl.sum(Dv, axis=0).to(tl.float64)
    qtail = tl.maximum(1.0 - Q, 0.0)
    f = tl.full([], 1.0, tl.float64)
    if HAS_LSE:
        r = tl.maximum(1.0 - P, 0.0)
        r = tl.where(r > TAIL_TOL, r, 0.0)
        r_safe = tl.where(r > 0.0, r, 1.0)
        D += tl.where(r > 0.0, r * (tl.log(r_safe) - tl.log(qtail)), 0.0)
        f = tl.where(r > 0.0, 1.0 - r / qtail, 1.0)
    tl.store(loss_ptr + row, (c.to(tl.float64) * D).to(ACC))

    if WRITE_G:
        cg = c * inv_t
        scale = (cg.to(tl.float64) * f).to(ACC)
        for off in range(0, V, BLOCK):
            idx = off + cols
            x = tl.load(s_row + idx, mask=idx < V, other=float("-inf")).to(ACC) * inv_t
            tl.store(g_row + idx, (tl.exp(x - lse_s) * scale).to(g_ptr.dtype.element_ty), mask=idx < V)
        tl.debug_barrier()  # the id entries below overwrite the tail formula
        for off in range(0, K, BLOCK_K):
            kk = off + kcols
            mk = kk < K
            t = tl.load(tv_ptr + k_base + kk, mask=mk, other=float("-inf")).to(ACC) * inv_t
            ids = tl.load(id_ptr + k_base + kk, mask=mk, other=0)
            x = tl.load(s_row + ids, mask=mk, other=float("-inf")).to(ACC) * inv_t
            g = (tl.exp(x - lse_s) - tl.exp(t - lse_t)) * cg
            tl.store(g_row + ids, g.to(g_ptr.dtype.element_ty), mask=mk)


def topk_distill_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    teacher: torch.Tensor,
    lse: torch.Tensor | None,
    row_scale: torch.Tensor,
    temperature: float,
    loss_scale: float,
    reduce: bool,
    grad_student: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host launcher: student [N, V], ids [N, K] int64, teacher [N, K] -> (loss, grad_student)."""
    N, V = student.shape
    K = ids.shape[1]
    student = student.contiguous()
    ids = ids.contiguous()
    teacher = teacher.contiguous()
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    rows = torch.empty(N, device=student.device, dtype=acc)
    g = torch.empty((N, V) if grad_student else (0,), device=student.device, dtype=student.dtype)
    if N > 0:
        block = min(4096, triton.next_power_of_2(max(V, 16)))
        block_k = min(1024, triton.next_power_of_2(max(K, 16)))
        topk_distill_kernel[(N,)](
            student, ids, teacher, lse if lse is not None else rows, row_scale, rows, g, V, K,
            *_f32_pair(1.0 / temperature), *_f32_pair(loss_scale),
            HAS_LSE=lse is not None, TAIL_TOL=1e-12 if acc == torch.float64 else 1e-6, WRITE_G=grad_student, BLOCK=block, BLOCK_K=block_k,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=8 if block >= 4096 else 4,
        )  # fmt: skip
    loss = rows.sum() if reduce else rows
    return loss, g
