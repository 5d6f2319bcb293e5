"""Triton kernels of the fused embedding-gradient step (``fastkd.embedding_ascent_`` and
``fastkd.embedding_ascent_multi_``).

Math, per token row (last dimension H; s = +1 to ascend, -1 to descend), in float32 (float64 for
float64 embeddings):

    g  = s * grad
    momentum buffer given (MI-FGSM):   b = momentum * b + g / ||g||_1   (0 for a zero row);  g := b
    direction:   NORM 0 "l2":  d = g / ||g||_2     NORM 1 "sign" (= "linf"):  d = sign(g)     NORM 2 "none":  d = g
    x  = e + step_size * d                (a row whose g is exactly 0 is not stepped: no NaN)
    radius around origin o:   l2 / none:  x = o + (x - o) * r / ||x - o||_2   if ||x - o||_2 > r
                              sign:       x = o + copysign(r, x - o)          where |x - o| > r
    max_norm:                 x = x * max_norm / ||x||_2                       if ||x||_2 > max_norm
    e  = x;   rows whose mask is False are neither read nor written (embeds and buffer keep their bits).

This is an optimiser-style update, not a differentiable op: there is no gradient formula.

One program per row holds the whole row in registers (BLOCK_H = next power of two >= H), so every
reduction above is a register reduction and each operand is read once and written once: the memory
floor (read embeds, grad, origin, buffer; write embeds, buffer). The multi-tensor kernel covers the
rows of every tensor of a list in one launch: a table on the device holds, per tensor, the base
pointers, the row strides, the first global row, the row count and H.
Row offsets are int64, so tensors of more than 2**31 elements are addressed correctly.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

L2 = 0
SIGN = 1
NONE = 2

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """hi + lo in the compute type: Triton passes Python floats as float32, so a float64 scalar
    arrives as two float32 halves (48 significant bits; exact for the float32 compute type)."""
    z = tl.zeros([1], ACC)
    return tl.sum(z + hi, axis=0) + tl.sum(z + lo, axis=0)


@triton.jit
def _ascent_row(
    e_row,  # pointer to the row of embeds, [H], updated in place
    g_row,  # pointer to the row of grad, [H]
    o_row,  # pointer to the row of origin, [H] (read only when HAS_RADIUS)
    b_row,  # pointer to the row of the momentum buffer, [H] (read and written only when HAS_BUF)
    keep,  # int1 scalar: False leaves the row (and its buffer row) untouched
    H,
    step,  # step_size > 0
    sgn,  # +1.0 (maximize) or -1.0
    momentum,
    radius,
    max_norm,
    NORM: tl.constexpr,
    HAS_BUF: tl.constexpr,
    HAS_RADIUS: tl.constexpr,
    HAS_MAX_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_H)
    msk = cols < H
    wmsk = cols < tl.where(keep, H, 0)  # store mask: the row's columns, none when the row is masked out
    x = tl.load(e_row + cols, mask=msk, other=0.0).to(ACC)
    g = tl.load(g_row + cols, mask=msk, other=0.0).to(ACC)
    c = step * sgn
    if HAS_BUF:
        l1 = tl.sum(tl.abs(g), axis=0)
        inv = tl.where(l1 == 0.0, 0.0, sgn / l1)
        b = tl.load(b_row + cols, mask=msk, other=0.0).to(ACC)
        nb = (momentum * b + g * inv).to(b_row.dtype.element_ty)
        tl.store(b_row + cols, nb, mask=wmsk)
        g = nb.to(ACC)  # the step uses exactly the stored momentum
        c = step  # the buffer already carries the sign
    sq = tl.sum(g * g, axis=0)
    if NORM == 0:
        d = g * (c / tl.sqrt(tl.where(sq == 0.0, 1.0, sq)))
    elif NORM == 1:
        # sign(g) with NaN passing through (0 * NaN = NaN), so NaN gradients propagate
        d = tl.where(g > 0.0, c, tl.where(g < 0.0, -c, g * c))
    else:
        d = g * c
    x = tl.where(sq != 0.0, x + d, x)  # a zero gradient row is not stepped
    if HAS_RADIUS:
        o = tl.load(o_row + cols, mask=msk, other=0.0).to(ACC)
        delta = x - o
        if NORM == 1:
            x = tl.where(tl.abs(delta) > radius, o + tl.where(delta < 0.0, -radius, radius), x)
        else:
            dn = tl.sqrt(tl.sum(delta * delta, axis=0))
            x = tl.where(dn > radius, o + delta * (radius / tl.where(dn > radius, dn, 1.0)), x)
    if HAS_MAX_NORM:
        xn = tl.sqrt(tl.sum(x * x, axis=0))
        x = tl.where(xn > max_norm, x * (max_norm / tl.where(xn > max_norm, xn, 1.0)), x)
    tl.store(e_row + cols, x.to(e_row.dtype.element_ty), mask=wmsk)


@triton.jit
def embedding_ascent_kernel(
    e_ptr,  # embeds [N, H] (row stride se, unit column stride), updated in place
    g_ptr,  # grad [N, H] (row stride sg)
    o_ptr,  # origin [N, H] (row stride so); unused unless HAS_RADIUS
    m_ptr,  # mask [N] uint8 (0 = leave the row untouched); unused unless HAS_MASK
    b_ptr,  # momentum buffer [N, H] (row stride sb), updated in place; unused unless HAS_BUF
    H,
    se,
    sg,
    so,
    sb,
    step_hi,  # step_size = step_hi + step_lo (see _scalar)
    step_lo,
    sgn,  # +1.0 (maximize) or -1.0
    mom_hi,  # momentum
    mom_lo,
    rad_hi,  # radius (unused unless HAS_RADIUS)
    rad_lo,
    mx_hi,  # max_norm (unused unless HAS_MAX_NORM)
    mx_lo,
    NORM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BUF: tl.constexpr,
    HAS_RADIUS: tl.constexpr,
    HAS_MAX_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        keep = tl.load(m_ptr + row) != 0
    else:
        keep = row >= 0
    _ascent_row(
        e_ptr + row * se, g_ptr + row * sg, o_ptr + row * so, b_ptr + row * sb, keep, H,
        _scalar(step_hi, step_lo, ACC), sgn, _scalar(mom_hi, mom_lo, ACC), _scalar(rad_hi, rad_lo, ACC),
        _scalar(mx_hi, mx_lo, ACC), NORM, HAS_BUF, HAS_RADIUS, HAS_MAX_NORM, BLOCK_H, ACC,
    )  # fmt: skip


@triton.jit
def embedding_ascent_multi_kernel(
    table_ptr,  # [G, 12] int64, one row per tensor: addresses of e, g, o, m, b (0 = absent; columns 0-4),
    #             row strides of e, g, o, b (5-8), first global row (9), rows (10), H (11)
    G,  # number of tensors
    step_hi,  # scalars as in embedding_ascent_kernel
    step_lo,
    sgn,
    mom_hi,
    mom_lo,
    rad_hi,
    rad_lo,
    mx_hi,
    mx_lo,
    DTYPE: tl.constexpr,  # element type of embeds, grad, origin
    BDTYPE: tl.constexpr,  # element type of the momentum buffers
    NORM: tl.constexpr,
    HAS_BUF: tl.constexpr,
    HAS_RADIUS: tl.constexpr,
    HAS_MAX_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # global row over all tensors
    t = r * 0
    for i in range(1, G):
        t += (r >= tl.load(table_ptr + i * 12 + 9)).to(tl.int64)
    base = table_ptr + t * 12
    i = r - tl.load(base + 9)  # row within tensor t
    H = tl.load(base + 11)
    e_row = tl.load(base + 0).to(tl.pointer_type(DTYPE)) + i * tl.load(base + 5)
    g_row = tl.load(base + 1).to(tl.pointer_type(DTYPE)) + i * tl.load(base + 6)
    o_row = e_row
    if HAS_RADIUS:
        o_row = tl.load(base + 2).to(tl.pointer_type(DTYPE)) + i * tl.load(base + 7)
    b_row = tl.load(base + 4).to(tl.pointer_type(BDTYPE)) + i * tl.load(base + 8)
    m_addr = tl.load(base + 3)
    keep = tl.load(m_addr.to(tl.pointer_type(tl.uint8)) + i, mask=m_addr != 0, other=1) != 0
    _ascent_row(
        e_row, g_row, o_row, b_row, keep, H,
        _scalar(step_hi, step_lo, ACC), sgn, _scalar(mom_hi, mom_lo, ACC), _scalar(rad_hi, rad_lo, ACC),
        _scalar(mx_hi, mx_lo, ACC), NORM, HAS_BUF, HAS_RADIUS, HAS_MAX_NORM, BLOCK_H, ACC,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def row_stride(t: torch.Tensor) -> int:
    """Stride between rows of ``t`` seen as ``[N, H]``, or -1 when its leading dimensions do not
    collapse into one or its last dimension is not unit-stride."""
    H = t.shape[-1]
    if H > 1 and t.stride(-1) != 1:
        return -1
    rs, expect = -1, -1
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            continue
        if rs == -1:
            rs = t.stride(i)
        elif t.stride(i) != expect:
            return -1
        expect = t.stride(i) * t.shape[i]
    return H if rs == -1 else rs


def as_rows(t: torch.Tensor, writable: bool) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(tensor the kernel addresses, its row stride, the caller's tensor to copy back into or None)."""
    H = t.shape[-1]
    N = t.numel() // H if H else 0
    rs = row_stride(t)
    if rs >= 0 and (not writable or N <= 1 or rs >= H):
        return t, rs, None
    c = t.contiguous()
    return c, H, (t if writable else None)


def _launch_shape(H: int) -> tuple[int, int]:
    block = triton.next_power_of_2(max(H, 16))
    warps = 1 if block <= 128 else (4 if block <= 2048 else (8 if block <= 8192 else 16))
    return block, warps


def _split(v: float) -> tuple[float, float]:
    """A float64 as two float32 values whose sum is v to 48 bits (see _scalar)."""
    v = max(min(float(v), 3.0e38), -3.0e38)
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, struct.unpack("f", struct.pack("f", v - hi))[0]


def _scalars(step_size: float, radius: float | None, max_norm: float | None, momentum: float, maximize: bool):
    """Kernel scalar arguments: step (hi, lo), sign, momentum (hi, lo), radius (hi, lo), max_norm (hi, lo)."""
    return (
        *_split(step_size),
        1.0 if maximize else -1.0,
        *_split(momentum),
        *_split(radius if radius is not None else 0.0),
        *_split(max_norm if max_norm is not None else 0.0),
    )


def embedding_ascent_(
    embeds: torch.Tensor,
    grad: torch.Tensor,
    origin: torch.Tensor | None,
    mask: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    step_size: float,
    norm: int,
    radius: float | None,
    max_norm: float | None,
    momentum: float,
    maximize: bool,
) -> None:
    """Host launcher: one program per row of ``embeds`` ``[..., H]`` (inputs validated by the caller;
    grad and origin have embeds' dtype; mask is bool ``[...]``)."""
    H = embeds.shape[-1]
    N = embeds.numel() // H if H else 0
    if N == 0:
        return
    e, se, e_back = as_rows(embeds, True)
    g, sg, _ = as_rows(grad, False)
    o, so = (e, 0) if radius is None else as_rows(origin, False)[:2]
    b, sb, b_back = (e, 0, None) if momentum_buffer is None else as_rows(momentum_buffer, True)
    m = e if mask is None else mask.reshape(-1).contiguous().view(torch.uint8)
    block, warps = _launch_shape(H)
    embedding_ascent_kernel[(N,)](
        e, g, o, m, b, H, se, sg, so, sb, *_scalars(step_size, radius, max_norm, momentum, maximize),
        NORM=norm, HAS_MASK=mask is not None, HAS_BUF=momentum_buffer is not None,
        HAS_RADIUS=radius is not None, HAS_MAX_NORM=max_norm is not None, BLOCK_H=block,
        ACC=tl.float64 if embeds.dtype == torch.float64 else tl.float32, num_warps=warps,
    )  # fmt: skip
    if e_back is not None:
        e_back.copy_(e)
    if b_back is not None:
        b_back.copy_(b)


def embedding_ascent_multi_(
    embeds: list[torch.Tensor],
    grads: list[torch.Tensor],
    origins: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    momentum_buffers: list[torch.Tensor],
    step_size: float,
    norm: int,
    radius: float | None,
    max_norm: float | None,
    momentum: float,
    maximize: bool,
) -> None:
    """Host launcher: every row of every tensor in one launch (same dtype and device across the list;
    H may differ). ``origins`` / ``momentum_buffers`` are empty or one per tensor, ``masks`` entries
    may be None."""
    if not embeds:
        return
    dev = embeds[0].device
    has_buf = len(momentum_buffers) > 0
    keep_alive: list[torch.Tensor] = []
    writebacks: list[tuple[torch.Tensor, torch.Tensor]] = []
    rows_table: list[list[int]] = []
    first = 0
    max_h = 0
    for i, x in enumerate(embeds):
        H = x.shape[-1]
        N = x.numel() // H if H else 0
        if N == 0:
            continue
        e, se, e_back = as_rows(x, True)
        g, sg, _ = as_rows(grads[i], False)
        o_addr, so = 0, 0
        if radius is not None:
            o, so, _ = as_rows(origins[i], False)
            keep_alive.append(o)
            o_addr = o.data_ptr()
        b_addr, sb = 0, 0
        if has_buf:
            b, sb, b_back = as_rows(momentum_buffers[i], True)
            keep_alive.append(b)
            b_addr = b.data_ptr()
            if b_back is not None:
                writebacks.append((b_back, b))
        m_addr = 0
        if masks and masks[i] is not None:
            m = masks[i].reshape(-1).contiguous().view(torch.uint8)
            keep_alive.append(m)
            m_addr = m.data_ptr()
        keep_alive += [e, g]
        if e_back is not None:
            writebacks.append((e_back, e))
        rows_table.append([e.data_ptr(), g.data_ptr(), o_addr, m_addr, b_addr, se, sg, so, sb, first, N, H])
        first += N
        max_h = max(max_h, H)
    if first == 0:
        return
    table = torch.tensor(rows_table, dtype=torch.int64).to(dev)
    block, warps = _launch_shape(max_h)
    dtype = embeds[0].dtype
    bdtype = momentum_buffers[0].dtype if has_buf else dtype
    embedding_ascent_multi_kernel[(first,)](
        table, len(rows_table), *_scalars(step_size, radius, max_norm, momentum, maximize),
        DTYPE=_TL_DTYPES[dtype], BDTYPE=_TL_DTYPES[bdtype], NORM=norm, HAS_BUF=has_buf,
        HAS_RADIUS=radius is not None, HAS_MAX_NORM=max_norm is not None, BLOCK_H=block,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32, num_warps=warps,
    )  # fmt: skip
    for dst, src in writebacks:
        dst.copy_(src)
