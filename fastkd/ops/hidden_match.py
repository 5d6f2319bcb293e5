"""``fastkd.hidden_match``: fused multi-layer hidden-state matching (projection + MSE / cosine / NMSE).

Layers (one file each): ``kernels/hidden_match.py`` (Triton), ``csrc/hidden_match.cpp`` (C++ CPU),
``csrc/hidden_match_cuda.cu`` (CUDA), ``csrc/hidden_match.h`` (the per-row math both C++ kernels share),
and this module: the pure-PyTorch reference, input validation, registration with ``torch.library``
(fake tensors, autograd) and backend dispatch.

All fused backends share one op schema::

    hidden_match(Tensor student [L, N, Hs], Tensor teacher [L, N, Ht], Tensor? weight, Tensor? bias,
                 Tensor row_scale [L, N], int loss, float eps, bool reduce, bool grad_student,
                 bool grad_weight, bool grad_bias, bool grad_teacher)
        -> (Tensor loss, Tensor grad_student, Tensor grad_weight, Tensor grad_bias, Tensor grad_teacher)

``row_scale`` holds the reduction weights (layer weight x mask / count). With ``reduce`` the op
returns the weighted sum and, in the same call, the gradients of that sum for the inputs whose
flag is set (the projected states exist one tile or one layer group at a time and are never kept);
backward then scales them in place by the upstream gradient (``fastkd.ops.scale_grad``, shared with
``distill_loss``; no work when that gradient is the scalar 1). Recomputing in backward instead would repeat the projection GEMM, a
third more matmul FLOPs than this op needs in total (3 GEMMs: P, dS, dW). Without ``reduce``
(``reduction="none"``) the forward only computes the per-row losses and backward calls the op again
with ``row_scale`` multiplied by the upstream gradient.

Backward through one graph twice (``retain_graph=True``): with an upstream gradient of exactly 1 on
CPU the saved gradients are returned untouched, so it works; otherwise the first backward scales
them in place and bumps their version, and the second one fails autograd's "modified by an inplace
operation" check (it never scales twice). ``reduction="none"`` recomputes and always works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastkd.backends import Op
from fastkd.ops._common import acc_dtype, check_float_tensor, check_one_of, lazy_triton_op, register_compiled
from fastkd.ops.scale_grad import scale_saved_grads

LOSSES: dict[str, int] = {"mse": 0, "cosine": 1, "nmse": 2}
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
DEFAULT_EPS = 1e-8

OP = Op("hidden_match")

StateArg = Tensor | Sequence[Tensor]


# --------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the CPU fallback, the test oracle and the benchmark baseline.
# --------------------------------------------------------------------------------------------
def loss_rows(projected: Tensor, teacher: Tensor, loss: str, eps: float = DEFAULT_EPS) -> Tensor:
    """Per-row loss ``[...]`` between projected student rows and teacher rows ``[..., H]``."""
    if loss == "mse":
        return (projected - teacher).pow(2).mean(-1)
    n_p = torch.linalg.vector_norm(projected, dim=-1, keepdim=True).clamp_min(eps)
    n_t = torch.linalg.vector_norm(teacher, dim=-1, keepdim=True).clamp_min(eps)
    if loss == "cosine":
        return 1.0 - (projected * teacher).sum(-1) / (n_p * n_t).squeeze(-1)
    return (projected / n_p - teacher / n_t).pow(2).mean(-1)  # nmse


def _layer_param(x: Tensor | None, layer: int, full_dim: int) -> Tensor | None:
    if x is None:
        return None
    return x[layer] if x.dim() == full_dim else x


def reference_hidden_match(
    student_states: StateArg,
    teacher_states: StateArg,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    loss: str = "mse",
    mask: Tensor | None = None,
    layer_weights: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """The pure-PyTorch hidden-state matching loss: a Python loop over layers, as toolkits write it.

    Same arguments and result as :func:`hidden_match` (differentiable through autograd; no input
    validation). The projection runs in the input dtype (``F.linear``), the loss in float32, or
    float64 for float64 inputs.
    """
    S = list(student_states) if not isinstance(student_states, Tensor) else list(student_states.unbind(0))
    T = list(teacher_states) if not isinstance(teacher_states, Tensor) else list(teacher_states.unbind(0))
    L = len(S)
    acc = torch.float64 if S[0].dtype == torch.float64 else torch.float32
    lw = _layer_weight_values(layer_weights, L)
    keep = None if mask is None else mask != 0
    rows = []
    for layer in range(L):
        w = _layer_param(weight, layer, 3)
        b = _layer_param(bias, layer, 2)
        s = S[layer]
        if w is not None:
            p = torch.nn.functional.linear(s, w.to(s.dtype), None if b is None else b.to(s.dtype))
        else:
            p = s if b is None else s + b.to(s.dtype)
        t = T[layer].to(acc)
        if keep is not None:  # padded teacher rows are never read (they may hold anything)
            t = torch.where(keep[..., None], t, torch.zeros((), dtype=acc, device=t.device))
        r = loss_rows(p.to(acc), t, loss, eps)
        if keep is not None:
            r = torch.where(keep, r, torch.zeros((), dtype=acc, device=r.device))
        rows.append(r * lw[layer] if lw is not None else r)
    if reduction == "none":
        return torch.stack(rows)
    total = torch.stack([r.sum() for r in rows]).sum()
    if reduction == "sum":
        return total
    count = max(rows[0].numel(), 1) if keep is None else keep.sum().to(acc).clamp_min(1.0)
    return total / (count * L)  # no token (N = 0): 0, as the fused backends


def _layer_weight_values(layer_weights, L: int) -> list[float] | Tensor | None:
    if layer_weights is None:
        return None
    if isinstance(layer_weights, Tensor):
        return layer_weights.detach()
    return [float(x) for x in layer_weights]


# --------------------------------------------------------------------------------------------
# Validation: clear errors that name the argument.
# --------------------------------------------------------------------------------------------
def _stack_states(states: StateArg, name: str) -> Tensor:
    """``[L, ..., H]`` from a tensor or a sequence of L tensors ``[..., H]`` (stacked: a copy)."""
    if isinstance(states, Tensor):
        check_float_tensor(states, name)
        if states.dim() < 3:
            raise ValueError(
                f"{name} must be [L, B, T, H] (or [L, N, H]) or a sequence of L tensors [B, T, H], got shape "
                f"{tuple(states.shape)}"
            )
        return states
    if not isinstance(states, (list, tuple)):
        raise TypeError(f"{name} must be a tensor [L, B, T, H] or a sequence of tensors, got {type(states).__name__}")
    if len(states) == 0:
        raise ValueError(f"{name} must hold at least one layer, got an empty sequence")
    for i, x in enumerate(states):
        check_float_tensor(x, f"{name}[{i}]")
        if x.dim() < 2:
            raise ValueError(f"{name}[{i}] must be [B, T, H] (or [N, H]), got shape {tuple(x.shape)}")
        if x.shape != states[0].shape or x.device != states[0].device:
            raise ValueError(
                f"{name}[{i}] must have the shape and device of {name}[0], got {tuple(x.shape)} on {x.device}, "
                f"expected {tuple(states[0].shape)} on {states[0].device}"
            )
        if x.dtype != states[0].dtype:
            raise TypeError(f"{name}[{i}] must have the dtype of {name}[0] ({states[0].dtype}), got {x.dtype}")
    return torch.stack(list(states))


def _check_inputs(
    S: Tensor,
    T: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    loss: str,
    mask: Tensor | None,
    layer_weights,
    reduction: str,
    eps: float,
) -> None:
    L, Hs, Ht = S.shape[0], S.shape[-1], T.shape[-1]
    if L == 0:
        raise ValueError(f"student_states must hold at least one layer, got L = 0 (shape {tuple(S.shape)})")
    if T.shape[0] != L:
        raise ValueError(
            f"student_states and teacher_states must have the same number of layers, got {L} and {T.shape[0]}"
        )
    if S.shape[1:-1] != T.shape[1:-1]:
        raise ValueError(
            f"student_states and teacher_states must have the same batch shape, got {tuple(S.shape[1:-1])} and "
            f"{tuple(T.shape[1:-1])}"
        )
    if T.device != S.device:
        raise ValueError(f"teacher_states must be on the student_states' device {S.device}, got {T.device}")
    if Hs == 0 or Ht == 0:
        raise ValueError(f"student_states and teacher_states must have non-empty hidden sizes, got {Hs} and {Ht}")
    if weight is None:
        if Hs != Ht:
            raise ValueError(
                f"weight is None, so student and teacher widths must match, got Hs={Hs} and Ht={Ht}; pass a "
                f"projection weight [L, Ht, Hs] or [Ht, Hs]"
            )
    else:
        check_float_tensor(weight, "weight")
        if weight.device != S.device:
            raise ValueError(f"weight must be on the student_states' device {S.device}, got {weight.device}")
        if tuple(weight.shape) not in ((L, Ht, Hs), (Ht, Hs)):
            raise ValueError(
                f"weight must be [L, Ht, Hs] = {(L, Ht, Hs)} (one projection per layer) or [Ht, Hs] = {(Ht, Hs)} "
                f"(shared), got {tuple(weight.shape)}"
            )
    if bias is not None:
        check_float_tensor(bias, "bias")
        if bias.device != S.device:
            raise ValueError(f"bias must be on the student_states' device {S.device}, got {bias.device}")
        if tuple(bias.shape) not in ((L, Ht), (Ht,)):
            raise ValueError(f"bias must be [L, Ht] = {(L, Ht)} or [Ht] = {(Ht,)}, got {tuple(bias.shape)}")
    check_one_of("loss", loss, tuple(LOSSES))
    check_one_of("reduction", reduction, REDUCTIONS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    lead = tuple(S.shape[1:-1])
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
            raise TypeError(
                f"mask must be a boolean or integer tensor of shape {lead} (nonzero = keep the token, e.g. an "
                f"attention_mask), got {mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have the states' batch shape {lead}, got {tuple(mask.shape)}")
        if mask.device != S.device:
            raise ValueError(f"mask must be on the student_states' device {S.device}, got {mask.device}")
    if layer_weights is not None:
        if isinstance(layer_weights, Tensor):
            if layer_weights.dim() != 1 or layer_weights.shape[0] != L or not layer_weights.is_floating_point():
                raise ValueError(
                    f"layer_weights must be a floating-point tensor [L] = [{L}], got {layer_weights.dtype} "
                    f"{tuple(layer_weights.shape)}"
                )
            if layer_weights.device != S.device:
                raise ValueError(f"layer_weights must be on {S.device}, got {layer_weights.device}")
            # a host read of L numbers (a synchronisation on a GPU): NaN weights would silently poison the loss
            if not bool(torch.isfinite(layer_weights.detach()).all()):
                raise ValueError(f"layer_weights must be finite, got {layer_weights.detach().cpu().tolist()}")
        else:
            try:
                vals = [float(x) for x in layer_weights]
            except (TypeError, ValueError):
                raise TypeError(
                    f"layer_weights must be a sequence of L={L} numbers or a tensor [L], got {layer_weights!r}"
                ) from None
            if len(vals) != L:
                raise ValueError(f"layer_weights must have one weight per layer (L={L}), got {len(vals)}")
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"layer_weights must be finite, got {vals}")


def _row_scale(
    keep: Tensor | None, layer_weights, L: int, N: int, reduction: str, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Reduction weights ``[L, N]`` (float32; float64 for float64 states), on device, no host sync."""
    if layer_weights is None:
        lw = torch.ones(L, device=device, dtype=dtype)
    elif isinstance(layer_weights, Tensor):
        lw = layer_weights.detach().to(device=device, dtype=dtype)
    else:
        lw = torch.tensor([float(x) for x in layer_weights], device=device, dtype=dtype)
    k = torch.ones(N, device=device, dtype=dtype) if keep is None else keep.reshape(N).to(dtype)
    if reduction == "mean":
        count = torch.tensor(float(max(N, 1)), device=device, dtype=dtype) if keep is None else k.sum().clamp_min(1.0)
        k = k / (count * L)
    return (lw[:, None] * k[None, :]).contiguous()


# --------------------------------------------------------------------------------------------
# Registration of the fused ops: fake tensors (torch.compile) and autograd.
# --------------------------------------------------------------------------------------------
def _fake(student, teacher, weight, bias, row_scale, loss, eps, reduce, grad_s, grad_w, grad_b, grad_t):
    L, N = student.shape[0], student.shape[1]
    out = student.new_empty(() if reduce else (L, N), dtype=acc_dtype(student.dtype))
    gs = torch.empty_like(student) if grad_s else student.new_empty((0,))
    gw = torch.empty_like(weight) if (grad_w and weight is not None) else student.new_empty((0,))
    gb = torch.empty_like(bias) if (grad_b and bias is not None) else student.new_empty((0,))
    gt = torch.empty_like(teacher) if grad_t else teacher.new_empty((0,))
    return out, gs, gw, gb, gt


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, weight, bias, row_scale, loss, eps, reduce, grad_s, grad_w, grad_b, grad_t = inputs
    _, gs, gw, gb, gt = output
    # The gradient outputs carry no gradient of their own, and backward must not receive
    # materialised zero gradients for them (that would allocate a zero copy of every gradient).
    ctx.mark_non_differentiable(gs, gw, gb, gt)
    ctx.set_materialize_grads(False)
    ctx.loss, ctx.eps = loss, eps
    computed = (bool(grad_s), bool(grad_w) and weight is not None, bool(grad_b) and bias is not None, bool(grad_t))
    ctx.computed = computed
    ctx.reduce = bool(reduce)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    # With reduction backward only needs the gradients computed here; without it backward calls the
    # op again, so it keeps the inputs (references, not copies).
    if ctx.reduce:
        ctx.save_for_backward(gs, gw, gb, gt)
    else:
        ctx.save_for_backward(student, teacher, weight, bias, row_scale)


def _make_backward(op: Callable, backend: str | None):
    def backward(ctx, g_loss, _gs, _gw, _gb, _gt):
        if g_loss is None:  # the loss itself received no gradient
            return (None,) * 12
        need = ctx.needs_input_grad
        want = (need[0], need[2] and ctx.has_weight, need[3] and ctx.has_bias, need[1])
        if ctx.reduce:
            if any(w and not c for w, c in zip(want, ctx.computed)):
                raise RuntimeError(
                    "fastkd.hidden_match: a gradient was requested for an input whose grad_* flag was False in the "
                    "forward; pass the flags that match requires_grad (fastkd.hidden_match does)"
                )
            grads = [g if w else None for g, w in zip(ctx.saved_tensors, want)]
            # The saved gradients are this op's own outputs: the shared helper scales them (in place
            # eagerly, bumping their version; untouched for a CPU upstream gradient of exactly 1).
            d_s, d_w, d_b, d_t = scale_saved_grads(grads, g_loss, backend)
        else:
            student, teacher, weight, bias, row_scale = ctx.saved_tensors
            rs = (row_scale * g_loss.to(row_scale.dtype)).contiguous()
            _, d_s, d_w, d_b, d_t = op(student, teacher, weight, bias, rs, ctx.loss, ctx.eps, True, *want)
            d_s, d_w, d_b, d_t = (g if w else None for g, w in zip((d_s, d_w, d_b, d_t), want))
        return d_s, d_t, d_w, d_b, None, None, None, None, None, None, None, None

    return backward


register_compiled("hidden_match", _fake, _setup_context, lambda: _make_backward(torch.ops.fastkd.hidden_match, None))


def _define_triton_op():
    """The Triton custom op (through :data:`_triton_op`, on first use: importing triton is not free)."""
    from fastkd.kernels import hidden_match as tk

    @torch.library.custom_op("fastkd::hidden_match_triton", mutates_args=())
    def hidden_match_triton(
        student: Tensor,
        teacher: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        row_scale: Tensor,
        loss: int,
        eps: float,
        reduce: bool,
        grad_student: bool,
        grad_weight: bool,
        grad_bias: bool,
        grad_teacher: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return tk.hidden_match_forward(
            student, teacher, weight, bias, row_scale, loss, eps, reduce, grad_student, grad_weight, grad_bias,
            grad_teacher,
        )  # fmt: skip

    return hidden_match_triton


_triton_op = lazy_triton_op(_define_triton_op, _fake, _setup_context, lambda op: _make_backward(op, "triton"))


# --------------------------------------------------------------------------------------------
# Backends and the public function.
# --------------------------------------------------------------------------------------------
def _fused(
    op: Callable,
    S: Tensor,
    T: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    keep: Tensor | None,
    layer_weights,
    loss: str,
    reduction: str,
    eps: float,
) -> Tensor:
    L, lead, Hs, Ht = S.shape[0], S.shape[1:-1], S.shape[-1], T.shape[-1]
    N = math.prod(lead)
    dtype = S.dtype
    T = T.to(dtype) if T.dtype != dtype else T
    weight = weight.to(dtype) if weight is not None and weight.dtype != dtype else weight
    bias = bias.to(dtype) if bias is not None and bias.dtype != dtype else bias
    s3 = S.reshape(L, N, Hs).contiguous()
    t3 = T.reshape(L, N, Ht).contiguous()
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    acc = acc_dtype(dtype)
    row_scale = _row_scale(keep, layer_weights, L, N, reduction, S.device, acc)
    reduce = reduction != "none"
    grad = torch.is_grad_enabled() and reduce

    def flag(x: Tensor | None) -> bool:
        return bool(grad and x is not None and x.requires_grad)

    out, _, _, _, _ = op(
        s3, t3, w, b, row_scale, LOSSES[loss], float(eps), reduce, flag(S), flag(weight), flag(bias), flag(T)
    )
    return out if reduce else out.reshape(L, *lead)


@OP.register("torch")
def _torch_impl(S, T, weight, bias, keep, layer_weights, loss, reduction, eps):
    out = reference_hidden_match(
        S, T, weight, bias, loss=loss, mask=keep, layer_weights=layer_weights, reduction=reduction, eps=eps
    )
    return out.to(torch.float32) if out.dtype != torch.float64 else out


@OP.register("cpu", "cuda")  # fastkd._C: the dispatcher picks the CPU or CUDA kernel
def _compiled_impl(*args):
    return _fused(torch.ops.fastkd.hidden_match, *args)


@OP.register("triton", prepare=_triton_op)  # defines the custom op outside traced code
def _triton_impl(*args):
    return _fused(_triton_op(), *args)


def hidden_match(
    student_states: StateArg,
    teacher_states: StateArg,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    loss: str = "mse",
    mask: Tensor | None = None,
    layer_weights: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
    eps: float = DEFAULT_EPS,
    backend: str | None = None,
) -> Tensor:
    """Intermediate-layer distillation loss over L layer pairs, projection and loss fused in one op.

    For each layer ``l`` the student states are projected, ``P_l = S_l W_l^T + b_l``, and compared with
    the teacher states ``T_l`` token by token.

    Args:
        student_states: ``[L, B, T, Hs]`` (or ``[L, N, Hs]``), or a sequence of L tensors
            ``[B, T, Hs]`` such as the mapped entries of a transformers ``hidden_states`` tuple (a
            sequence is stacked, which copies it).
        teacher_states: the same with the teacher width ``Ht``; cast to the student's dtype.
        weight: ``[L, Ht, Hs]`` (one projection per layer), ``[Ht, Hs]`` (shared by all layers), or
            None (no projection; requires ``Hs == Ht``). Laid out like ``nn.Linear.weight``.
        bias: ``[L, Ht]`` or ``[Ht]``, or None.
        loss: per token, ``"mse"``: mean over ``Ht`` of ``(P - T)^2``; ``"cosine"``:
            ``1 - P.T / (max(|P|, eps) max(|T|, eps))``; ``"nmse"``: mean over ``Ht`` of
            ``(P / max(|P|, eps) - T / max(|T|, eps))^2`` (MSE of L2-normalised states).
        mask: ``[B, T]`` boolean or integer (e.g. ``attention_mask``; nonzero = keep). Padded tokens
            contribute nothing (no loss, zero gradients, even if they hold NaN).
        layer_weights: L numbers or a tensor ``[L]`` multiplying each layer's losses (constants: no
            gradient flows to them). Default all ones.
        reduction: ``"mean"``: ``sum_l layer_weights[l] * sum_{kept tokens} loss / (L * kept)``, i.e. the
            mean over layers and kept tokens (0 with zero gradients when nothing is kept; the count
            stays on the device, no host sync); ``"sum"``: ``sum_l layer_weights[l] * sum_{kept} loss``;
            ``"none"``: ``[L, B, T]`` of ``layer_weights[l] * loss`` with 0 at padded tokens.
        eps: the norm floor of ``"cosine"`` / ``"nmse"``: an all-zero row (padding that is not masked)
            gives a finite loss and gradient, never NaN. Default 1e-8, as
            ``torch.nn.functional.cosine_similarity``.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (automatic; also
            ``FASTKD_BACKEND``).

    Returns a float32 loss (float64 for float64 states). Gradients flow to the student states, the
    weight and bias, and the teacher states when they require grad; the fused backends compute them
    during the forward, so the backward is one in-place scale.
    """
    S = _stack_states(student_states, "student_states")
    T = _stack_states(teacher_states, "teacher_states")
    _check_inputs(S, T, weight, bias, loss, mask, layer_weights, reduction, eps)
    keep = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0)
    name = OP.pick(S.device, backend)
    return OP(name, S, T, weight, bias, keep, layer_weights, loss, reduction, eps)
