"""Triton backend of ``fastkd.fused_linear_distill_loss``: the chunk loop of
``csrc/fused_linear_distill.cpp`` on the host, with the GEMMs through torch and, per chunk, the Triton
softmax-divergence kernel of ``kernels/distill_loss.py`` (or the top-K kernel of
``kernels/topk_distill.py``).

Per chunk of C rows: ``S = h_s W_s^T + b_s`` and the teacher's ``T`` ([C, V] each), the kernel writes
the per-row loss and ``dL/dS`` (``dL/dT``), then ``dL/dh = dL/dS W``, ``dL/dW += dL/dS^T h``,
``dL/db += sum_rows dL/dS``. Peak extra memory is O(C x V) plus the gradient buffers of the inputs;
weight gradients of bfloat16 / float16 inputs accumulate in float32 and are rounded once.
"""

from __future__ import annotations

import torch
from fastkd.kernels.distill_loss import distill_loss_forward
from fastkd.kernels.topk_distill import topk_distill_forward
from torch import Tensor


def _linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.addmm(b, h, w.t()) if b is not None else torch.mm(h, w.t())


class _Side:
    def __init__(self, h: Tensor, w: Tensor, with_bias: bool) -> None:
        self.low = w.dtype not in (torch.float32, torch.float64)
        acc = torch.float32 if self.low else w.dtype
        self.dtype = w.dtype
        self.h = torch.empty_like(h)
        self.w = torch.zeros(w.shape, dtype=acc, device=w.device)
        self.b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if with_bias else w.new_empty((0,))
        self.with_bias = with_bias

    def add(self, g: Tensor, h: Tensor, w: Tensor, r0: int, n: int) -> None:
        torch.mm(g, w, out=self.h[r0 : r0 + n])
        if self.low:
            self.w += torch.mm(g.t(), h)
        else:
            self.w.addmm_(g.t(), h)
        if self.with_bias:
            self.b += g.sum(0, dtype=self.w.dtype)

    def finish(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.low:
            return self.h, self.w.to(self.dtype), self.b.to(self.dtype) if self.with_bias else self.b
        return self.h, self.w, self.b


def fused_linear_distill_forward(
    hs, ws, bs, ht, wt, bt, tlogits, tids, tvals, tlse, row_scale, temperature, divergence, beta, loss_scale,
    reduce, chunk, grad_student, grad_teacher,
):  # fmt: skip
    """Same arguments and results as the ``fastkd::fused_linear_distill`` schema."""
    N = hs.shape[0]
    grad_student, grad_teacher = grad_student and reduce, grad_teacher and reduce  # see the op's docstring
    hs, ws = hs.contiguous(), ws.contiguous()
    linear = ht is not None
    if linear:
        ht, wt = ht.contiguous(), wt.contiguous()
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    rows = torch.empty(N, dtype=acc, device=hs.device)

    def empty() -> Tensor:
        return hs.new_empty((0,))

    gs = _Side(hs, ws, bs is not None) if grad_student else None
    gt = _Side(ht, wt, bt is not None) if (grad_teacher and linear) else None
    g_tl = torch.empty_like(tlogits) if (grad_teacher and tlogits is not None) else empty()
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        h = hs[r0 : r0 + n]
        S = _linear(h, ws, bs)
        rs = row_scale[r0 : r0 + n]
        if tids is not None:
            lse = None if tlse is None else tlse[r0 : r0 + n]
            loss_c, g_s = topk_distill_forward(
                S, tids[r0 : r0 + n], tvals[r0 : r0 + n], lse, rs, temperature, loss_scale, False, grad_student
            )
        else:
            T = _linear(ht[r0 : r0 + n], wt, bt) if linear else tlogits[r0 : r0 + n]
            loss_c, g_s, g_t = distill_loss_forward(
                S, T, rs, temperature, divergence, beta, loss_scale, False, grad_student, grad_teacher
            )
            if gt is not None:
                gt.add(g_t, ht[r0 : r0 + n], wt, r0, n)
            if g_tl.numel() > 0:
                g_tl[r0 : r0 + n] = g_t
        rows[r0 : r0 + n] = loss_c
        if gs is not None:
            gs.add(g_s, h, ws, r0, n)
    g_hs, g_ws, g_bs = gs.finish() if gs is not None else (empty(), empty(), empty())
    g_ht, g_wt, g_bt = gt.finish() if gt is not None else (empty(), empty(), empty())
    loss = rows.sum() if reduce else rows
    # outputs never alias each other or the inputs (custom_op requires fresh tensors)
    return loss, g_hs, g_ws, g_bs, g_ht, g_wt, g_bt, g_tl
