"""Triton kernel of ``fastkd.scale_grad_``: ``grad *= scale`` in place, for the fused losses' backward.

The fused losses (``distill_loss``, ``hidden_match``) write d(loss)/d(input) in their forward pass;
backward multiplies those gradients by the upstream gradient, a 0-d ``scale`` or one value per row
``[N]``. The check ``scale == 1`` happens on the device, in every program, so the usual
``loss.backward()`` (upstream gradient 1) moves no gradient bytes and never synchronises with the
host.

Launch: a 1-D grid of ``rows * chunks`` programs of ``BLOCK`` elements (:func:`launch_grid`): CUDA
allows 2**31 - 1 programs in x but only 65,535 in y and z, so a 2-D (row, chunk) grid would fail for
rows of more than 65,535 * BLOCK elements (about 2.7e8 at BLOCK = 4096). A 0-d scale treats the
tensor as a single row. All offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on gridDim.x


@triton.jit
def scale_grad_kernel(
    g_ptr,  # gradient [rows, M] contiguous, modified in place
    sc_ptr,  # upstream gradient: one value (PER_ROW False) or [rows]
    M,  # elements per row
    chunks,  # programs per row: cdiv(M, BLOCK)
    PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // chunks
    chunk = pid - row * chunks
    if PER_ROW:
        sc = tl.load(sc_ptr + row)
    else:
        sc = tl.load(sc_ptr)
    if sc != 1.0:  # the common case (loss.backward()) moves no bytes
        idx = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        msk = idx < M
        ptr = g_ptr + row * M + idx
        g = tl.load(ptr, mask=msk).to(ACC)
        tl.store(ptr, (g * sc.to(ACC)).to(g_ptr.dtype.element_ty), mask=msk)


def launch_grid(rows: int, cols: int, block: int) -> tuple[int, int]:
    """``(programs, chunks)``: a 1-D grid of ``rows * chunks`` programs, ``chunks = cdiv(cols, block)``
    per row. Raises ValueError beyond CUDA's 2**31 - 1 programs (2**31 * 4096 elements)."""
    chunks = max(triton.cdiv(cols, block), 1)
    programs = rows * chunks
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"scale_grad_: {rows} x {cols} elements need {programs} programs of {block}, more than CUDA's "
            f"{MAX_PROGRAMS}"
        )
    return programs, chunks


def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[i] *= scale (0-d) or scale[i] ([N]), in place (``grad`` contiguous); no work where the
    scale is 1."""
    if grad.numel() == 0:
        return
    per_row = scale.dim() > 0
    rows = grad.shape[0] if per_row else 1
    M = grad.numel() // rows
    block = min(MAX_BLOCK, triton.next_power_of_2(max(M, 16)))
    programs, chunks = launch_grid(rows, M, block)
    scale_grad_kernel[(programs,)](
        grad,
        scale,
        M,
        chunks,
        PER_ROW=per_row,
        BLOCK=block,
        ACC=tl.float64 if grad.dtype == torch.float64 else tl.float32,
        num_warps=4,
    )
