"""``fastkd.fused_linear_distill_loss``: lm_head + distillation loss without the ``[N, V]`` logits.

Layers: ``csrc/fused_linear_distill.cpp`` (the chunk loop in C++ through ATen GEMMs and, per chunk,
the fused softmax-divergence kernel ``fastkd::distill_loss`` or ``fastkd::topk_distill``; the same
loop serves CPU and CUDA tensors), ``kernels/fused_linear_distill.py`` (the loop on the host with the
Triton kernels per chunk), and this module: the pure-PyTorch reference (logits materialised),
validation, registration with ``torch.library`` (fake tensors, autograd) and backend dispatch.

The fused backends share one op schema::

    fused_linear_distill(Tensor student_hidden, Tensor student_weight, Tensor? student_bias,
        Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits,
        Tensor? teacher_ids, Tensor? teacher_topk_logits, Tensor? teacher_logsumexp, Tensor row_scale,
        float temperature, int divergence, float beta, float loss_scale, bool reduce, int chunk,
        bool grad_student, bool grad_teacher)
        -> (loss, d student_hidden, d student_weight, d student_bias,
            d teacher_hidden, d teacher_weight, d teacher_bias, d teacher_logits)

``grad_student`` / ``grad_teacher`` say which sides need gradients. With ``reduce`` the forward
computes them (scaled by the reduction weights) and backward scales them by the upstream gradient,
in place. Without ``reduce`` (``reduction="none"``) the forward computes the per-row losses only
(the gradient outputs are empty) and backward reruns the chunk loop, reduced, with the row weights
multiplied by the upstream per-row gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastkd.backends import Op
from fastkd.ops import distill_loss as _dl
from fastkd.ops import topk_distill as _tk
from fastkd.ops._common import acc_dtype, check_float_tensor, lazy_triton_op, register_compiled
from fastkd.ops.distill_loss import (
    DIVERGENCES,
    _effective_divergence,
    _keep_rows,
    _loss_scale,
    _row_scale,
    reference_distill_loss,
)
from fastkd.ops.scale_grad import scale_saved_grads
from fastkd.ops.topk_distill import reference_topk_distill_loss

OP = Op("fused_linear_distill")

# Elements of one [C, V] chunk buffer in the default chunk size: 4 such buffers (S, T and their
# gradients) are 128 MiB in float32.
CHUNK_ELEMENTS = 1 << 23
# On a GPU the chunk is 16x larger (4 bfloat16 buffers: 1 GiB). Every chunk adds its weight gradient
# [V, H] into the float32 accumulator: at 16384 x 4096 x 128256 and 64-row chunks that was 256 passes
# over a 2 GiB accumulator plus a 1 GiB product each (~1.6 TB of traffic, most of the 773 ms measured
# on an H200, eager 133 ms; benchmarks/results/nvidia-h200/NOTES.md), and 64-row GEMMs are too
# short for the tensor cores. 1040 rows there: 16 passes (~0.1 TB). Not yet measured on a GPU.
CHUNK_ELEMENTS_CUDA = 1 << 27


def default_chunk_size(N: int, V: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: about ``CHUNK_ELEMENTS / V`` (``CHUNK_ELEMENTS_CUDA`` on a GPU), a multiple of
    8, at least 8, at most N."""
    elements = CHUNK_ELEMENTS_CUDA if torch.device(device).type == "cuda" else CHUNK_ELEMENTS
    c = max(8, (elements // max(V, 1)) // 8 * 8)
    return max(1, min(c, N))


# --------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the logits are materialised.
# --------------------------------------------------------------------------------------------
def _linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(h, w, b)


def reference_fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple | None = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    keep: Tensor | None = None,
    scale_by_t2: bool = True,
) -> Tensor:
    """Logits = hidden @ weight.T + bias on each side, then the reference distillation loss."""
    s = _linear(student_hidden, student_weight, student_bias)
    if teacher_topk is not None:
        ids, tv, lse = (tuple(teacher_topk) + (None,))[:3]
        return reference_topk_distill_loss(
            s, ids, tv, teacher_logsumexp=lse, temperature=temperature, reduction=reduction, keep=keep,
            scale_by_t2=scale_by_t2,
        )  # fmt: skip
    t = teacher_logits if teacher_logits is not None else _linear(teacher_hidden, teacher_weight, teacher_bias)
    return reference_distill_loss(
        s, t, temperature=temperature, divergence=divergence, beta=beta, reduction=reduction, keep=keep,
        scale_by_t2=scale_by_t2,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------
def _check_options(temperature, divergence, beta, reduction, chunk_size) -> None:
    """The checks of the options alone (no tensors), also run by ``fastkd.nn.FusedLinearDistillationLoss``
    at construction."""
    _dl._check_options(temperature, divergence, beta, reduction)
    _check_chunk_size(chunk_size)


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_inputs(
    hs, ws, ht, wt, bs, bt, tlogits, topk, temperature, divergence, beta, reduction, labels, mask, chunk_size
) -> tuple:
    check_float_tensor(hs, "student_hidden")
    check_float_tensor(ws, "student_weight")
    if hs.dim() < 1:
        raise ValueError("student_hidden must have shape [..., Hs], got a 0-d tensor")
    if ws.dim() != 2 or ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must have shape [V, Hs] with Hs = {hs.shape[-1]}, got {tuple(ws.shape)}")
    V = ws.shape[0]
    if V == 0:
        raise ValueError("student_weight must have V >= 1 rows (the vocabulary)")
    lead = tuple(hs.shape[:-1])
    dev = hs.device
    for name, x in (("student_weight", ws), ("student_bias", bs)):
        if x is not None and x.device != dev:
            raise ValueError(f"{name} must be on {dev}, got {x.device}")
    if bs is not None:
        check_float_tensor(bs, "student_bias")
        if tuple(bs.shape) != (V,):
            raise ValueError(f"student_bias must have shape ({V},), got {tuple(bs.shape)}")
    sources = [ht is not None or wt is not None, tlogits is not None, topk is not None]
    if sum(sources) != 1:
        raise ValueError(
            "give exactly one teacher: teacher_hidden and teacher_weight, teacher_logits, or teacher_topk; got "
            f"{sum(sources)}"
        )
    if sources[0]:
        if ht is None or wt is None:
            raise ValueError("teacher_hidden and teacher_weight must be given together")
        check_float_tensor(ht, "teacher_hidden")
        check_float_tensor(wt, "teacher_weight")
        if tuple(ht.shape[:-1]) != lead:
            raise ValueError(
                f"teacher_hidden must have the leading shape {lead} of student_hidden, got {tuple(ht.shape)}"
            )
        if wt.dim() != 2 or wt.shape != (V, ht.shape[-1]):
            raise ValueError(f"teacher_weight must have shape ({V}, {ht.shape[-1]}) = [V, Ht], got {tuple(wt.shape)}")
        if bt is not None:
            check_float_tensor(bt, "teacher_bias")
            if tuple(bt.shape) != (V,):
                raise ValueError(f"teacher_bias must have shape ({V},), got {tuple(bt.shape)}")
        for name, x in (("teacher_hidden", ht), ("teacher_weight", wt), ("teacher_bias", bt)):
            if x is not None and x.device != dev:
                raise ValueError(f"{name} must be on {dev}, got {x.device}")
    elif bt is not None:
        raise ValueError("teacher_bias needs teacher_hidden and teacher_weight")
    if sources[1]:
        check_float_tensor(tlogits, "teacher_logits")
        if tuple(tlogits.shape) != lead + (V,):
            raise ValueError(f"teacher_logits must have shape {lead + (V,)} = [..., V], got {tuple(tlogits.shape)}")
        if tlogits.device != dev:
            raise ValueError(f"teacher_logits must be on {dev}, got {tlogits.device}")
    if sources[2]:
        if not isinstance(topk, (tuple, list)) or len(topk) not in (2, 3):
            raise TypeError("teacher_topk must be a tuple (ids [..., K], logits [..., K], logsumexp [...] or None)")
        ids, tv, lse = (tuple(topk) + (None,))[:3]
        _tk._check_topk(lead, V, dev, ids, tv, lse, what="teacher_topk: ")
        if divergence != "kl":
            raise ValueError(f"teacher_topk supports divergence='kl' only, got {divergence!r}")
        topk = (ids, tv, lse)
    _dl._check_options(temperature, divergence, beta, reduction)
    _tk._check_common(temperature, reduction, labels, mask, lead, dev)
    _check_chunk_size(chunk_size)
    return topk


# --------------------------------------------------------------------------------------------
# Registration: fake tensors and autograd.
# --------------------------------------------------------------------------------------------
def _fake(hs, ws, bs, ht, wt, bt, tl, tids, tvals, tlse, row_scale, temperature, divergence, beta, loss_scale,
          reduce, chunk, grad_student, grad_teacher):  # fmt: skip
    N = hs.shape[0]
    loss = hs.new_empty(() if reduce else (N,), dtype=acc_dtype(hs.dtype))

    def e():
        return hs.new_empty((0,))

    lin_t = ht is not None and wt is not None
    grad_student, grad_teacher = grad_student and reduce, grad_teacher and reduce
    return (
        loss,
        torch.empty_like(hs) if grad_student else e(),
        torch.empty_like(ws) if grad_student else e(),
        torch.empty_like(bs) if grad_student and bs is not None else e(),
        torch.empty_like(ht) if grad_teacher and lin_t else e(),
        torch.empty_like(wt) if grad_teacher and lin_t else e(),
        torch.empty_like(bt) if grad_teacher and lin_t and bt is not None else e(),
        torch.empty_like(tl) if grad_teacher and tl is not None else e(),
    )


def _setup_context(ctx, inputs, output) -> None:
    (hs, ws, bs, ht, wt, bt, tl, tids, tvals, tlse, row_scale, temperature, divergence, beta, loss_scale, reduce,
     chunk, grad_student, grad_teacher) = inputs  # fmt: skip
    ctx.reduce, ctx.grad_student, ctx.grad_teacher = bool(reduce), bool(grad_student), bool(grad_teacher)
    ctx.present = [x is not None for x in (hs, ws, bs, ht, wt, bt, tl)]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if reduce:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.scalars = (temperature, divergence, beta, loss_scale, chunk)
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, tl, tids, tvals, tlse, row_scale)


def _make_backward(get_op: Callable, backend: str | None):
    def backward(ctx, g_loss, *_unused):
        if g_loss is None or not (ctx.grad_student or ctx.grad_teacher):
            return (None,) * 19
        if ctx.reduce:
            saved = [g if g.numel() > 0 else None for g in ctx.saved_tensors]
            grads = [g if g is not None else torch.empty(0) for g in scale_saved_grads(saved, g_loss, backend)]
        else:
            hs, ws, bs, ht, wt, bt, tl, tids, tvals, tlse, row_scale = ctx.saved_tensors
            temperature, divergence, beta, loss_scale, chunk = ctx.scalars
            out = get_op()(
                hs, ws, bs, ht, wt, bt, tl, tids, tvals, tlse, row_scale * g_loss.to(row_scale.dtype), temperature,
                divergence, beta, loss_scale, True, chunk, ctx.grad_student, ctx.grad_teacher,
            )  # fmt: skip
            grads = list(out[1:])
        res = [g if (present and g.numel() > 0) else None for g, present in zip(grads, ctx.present)]
        if not ctx.grad_student:
            res[0:3] = [None] * 3
        if not ctx.grad_teacher:
            res[3:7] = [None] * 4
        return (*res, *([None] * 12))

    return backward


register_compiled(
    "fused_linear_distill",
    _fake,
    _setup_context,
    lambda: _make_backward(lambda: torch.ops.fastkd.fused_linear_distill.default, None),
)


def _define_triton_op():
    from fastkd.kernels import fused_linear_distill as fk

    @torch.library.custom_op("fastkd::fused_linear_distill_triton", mutates_args=())
    def fused_linear_distill_triton(
        hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor | None, wt: Tensor | None, bt: Tensor | None,
        tl: Tensor | None, tids: Tensor | None, tvals: Tensor | None, tlse: Tensor | None, row_scale: Tensor,
        temperature: float, divergence: int, beta: float, loss_scale: float, reduce: bool, chunk: int,
        grad_student: bool, grad_teacher: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        return fk.fused_linear_distill_forward(
            hs, ws, bs, ht, wt, bt, tl, tids, tvals, tlse, row_scale, temperature, divergence, beta, loss_scale,
            reduce, chunk, grad_student, grad_teacher,
        )  # fmt: skip

    return fused_linear_distill_triton


_triton_op = lazy_triton_op(_define_triton_op, _fake, _setup_context, lambda op: _make_backward(lambda: op, "triton"))


# --------------------------------------------------------------------------------------------
# Backends and the public function.
# --------------------------------------------------------------------------------------------
def _fused(op, hs, ws, ht, wt, bs, bt, tl, topk, keep, temperature, divergence, beta, reduction, scale_by_t2, chunk):
    lead = hs.shape[:-1]
    V = ws.shape[0]
    dt = hs.dtype
    hs2 = hs.reshape(-1, hs.shape[-1])
    N = hs2.shape[0]
    acc = acc_dtype(dt)
    ws_, bs_ = ws.to(dt), None if bs is None else bs.to(dt)
    ht2 = wt_ = bt_ = tl2 = tids = tvals = tlse = None
    if ht is not None:
        ht2, wt_ = ht.reshape(N, ht.shape[-1]).to(dt), wt.to(dt)
        bt_ = None if bt is None else bt.to(dt)
    if tl is not None:
        tl2 = tl.reshape(N, V).to(dt).contiguous()
    if topk is not None:
        tids, tvals, tlse = _tk.prepare_topk(topk[0], topk[1], topk[2], acc, N)
    grad_on = torch.is_grad_enabled()
    grad_student = grad_on and any(x is not None and x.requires_grad for x in (hs, ws, bs))
    grad_teacher = grad_on and topk is None and any(x is not None and x.requires_grad for x in (ht, wt, bt, tl))
    row_scale = _row_scale(keep, N, V, reduction, hs.device, acc)
    div = DIVERGENCES[_effective_divergence(divergence, beta)]
    reduce = reduction != "none"
    loss = op(
        hs2, ws_, bs_, ht2, wt_, bt_, tl2, tids, tvals, tlse, row_scale, float(temperature), div,
        float(beta), _loss_scale(temperature, scale_by_t2), reduce,
        int(chunk or default_chunk_size(N, V, hs.device)), grad_student, grad_teacher,
    )[0]  # fmt: skip
    return loss.reshape(lead) if not reduce else loss


@OP.register("torch")
def _torch_impl(hs, ws, ht, wt, bs, bt, tl, topk, keep, temperature, divergence, beta, reduction, scale_by_t2, chunk):
    dt = hs.dtype
    out = reference_fused_linear_distill_loss(
        hs, ws.to(dt), None if ht is None else ht.to(dt), None if wt is None else wt.to(dt),
        student_bias=None if bs is None else bs.to(dt), teacher_bias=None if bt is None else bt.to(dt),
        teacher_logits=None if tl is None else tl.to(dt), teacher_topk=topk, temperature=temperature,
        divergence=divergence, beta=beta, reduction=reduction, keep=keep, scale_by_t2=scale_by_t2,
    )  # fmt: skip
    return out.to(torch.float32) if out.dtype != torch.float64 else out


@OP.register("cpu", "cuda")
def _compiled_impl(*args):
    return _fused(torch.ops.fastkd.fused_linear_distill.default, *args)


@OP.register("triton", prepare=_triton_op)
def _triton_impl(*args):
    return _fused(_triton_op(), *args)


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple | None = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
    scale_by_t2: bool = True,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Distillation loss of ``hidden @ weight.T + bias`` logits that never builds the ``[N, V]`` logits.

    Args:
        student_hidden: ``[..., Hs]`` (any leading shape; flattened to N rows).
        student_weight, student_bias: the student's output layer, ``[V, Hs]`` and ``[V]``.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's, ``[..., Ht]``, ``[V, Ht]``, ``[V]``;
            or instead ``teacher_logits`` ``[..., V]``, or ``teacher_topk=(ids [..., K], logits [..., K],
            logsumexp [...] or None)`` (see :func:`fastkd.topk_distill_loss`; divergence ``"kl"``).
            The teacher's tensors are cast to the student's dtype.
        temperature, divergence, beta, labels, ignore_index, mask, reduction, scale_by_t2, backend:
            exactly :func:`fastkd.distill_loss`'s semantics on the logits.
        chunk_size: rows per chunk (default about ``2**23 / V`` on a CPU, ``2**27 / V`` on a GPU, a
            multiple of 8).

    Gradients reach the student's hidden states, weight and bias, and the teacher's hidden states,
    weight, bias or logits when they require grad (never the top-K teacher). The fused backends
    compute them chunk by chunk in the forward pass: peak extra memory is O(chunk x V) plus the
    gradient buffers of the inputs. The ``torch`` backend is the reference and builds the logits.
    """
    topk = _check_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, teacher_logits,
        teacher_topk, temperature, divergence, beta, reduction, labels, mask, chunk_size,
    )  # fmt: skip
    keep = _keep_rows(labels, mask, ignore_index)
    name = OP.pick(student_hidden.device, backend)
    return OP(
        name, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
        teacher_logits, topk, keep, temperature, divergence, beta, reduction, scale_by_t2, chunk_size,
    )  # fmt: skip
