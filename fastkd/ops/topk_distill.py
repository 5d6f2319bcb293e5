"""``fastkd.topk_distill_loss``: forward KL(teacher || student) against a sparse, top-K teacher.

Layers (one file each): ``kernels/topk_distill.py`` (Triton), ``csrc/topk_distill.cpp`` (C++ CPU),
``csrc/topk_distill_cuda.cu`` (CUDA), and this module: the pure-PyTorch reference, input validation,
registration with ``torch.library`` (fake tensors, autograd) and backend dispatch. The math and
the gradient are written above the kernels (``csrc/topk_distill.cpp``, ``kernels/topk_distill.py``).

The fused backends share one op schema::

    topk_distill(Tensor student, Tensor ids, Tensor teacher, Tensor? lse, Tensor row_scale,
                 float temperature, float loss_scale, bool reduce, bool grad_student)
        -> (Tensor loss, Tensor grad_student)

on ``[N, V]`` student logits, ``[N, K]`` int64 ids and ``[N, K]`` teacher logits (float32; float64
for float64 students). Like ``fastkd.distill_loss`` the forward writes the gradient, already scaled
by the reduction weights; backward scales it in place by the upstream gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastkd.backends import Op
from fastkd.ops import distill_loss as _dl
from fastkd.ops._common import (
    acc_dtype,
    check_one_of,
    check_row_selection,
    check_temperature,
    lazy_triton_op,
    register_compiled,
)
from fastkd.ops.distill_loss import REDUCTIONS, _keep_rows, _loss_scale, _reduce_rows, _row_scale
from fastkd.ops.scale_grad import scale_saved_grads

OP = Op("topk_distill")


# --------------------------------------------------------------------------------------------
# Reference (pure PyTorch).
# --------------------------------------------------------------------------------------------
def tail_tolerance(dtype: torch.dtype) -> float:
    """A teacher tail mass r = 1 - sum p_k at or below this is rounding and counts as 0 (every backend)."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def topk_divergence_rows(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    teacher_logsumexp: Tensor | None,
    temperature: float,
) -> Tensor:
    """Per-row KL(teacher || student) with a top-K teacher (no T^2), shape ``[...]``, in >= fp32."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    ls = torch.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    lq = ls.gather(-1, teacher_ids.long())
    t = teacher_logits.to(dt) / temperature
    if teacher_logsumexp is None:
        lp = torch.log_softmax(t, dim=-1)
    else:
        lp = t - teacher_logsumexp.to(dt).unsqueeze(-1)
    p = lp.exp()
    d = _dl._xlogy_diff(p, lp, lq).sum(-1)
    if teacher_logsumexp is not None:
        r = (1.0 - p.sum(-1)).clamp_min(0.0)
        q_tail = (1.0 - lq.exp().sum(-1)).clamp_min(0.0)
        pos = r > tail_tolerance(dt)  # below it the tail mass is rounding (e.g. K = V)
        one = torch.ones((), dtype=dt, device=d.device)
        d = d + torch.where(
            pos, r * (torch.log(torch.where(pos, r, one)) - torch.log(torch.where(pos, q_tail, one))), 0.0
        )
    return d


def reference_topk_distill_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    *,
    teacher_logsumexp: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    keep: Tensor | None = None,
    scale_by_t2: bool = True,
) -> Tensor:
    """The pure-PyTorch top-K distillation loss (differentiable through autograd to the student)."""
    if keep is not None:
        k = keep.unsqueeze(-1)
        student_logits = torch.where(k, student_logits, student_logits.new_zeros(()))
        teacher_logits = torch.where(k, teacher_logits, teacher_logits.new_zeros(()))
        if teacher_logsumexp is not None:
            # a stored logsumexp consistent with the zeroed teacher row: no tail mass there
            teacher_logsumexp = torch.where(keep, teacher_logsumexp, torch.logsumexp(teacher_logits / temperature, -1))
    d = topk_divergence_rows(student_logits, teacher_ids, teacher_logits, teacher_logsumexp, temperature)
    if scale_by_t2:
        d = d * (temperature * temperature)
    return _reduce_rows(d, keep, reduction, student_logits.shape[-1])


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------
def _check_topk(
    lead: tuple,
    V: int,
    device: torch.device,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    teacher_logsumexp: Tensor | None,
    what: str = "",
) -> None:
    pre = what
    if (
        not isinstance(teacher_ids, Tensor)
        or teacher_ids.is_floating_point()
        or teacher_ids.is_complex()
        or (teacher_ids.dtype == torch.bool)
    ):
        raise TypeError(
            f"{pre}teacher_ids must be an integer tensor [..., K], got "
            f"{teacher_ids.dtype if isinstance(teacher_ids, Tensor) else type(teacher_ids).__name__}"
        )
    if teacher_ids.dim() < 1 or tuple(teacher_ids.shape[:-1]) != lead:
        raise ValueError(f"{pre}teacher_ids must have shape {lead + ('K',)}, got {tuple(teacher_ids.shape)}")
    K = teacher_ids.shape[-1]
    if not 1 <= K <= V:
        raise ValueError(f"{pre}teacher_ids must have 1 <= K <= V = {V} columns, got K = {K}")
    if not isinstance(teacher_logits, Tensor) or not teacher_logits.is_floating_point():
        raise TypeError(
            f"{pre}teacher_logits must be a floating-point tensor, got "
            f"{teacher_logits.dtype if isinstance(teacher_logits, Tensor) else type(teacher_logits).__name__}"
        )
    if teacher_logits.shape != teacher_ids.shape:
        raise ValueError(
            f"{pre}teacher_logits must have the shape of teacher_ids {tuple(teacher_ids.shape)}, got "
            f"{tuple(teacher_logits.shape)}"
        )
    if teacher_logsumexp is not None:
        if not isinstance(teacher_logsumexp, Tensor) or not teacher_logsumexp.is_floating_point():
            raise TypeError(f"{pre}teacher_logsumexp must be a floating-point tensor of shape {lead}")
        if tuple(teacher_logsumexp.shape) != lead:
            raise ValueError(f"{pre}teacher_logsumexp must have shape {lead}, got {tuple(teacher_logsumexp.shape)}")
    for name, x in (
        ("teacher_ids", teacher_ids),
        ("teacher_logits", teacher_logits),
        ("teacher_logsumexp", teacher_logsumexp),
    ):
        if x is not None and x.device != device:
            raise ValueError(f"{pre}{name} must be on {device}, got {x.device}")
    if not torch.compiler.is_compiling() and teacher_ids.numel() > 0:
        lo, hi = int(teacher_ids.min()), int(teacher_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{pre}teacher_ids must lie in [0, V) = [0, {V}), got values in [{lo}, {hi}]")


def _check_common(temperature, reduction, labels, mask, lead, device) -> None:
    check_temperature(temperature)
    check_one_of("reduction", reduction, REDUCTIONS)
    check_row_selection(labels, mask, lead, device)


def _check_inputs(student_logits, teacher_ids, teacher_logits, teacher_logsumexp, temperature, reduction, labels, mask):
    if not isinstance(student_logits, Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating-point tensor, got {student_logits.dtype}")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must have shape [..., V] with V >= 1, got {tuple(student_logits.shape)}")
    lead = tuple(student_logits.shape[:-1])
    _check_topk(lead, student_logits.shape[-1], student_logits.device, teacher_ids, teacher_logits, teacher_logsumexp)
    _check_common(temperature, reduction, labels, mask, lead, student_logits.device)


# --------------------------------------------------------------------------------------------
# Registration: fake tensors and autograd.
# --------------------------------------------------------------------------------------------
def _fake(student, ids, teacher, lse, row_scale, temperature, loss_scale, reduce, grad_student):
    N = student.shape[0]
    loss = student.new_empty(() if reduce else (N,), dtype=acc_dtype(student.dtype))
    g = torch.empty_like(student) if grad_student else student.new_empty((0,))
    return loss, g


def _setup_context(ctx, inputs, output) -> None:
    _, g = output
    ctx.grad_student = bool(inputs[8])
    ctx.mark_non_differentiable(g)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(g)


def _make_backward(backend: str | None):
    """The registered backward: ``scale_saved_grads`` (in place eagerly, out of place under tracing)."""

    def backward(ctx, g_loss, _g_g):
        if g_loss is None or not ctx.grad_student:
            return (None,) * 9
        (g,) = ctx.saved_tensors
        (d,) = scale_saved_grads([g], g_loss, backend)
        return d, None, None, None, None, None, None, None, None

    return backward


register_compiled("topk_distill", _fake, _setup_context, lambda: _make_backward(None))


def _define_triton_op():
    from fastkd.kernels import topk_distill as tk

    @torch.library.custom_op("fastkd::topk_distill_triton", mutates_args=())
    def topk_distill_triton(
        student: Tensor,
        ids: Tensor,
        teacher: Tensor,
        lse: Tensor | None,
        row_scale: Tensor,
        temperature: float,
        loss_scale: float,
        reduce: bool,
        grad_student: bool,
    ) -> tuple[Tensor, Tensor]:
        return tk.topk_distill_forward(
            student, ids, teacher, lse, row_scale, temperature, loss_scale, reduce, grad_student
        )

    return topk_distill_triton


_triton_op = lazy_triton_op(_define_triton_op, _fake, _setup_context, lambda op: _make_backward("triton"))


# --------------------------------------------------------------------------------------------
# Backends and the public function.
# --------------------------------------------------------------------------------------------
def prepare_topk(ids: Tensor, logits: Tensor, lse: Tensor | None, acc: torch.dtype, N: int):
    """Flattened, contiguous int64 ids and ``acc`` logits / logsumexp as the kernels take them."""
    K = ids.shape[-1]
    ids2 = ids.reshape(N, K).to(torch.int64).contiguous()
    tv2 = logits.detach().reshape(N, K).to(acc).contiguous()
    lse2 = None if lse is None else lse.detach().reshape(N).to(acc).contiguous()
    return ids2, tv2, lse2


def _fused(
    op, student_logits, teacher_ids, teacher_logits, teacher_logsumexp, keep, temperature, reduction, scale_by_t2
):
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    s2 = student_logits.reshape(-1, V)
    if not s2.is_contiguous():
        s2 = s2.contiguous()
    N = s2.shape[0]
    acc = acc_dtype(s2.dtype)
    ids2, tv2, lse2 = prepare_topk(teacher_ids, teacher_logits, teacher_logsumexp, acc, N)
    row_scale = _row_scale(keep, N, V, reduction, s2.device, acc)
    loss, _ = op(
        s2, ids2, tv2, lse2, row_scale, float(temperature), _loss_scale(temperature, scale_by_t2),
        reduction != "none", student_logits.requires_grad and torch.is_grad_enabled(),
    )  # fmt: skip
    return loss.reshape(lead) if reduction == "none" else loss


@OP.register("torch")
def _torch_impl(
    student_logits, teacher_ids, teacher_logits, teacher_logsumexp, keep, temperature, reduction, scale_by_t2
):
    out = reference_topk_distill_loss(
        student_logits, teacher_ids, teacher_logits.detach(),
        teacher_logsumexp=None if teacher_logsumexp is None else teacher_logsumexp.detach(),
        temperature=temperature, reduction=reduction, keep=keep, scale_by_t2=scale_by_t2,
    )  # fmt: skip
    return out.to(torch.float32) if out.dtype != torch.float64 else out


@OP.register("cpu", "cuda")
def _compiled_impl(*args):
    return _fused(torch.ops.fastkd.topk_distill, *args)


@OP.register("triton", prepare=_triton_op)
def _triton_impl(*args):
    return _fused(_triton_op(), *args)


def topk_distill_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    *,
    teacher_logsumexp: Tensor | None = None,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
    scale_by_t2: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Forward KL(teacher || student) with a sparse teacher: its top-K logits only.

    Args:
        student_logits: ``[..., V]`` raw student logits (float32, bfloat16, float16, float64).
        teacher_ids: ``[..., K]`` integer ids of the teacher's kept entries (distinct within a row,
            ``0 <= id < V``; int32 as stored by ``fastkd logits`` is fine).
        teacher_logits: ``[..., K]`` the teacher's raw logits at ``teacher_ids`` (constants: no
            gradient reaches them).
        teacher_logsumexp: optional ``[...]``, the logsumexp over the full vocabulary of the
            teacher's logits divided by ``temperature`` (as ``fastkd logits`` stores it). Without it
            the teacher's top-K is renormalised: ``p = softmax(teacher_logits / T)`` over K. With it
            ``p_k = exp(teacher_logits_k / T - lse)`` and the teacher's tail mass
            ``r = 1 - sum p_k`` is matched against the student's tail mass ``1 - sum q_k``: the loss
            adds ``r log(r / q_tail)`` (a tail mass at most 1e-6, 1e-12 in float64, is rounding and
            counts as 0). With K = V and the stored logsumexp this is exactly
            :func:`fastkd.distill_loss` with ``divergence="kl"``.
        temperature, labels, ignore_index, mask, reduction, scale_by_t2, backend: as in
            :func:`fastkd.distill_loss` (``"mean"`` divides by kept rows times V).

    Gradients flow to ``student_logits`` only, computed in the forward pass (one pass over the
    student row for its logsumexp, plus the K gathered entries); the math is written above the
    kernels in ``csrc/topk_distill.cpp``.
    """
    _check_inputs(student_logits, teacher_ids, teacher_logits, teacher_logsumexp, temperature, reduction, labels, mask)
    keep = _keep_rows(labels, mask, ignore_index)
    name = OP.pick(student_logits.device, backend)
    return OP(
        name, student_logits, teacher_ids, teacher_logits, teacher_logsumexp, keep, temperature, reduction, scale_by_t2
    )
