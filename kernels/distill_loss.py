"""Triton kernel of the fused temperature-softmax distillation loss (``fastkd.distill_loss``).

Math (per row; s = student / T, t = teacher / T, q = softmax(s), p = softmax(t), c = loss_scale * row_scale):

    KL        D = sum p (log p - log q)            dD/ds = q - p               dD/dt = p (log p - log q - D)
    REVERSE   D = sum q (log q - log p)            dD/ds = q (log q - log p - D)   dD/dt = p - q
    JSD(b)    m = b p + (1 - b) q,  D = b KL(p||m) + (1 - b) KL(q||m)
              dD/ds = (1 - b) q (log q - log m - KL(q||m))     dD/dt = b p (log p - log m - KL(p||m))

The kernel writes ``c * D`` per row and the gradients ``c / T * dD/d(s, t)`` in the input dtype, so
backward is one in-place scale by the upstream gradient (``kernels/scale_grad.py``, which does nothing
when that gradient is the scalar 1: the check happens on the device).

One program per row. Pass 1 is an online softmax over both rows with per-lane running maxima,
which also accumulates the KL / reverse-KL numerators; pass 2 recomputes p and q and writes the
gradients (JSD needs a pass 2 for KL(.||m) and a pass 3 for its gradients). Zero probabilities
contribute nothing, so -inf logits (masked vocabulary entries) are legitimate; NaN propagates.
Row offsets are int64, so tensors of more than 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

KL = 0
REVERSE_KL = 1
JSD = 2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _online_update(m, z, a, x, y, HAS_A: tl.constexpr):
    """One step of a per-lane online log-sum-exp of x, with a = sum exp(x - m) * (x - y) when HAS_A."""
    m_new = tl.maximum(m, x)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(m.dtype)
    alpha = tl.exp(m - m_safe)  # m == -inf gives 0
    e = tl.exp(x - m_safe)  # x == -inf gives 0
    z = z * alpha + e
    if HAS_A:
        a = a * alpha + tl.where(e == 0.0, 0.0, e * (x - y))
    return m_new, z, a


@triton.jit
def _finish(m, z, a):
    """Combine the lanes: returns (lse, sum exp(x - lse) * (x - y))."""
    mm = tl.max(m, axis=0)
    mm_safe = tl.where(mm == float("-inf"), 0.0, mm)
    f = tl.where(m == float("-inf"), 0.0, tl.exp(m - mm_safe))
    zz = tl.sum(z * f, axis=0)
    aa = tl.sum(a * f, axis=0)
    return mm_safe + tl.log(zz), aa / zz


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

    # ---- pass 1: online log-sum-exp of s and t (and the KL / reverse-KL numerators)
    m_s = tl.full([BLOCK], float("-inf"), ACC)
    m_t = tl.full([BLOCK], float("-inf"), ACC)
    z_s = tl.zeros([BLOCK], ACC)
    z_t = tl.zeros([BLOCK], ACC)
    a_s = tl.zeros([BLOCK], ACC)
    a_t = tl.zeros([BLOCK], ACC)
    for off in range(0, V, BLOCK):
        idx = off + cols
        msk = idx < V
        s = tl.load(s_row + idx, mask=msk, other=float("-inf")).to(ACC) * inv_t
        t = tl.load(t_row + idx, mask=msk, other=float("-inf")).to(ACC) * inv_t
        m_s, z_s, a_s = _online_update(m_s, z_s, a_s, s, t, DIV == REVERSE_KL)
        m_t, z_t, a_t = _online_update(m_t, z_t, a_t, t, s, DIV == KL)
    lse_s, ra_s = _finish(m_s, z_s, a_s)
    lse_t, ra_t = _finish(m_t, z_t, a_t)

    cg = c * inv_t
    if DIV != JSD:
        if DIV == KL:
            D = ra_t + lse_s - lse_t
        else:
            D = ra_s + lse_t - lse_s
        tl.store(loss_ptr + row, c * D)
        if WRITE_GS or WRITE_GT:
            for off in range(0, V, BLOCK):
                idx = off + cols
                msk = idx < V
                s = tl.load(s_row + idx, mask=msk, other=float("-inf")).to(ACC) * inv_t
                t = tl.load(t_row + idx, mask=msk, other=float("-inf")).to(ACC) * inv_t
                q = tl.exp(s - lse_s)
                p = tl.exp(t - lse_t)
                if DIV == KL:
                    g_s = (q - p) * cg
                    g_t = tl.where(p == 0.0, 0.0, p * ((t - lse_t) - (s - lse_s) - D) * cg)
                else:
                    g_s = tl.where(q == 0.0, 0.0, q * ((s - lse_s) - (t - lse_t) - D) * cg)
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
            s = tl.load(s_row + idx, mask=msk, other=float("-inf")).to(ACC) * inv_t
            t = tl.load(t_row + idx, mask=msk, other=float("-inf")).to(ACC) * inv_t
            q = tl.exp(s - lse_s)
            p = tl.exp(t - lse_t)
            lm = tl.log(b1 * p + b0 * q)
            kp += tl.where(p == 0.0, 0.0, p * ((t - lse_t) - lm))
            kq += tl.where(q == 0.0, 0.0, q * ((s - lse_s) - lm))
        klp = tl.sum(kp, axis=0)
        klq = tl.sum(kq, axis=0)
        tl.store(loss_ptr + row, c * (b1 * klp + b0 * klq))
        if WRITE_GS or WRITE_GT:
            for off in range(0, V, BLOCK):
                idx = off + cols
                msk = idx < V
                s = tl.load(s_row + idx, mask=msk, other=float("-inf")).to(ACC) * inv_t
                t = tl.load(t_row + idx, mask=msk, other=float("-inf")).to(ACC) * inv_t
                q = tl.exp(s - lse_s)
                p = tl.exp(t - lse_t)
                lm = tl.log(b1 * p + b0 * q)
                if WRITE_GS:
                    g_s = tl.where(q == 0.0, 0.0, b0 * q * ((s - lse_s) - lm - klq) * cg)
                    tl.store(gs_row + idx, g_s.to(gs_ptr.dtype.element_ty), mask=msk)
                if WRITE_GT:
                    g_t = tl.where(p == 0.0, 0.0, b1 * p * ((t - lse_t) - lm - klp) * cg)
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
