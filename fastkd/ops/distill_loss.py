"""``fastkd.distill_loss``: the fused temperature-softmax distillation loss.

Layers (one file each): ``kernels/distill_loss.py`` (Triton), ``csrc/distill_loss.cpp`` (C++ CPU,
at::vec), ``csrc/distill_loss_cuda.cu`` (CUDA), and this module: the pure-PyTorch reference, input
validation, registration with ``torch.library`` (fake tensors, autograd) and backend dispatch.

All fused backends share one op schema::

    distill_loss(Tensor student, Tensor teacher, Tensor row_scale, float temperature, int divergence,
                 float beta, float loss_scale, bool reduce, bool grad_student, bool grad_teacher)
        -> (Tensor loss, Tensor grad_student, Tensor grad_teacher)

on ``[N, V]`` logits. The forward writes the gradients (already multiplied by the reduction
weights in ``row_scale`` and by ``loss_scale``); backward scales them in place by the upstream
gradient (``fastkd.ops.scale_grad.scale_saved_grads``, shared with ``hidden_match``), which does
nothing when that gradient is the scalar 1. In eager mode a thin ``torch.autograd.Function`` calls
the same op and the same backward without ``torch.library``'s Python autograd wrapper (its cost
equals the whole loss at classification sizes); under ``torch.compile`` the registered autograd runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastkd.backends import Op
from fastkd.ops._common import (
    acc_dtype,
    check_float_tensor,
    check_one_of,
    check_row_selection,
    check_temperature,
    lazy_triton_op,
    register_compiled,
)
from fastkd.ops.scale_grad import scale_saved_grads

DIVERGENCES: dict[str, int] = {"kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS: tuple[str, ...] = ("batchmean", "mean", "sum", "none")

OP = Op("distill_loss")


# --------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the CPU fallback, the test oracle and the benchmark baseline.
# --------------------------------------------------------------------------------------------
def _xlogy_diff(w: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """w * (a - b) with zero where w == 0 (also in the gradient), even if a - b is inf or NaN there.

    Only an exact zero is dropped: a NaN weight (a NaN logit in the row) keeps its term, so NaN
    reaches the loss and both gradients (the NaN contract of :func:`distill_loss`)."""
    keep = w != 0  # True for NaN
    return w * torch.where(keep, a - b, torch.zeros((), dtype=a.dtype, device=a.device))


def _effective_divergence(divergence: str, beta: float) -> str:
    """``"jsd"`` with ``beta`` 0 is ``"kl"`` and with ``beta`` 1 ``"reverse_kl"``; else ``divergence``."""
    if divergence == "jsd" and beta == 0.0:
        return "kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def divergence_rows(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, divergence: str, beta: float
) -> Tensor:
    """Per-row divergence D (no temperature-squared factor), shape ``[...]``, in >= fp32."""
    dt = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.to(dt) / temperature
    t = teacher_logits.to(dt) / temperature
    ls = torch.log_softmax(s, dim=-1)
    lt = torch.log_softmax(t, dim=-1)
    divergence = _effective_divergence(divergence, beta)
    if divergence == "kl":
        return _xlogy_diff(lt.exp(), lt, ls).sum(-1)
    if divergence == "reverse_kl":
        return _xlogy_diff(ls.exp(), ls, lt).sum(-1)
    p, q = lt.exp(), ls.exp()
    mix = beta * p + (1.0 - beta) * q
    # Where m = 0 (p = q = 0, e.g. a vocabulary entry masked at -inf in both) both terms are 0; log(1)
    # keeps log's infinite derivative at 0 out of the backward (0 * inf would be NaN).
    lm = torch.log(torch.where(mix != 0, mix, torch.ones((), dtype=mix.dtype, device=mix.device)))
    return beta * _xlogy_diff(p, lt, lm).sum(-1) + (1.0 - beta) * _xlogy_diff(q, ls, lm).sum(-1)


def reference_distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    keep: Tensor | None = None,
    scale_by_t2: bool = True,
) -> Tensor:
    """The pure-PyTorch distillation loss (differentiable to both inputs through autograd).

    ``keep``: optional boolean ``[...]`` (the logits' leading shape); False rows are excluded.
    Computes in float32, or float64 for float64 inputs.
    """
    if keep is not None:
        # Excluded rows are not read (as in the fused kernels): NaN or inf there reaches neither the
        # loss nor the gradients (0 * NaN would be NaN in the backward of the masked sum).
        k = keep.unsqueeze(-1)
        student_logits = torch.where(k, student_logits, student_logits.new_zeros(()))
        teacher_logits = torch.where(k, teacher_logits, teacher_logits.new_zeros(()))
    d = divergence_rows(student_logits, teacher_logits, temperature, divergence, beta)
    if scale_by_t2:
        d = d * (temperature * temperature)
    return _reduce_rows(d, keep, reduction, student_logits.shape[-1])


def _reduce_rows(d: Tensor, keep: Tensor | None, reduction: str, V: int) -> Tensor:
    """The references' reduction of per-row losses ``d`` ``[...]`` (rows where ``keep`` is False are 0):
    ``"batchmean"`` divides the sum by the kept rows, ``"mean"`` by kept rows times ``V``."""
    if keep is not None:
        d = torch.where(keep, d, torch.zeros((), dtype=d.dtype, device=d.device))
        count = keep.sum().to(d.dtype).clamp_min(1.0)
    else:
        count = torch.tensor(float(max(d.numel(), 1)), dtype=d.dtype, device=d.device)
    if reduction == "none":
        return d
    if reduction == "sum":
        return d.sum()
    if reduction == "batchmean":
        return d.sum() / count
    return d.sum() / (count * V)  # "mean": over all kept elements, as torch.nn.functional.kl_div


# --------------------------------------------------------------------------------------------
# Validation: clear errors that name the argument.
# --------------------------------------------------------------------------------------------
_FLOATS = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))
_NUMBER = (float, int)
# temperature**2 (the loss scale) and 1 / temperature must be finite, nonzero float32 numbers
T_MIN, T_MAX = 1e-18, 1e18


def _check_inputs(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    divergence: str,
    beta: float,
    reduction: str,
    labels: Tensor | None,
    mask: Tensor | None,
    ignore_index: int = -100,
) -> None:
    # The common valid call: a handful of comparisons (this runs on every call; the detailed checks
    # below only run to name what is wrong).
    if (
        labels is None
        and mask is None
        and type(student_logits) is Tensor
        and type(teacher_logits) is Tensor
        and student_logits.dtype in _FLOATS
        and teacher_logits.dtype in _FLOATS
        and student_logits.shape == teacher_logits.shape
        and student_logits.dim() >= 1
        and student_logits.shape[-1] > 0
        and type(temperature) in _NUMBER
        and T_MIN <= temperature <= T_MAX
        and type(beta) in _NUMBER
        and 0.0 <= beta <= 1.0
        and divergence in DIVERGENCES
        and reduction in REDUCTIONS
        and type(ignore_index) is int
        and student_logits.device == teacher_logits.device
    ):
        return
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_float_tensor(x, name)
        if x.dim() < 1:
            raise ValueError(f"{name} must have shape [..., V] with at least one dimension, got a 0-d tensor")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same vocabulary size V (last dimension), got "
            f"{student_logits.shape[-1]} and {teacher_logits.shape[-1]}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have a non-empty last dimension V")
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {student_logits.device} and "
            f"{teacher_logits.device}"
        )
    check_temperature(temperature)
    if not (T_MIN <= temperature <= T_MAX):
        raise ValueError(
            f"temperature must be in [{T_MIN:g}, {T_MAX:g}] (temperature**2 scales the loss and must stay a finite, "
            f"nonzero float32), got {temperature}"
        )
    check_one_of("divergence", divergence, tuple(DIVERGENCES))
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    check_one_of("reduction", reduction, REDUCTIONS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int (the label of rows to exclude), got {ignore_index!r}")
    check_row_selection(
        labels, mask, tuple(student_logits.shape[:-1]), student_logits.device, "the logits' leading shape"
    )


def _check_options(temperature: float, divergence: str, beta: float, reduction: str, ignore_index: int = -100) -> None:
    """The checks of :func:`distill_loss`'s options alone (on a dummy pair of logits): what the
    ``fastkd.nn`` modules run at construction, so that a typo fails there."""
    dummy = torch.zeros(1, 2)
    _check_inputs(dummy, dummy, temperature, divergence, beta, reduction, None, None, ignore_index)


def _keep_rows(labels: Tensor | None, mask: Tensor | None, ignore_index: int) -> Tensor | None:
    keep = None
    if labels is not None:
        keep = labels != ignore_index
    if mask is not None:
        keep = mask if keep is None else keep & mask
    return keep


def _loss_scale(temperature: float, scale_by_t2: bool) -> float:
    """``temperature**2`` (Hinton's factor) or 1, in float64 (validation keeps it a finite float32)."""
    return float(temperature) ** 2 if scale_by_t2 else 1.0


def _row_scale_cached(
    keep: Tensor | None, N: int, V: int, reduction: str, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """:func:`_row_scale`, reused between calls without a mask (the weights then depend on the shape
    only, and no kernel writes them): the eager fast path of this op."""
    if keep is None and not torch.compiler.is_compiling():
        key = (N, V, reduction, device, dtype)
        w = _ROW_SCALES.get(key)
        if w is None:
            if len(_ROW_SCALES) >= 64:
                _ROW_SCALES.clear()
            w = _ROW_SCALES[key] = _row_scale(None, N, V, reduction, device, dtype)
        return w
    return _row_scale(keep, N, V, reduction, device, dtype)


_ROW_SCALES: dict[tuple, Tensor] = {}


def _row_scale(keep: Tensor | None, N: int, V: int, reduction: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Per-row weights of the reduction (float32; float64 for float64 logits), on device, no host sync."""
    if keep is None:
        if reduction == "batchmean":
            return torch.full((N,), 1.0 / max(N, 1), device=device, dtype=dtype)
        if reduction == "mean":
            return torch.full((N,), 1.0 / max(N * V, 1), device=device, dtype=dtype)
        return torch.ones(N, device=device, dtype=dtype)
    k = keep.reshape(N).to(dtype)
    if reduction == "batchmean":
        return k / k.sum().clamp_min(1.0)
    if reduction == "mean":
        return k / (k.sum() * V).clamp_min(1.0)
    return k


# --------------------------------------------------------------------------------------------
# Registration of the fused ops: fake tensors (torch.compile) and autograd.
# --------------------------------------------------------------------------------------------
def _fake(student, teacher, row_scale, temperature, divergence, beta, loss_scale, reduce, grad_student, grad_teacher):
    N = student.shape[0]
    loss = student.new_empty(() if reduce else (N,), dtype=acc_dtype(student.dtype))
    gs = torch.empty_like(student) if grad_student else student.new_empty((0,))
    gt = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    return loss, gs, gt


def _setup_context(ctx, inputs, output) -> None:
    _, gs, gt = output
    ctx.grad_student, ctx.grad_teacher = bool(inputs[8]), bool(inputs[9])
    # The gradient buffers are results, not functions of the inputs to differentiate through; marking
    # them keeps the gradients that backward hands out free of this op's graph.
    ctx.mark_non_differentiable(gs, gt)
    # Backward never reads the (unused) upstream gradients of gs and gt: do not let autograd
    # allocate zero-filled [N, V] tensors for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gs, gt)


def _make_backward(backend: str | None):
    """The registered backward: ``scale_saved_grads`` (in place eagerly, out of place under tracing)."""

    def backward(ctx, g_loss, _g_gs, _g_gt):
        if g_loss is None:  # the loss itself did not reach the output (materialize_grads is off)
            return (None,) * 10
        gs, gt = ctx.saved_tensors
        d_s, d_t = scale_saved_grads(
            (gs if ctx.grad_student else None, gt if ctx.grad_teacher else None), g_loss, backend
        )
        return d_s, d_t, None, None, None, None, None, None, None, None

    return backward


register_compiled("distill_loss", _fake, _setup_context, lambda: _make_backward(None))


def _define_triton_op():
    """The Triton custom op (through :data:`_triton_op`, on first use: importing triton is not free)."""
    from fastkd.kernels import distill_loss as tk

    @torch.library.custom_op("fastkd::distill_loss_triton", mutates_args=())
    def distill_loss_triton(
        student: Tensor,
        teacher: Tensor,
        row_scale: Tensor,
        temperature: float,
        divergence: int,
        beta: float,
        loss_scale: float,
        reduce: bool,
        grad_student: bool,
        grad_teacher: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return tk.distill_loss_forward(
            student, teacher, row_scale, temperature, divergence, beta, loss_scale, reduce, grad_student, grad_teacher
        )

    return distill_loss_triton


_triton_op = lazy_triton_op(_define_triton_op, _fake, _setup_context, lambda op: _make_backward("triton"))


class _EagerFusedLoss(torch.autograd.Function):
    """The eager fast path: the same ``torch.ops.fastkd.*`` op and the same backward helper as the
    registered autograd, without ``torch.library``'s Python autograd wrapper (about 100 us per call,
    as much as the whole loss at classification sizes). Under ``torch.compile`` the registered
    autograd runs instead, so the op is traced without graph breaks.
    """

    @staticmethod
    def forward(ctx, student, teacher, extra):
        # extra = (op, backend, row_scale, the op's other arguments): one argument, not four, for
        # Function.apply to inspect. Grad mode is off in here: a registered autograd passes straight
        # to the kernel, after its Python wrapper's pytree walk; on CPU ``op`` is the kernel's twin
        # without an autograd registration (_distill_loss_eager), which skips that walk too.
        op, backend, row_scale, rest = extra
        loss, gs, gt = op(student, teacher, row_scale, *rest)
        ctx.backend = backend
        ctx.save_for_backward(gs if rest[-2] else None, gt if rest[-1] else None)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        d_s, d_t = scale_saved_grads(ctx.saved_tensors, g_loss, ctx.backend)
        return d_s, d_t, None


# --------------------------------------------------------------------------------------------
# Backends and the public function.
# --------------------------------------------------------------------------------------------
def _fused(
    op: Callable,
    eager_op: Callable | None,
    scale_backend: str | None,
    student_logits: Tensor,
    teacher_logits: Tensor,
    keep: Tensor | None,
    temperature: float,
    divergence: str,
    beta: float,
    reduction: str,
    scale_by_t2: bool,
) -> Tensor:
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    if teacher_logits.dtype != student_logits.dtype:
        teacher_logits = teacher_logits.to(student_logits.dtype)
    two_d = student_logits.dim() == 2
    s2 = student_logits if two_d else student_logits.reshape(-1, V)
    t2 = teacher_logits if two_d else teacher_logits.reshape(-1, V)
    if s2.stride(-1) != 1 or s2.stride(0) != V:
        s2 = s2.contiguous()
    if t2.stride(-1) != 1 or t2.stride(0) != V:
        t2 = t2.contiguous()
    N = s2.shape[0]
    row_scale = _row_scale_cached(keep, N, V, reduction, s2.device, acc_dtype(s2.dtype))
    grad = torch.is_grad_enabled()
    g_s, g_t = grad and student_logits.requires_grad, grad and teacher_logits.requires_grad
    div = DIVERGENCES[_effective_divergence(divergence, beta)]
    args = (
        float(temperature), div, float(beta), _loss_scale(temperature, scale_by_t2), reduction != "none", g_s, g_t,
    )  # fmt: skip
    if (g_s or g_t) and not torch.compiler.is_compiling():
        loss = _EagerFusedLoss.apply(s2, t2, (eager_op or op, scale_backend, row_scale, args))
    else:
        loss, _, _ = op(s2, t2, row_scale, *args)
    return loss.reshape(lead) if reduction == "none" else loss


@OP.register("torch")
def _torch_impl(student_logits, teacher_logits, keep, temperature, divergence, beta, reduction, scale_by_t2):
    out = reference_distill_loss(
        student_logits, teacher_logits, temperature=temperature, divergence=divergence, beta=beta,
        reduction=reduction, keep=keep, scale_by_t2=scale_by_t2,
    )  # fmt: skip
    return out.to(torch.float32) if out.dtype != torch.float64 else out


@OP.register("cpu", "cuda")  # fastkd._C: the dispatcher picks the CPU or CUDA kernel
def _compiled_impl(*args):
    # On CPU the eager path calls the kernel's twin without an autograd registration (csrc/distill_loss.cpp:
    # _distill_loss_eager), skipping torch.library's Python autograd wrapper; CUDA keeps distill_loss.
    eager = torch.ops.fastkd._distill_loss_eager.default if args[0].device.type == "cpu" else None
    return _fused(torch.ops.fastkd.distill_loss.default, eager, None, *args)


@OP.register("triton", prepare=_triton_op)  # defines the custom op outside traced code
def _triton_impl(*args):
    return _fused(_triton_op(), None, "triton", *args)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Distillation loss between raw student and teacher logits, fused into one pass.

    Args:
        student_logits, teacher_logits: ``[..., V]`` raw logits (float32, bfloat16, float16, float64),
            same shape and device. A teacher of another dtype is cast
            to the student's.
        temperature: divides both logit sets (> 0).
        divergence: ``"kl"`` = KL(teacher || student) (Hinton KD), ``"reverse_kl"`` =
            KL(student || teacher), ``"jsd"`` = generalised JSD:
            ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``,
            p the teacher's and q the student's distribution; ``beta=0`` gives ``"kl"`` and
            ``beta=1`` ``"reverse_kl"`` (the convention of TRL's GKD loss).
        reduction: ``"batchmean"`` (sum / kept rows), ``"mean"`` (sum / (kept rows * V)), ``"sum"``,
            ``"none"`` (per row, shape ``[...]``; excluded rows are 0).
        ignore_index, labels: rows with ``labels == ignore_index`` are excluded.
        mask: boolean ``[...]``, False rows are excluded. With every row excluded, ``batchmean`` and
            ``mean`` return 0 with zero gradients.
        scale_by_t2: multiply by ``temperature**2`` (Hinton's convention, keeps gradient scale
            independent of T).
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (automatic; also
            ``FASTKD_BACKEND``).

    Gradients flow to the student logits and, when ``teacher_logits.requires_grad``, to the
    teacher logits, computed in the forward pass. The loss and all accumulation are float32
    (float64 for float64 inputs).

    Non-finite logits: a ``-inf`` logit is a zero probability and contributes nothing, so a
    vocabulary entry masked at ``-inf`` in both logit sets is legitimate (its gradients are 0). A
    ``-inf`` student logit where the teacher has mass makes ``"kl"`` infinite (the student gradient
    stays finite). ``+inf`` is not a probability: that row's loss is NaN. NaN in a kept row
    propagates to the loss and gradients (never silently 0); excluded rows are not read, so NaN or
    inf there changes nothing.

    The fused backends compute the gradients in the forward pass and scale them in place in
    backward, so a second backward through the same graph (``retain_graph=True``) raises.
    """
    _check_inputs(student_logits, teacher_logits, temperature, divergence, beta, reduction, labels, mask, ignore_index)
    keep = _keep_rows(labels, mask, ignore_index)
    args = (student_logits, teacher_logits, keep, temperature, divergence, beta, reduction, scale_by_t2)
    return OP(OP.pick(student_logits.device, backend, args), *args)
