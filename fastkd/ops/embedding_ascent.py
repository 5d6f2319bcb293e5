"""``fastkd.embedding_ascent_``: one fused, in-place gradient step on token embeddings.

Data-free NLP distillation optimises embeddings directly: AS-DFD's "embedding guessing" descends
the teacher's loss on pseudo input embeddings, then hardens them adversarially; the embedding-space
Zero-shot KD ascends the teacher-student divergence inside a norm ball around the starting point.
Each step is a chain of per-token reductions and elementwise ops (gradient norm, scale, add, project
to the ball, clamp the norm, skip special tokens) that eager PyTorch runs as 6-10 kernels over the
same memory; here it is one pass that reads each operand once and writes ``embeds`` (and the
momentum buffer) once.

Layers (one file each): ``kernels/embedding_ascent.py`` (Triton), ``csrc/embedding_ascent.cpp``
(C++ CPU, at::vec), ``csrc/embedding_ascent_cuda.cu`` (CUDA), and this module: the pure-PyTorch
reference, input validation, ``torch.library`` registration (fake tensors) and backend dispatch.

Op schemas (the in-place ops declare what they mutate)::

    embedding_ascent_(Tensor(a!) embeds, Tensor grad, Tensor? origin, Tensor? mask,
                      Tensor(b!)? momentum_buffer, float step_size, int norm, float? radius,
                      float? max_norm, float momentum, bool maximize) -> ()
    embedding_ascent_multi_(Tensor(a!)[] embeds, Tensor[] grads, Tensor[] origins, Tensor?[] masks,
                            Tensor(b!)[] momentum_buffers, ...same scalars...) -> ()

The multi-tensor form is a separate function, :func:`embedding_ascent_multi_`, taking lists (one
launch for every row of every tensor) rather than lists accepted by :func:`embedding_ascent_`: the
argument names (``grads``, ``origins``, ``masks``, ``momentum_buffers``) and their types then say
plainly what is expected, and the single-tensor path has no list handling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastkd import _ext
from fastkd.backends import Op

NORMS: dict[str, int] = {"l2": 0, "linf": 1, "sign": 1, "none": 2}

OP = Op("embedding_ascent_")
MULTI_OP = Op("embedding_ascent_multi_")


# --------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the fallback backend, the test oracle and the benchmark baseline.
# --------------------------------------------------------------------------------------------
def reference_ascent_values(
    embeds: Tensor,
    grad: Tensor,
    *,
    step_size: float,
    norm: str = "l2",
    radius: float | None = None,
    origin: Tensor | None = None,
    max_norm: float | None = None,
    mask: Tensor | None = None,
    momentum: float = 0.0,
    momentum_buffer: Tensor | None = None,
    maximize: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The math of :func:`reference_embedding_ascent_` without the writes: returns the new
    embeddings (in the compute type: float32, float64 for float64 embeds) and the new momentum
    buffer (in its dtype, or None)."""
    acc = torch.float64 if embeds.dtype == torch.float64 else torch.float32
    e = embeds.to(acc)
    g = grad.to(acc)
    sgn = 1.0 if maximize else -1.0
    new_buf = None
    if momentum_buffer is not None:
        l1 = g.abs().sum(-1, keepdim=True)
        g = g * torch.where(l1 == 0, 0.0, sgn / l1)
        new_buf = (momentum * momentum_buffer.to(acc) + g).to(momentum_buffer.dtype)
        g = new_buf.to(acc)  # the step uses exactly the stored momentum
        c = step_size
    else:
        c = step_size * sgn
    sq = (g * g).sum(-1, keepdim=True)
    moving = sq != 0  # a zero gradient row is not stepped (NaN steps, so it propagates)
    if NORMS[norm] == 0:
        d = g * (c / sq.sqrt())
    elif NORMS[norm] == 1:
        d = c * torch.where(g.isnan(), g, g.sign())  # torch.sign(NaN) is 0; NaN must propagate
    else:
        d = c * g
    x = torch.where(moving, e + d, e)
    if radius is not None:
        o = origin.to(acc)
        delta = x - o
        if NORMS[norm] == 1:
            x = torch.where(delta.abs() > radius, o + radius * delta.sign(), x)
        else:
            dn = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)
            x = torch.where(dn > radius, o + delta * (radius / dn), x)
    if max_norm is not None:
        xn = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        x = torch.where(xn > max_norm, x * (max_norm / xn), x)
    if mask is not None:
        keep = mask.unsqueeze(-1)
        x = torch.where(keep, x, e)
        if new_buf is not None:
            new_buf = torch.where(keep, new_buf, momentum_buffer)
    return x, new_buf


def reference_embedding_ascent_(
    embeds: Tensor,
    grad: Tensor,
    *,
    step_size: float,
    norm: str = "l2",
    radius: float | None = None,
    origin: Tensor | None = None,
    max_norm: float | None = None,
    mask: Tensor | None = None,
    momentum: float = 0.0,
    momentum_buffer: Tensor | None = None,
    maximize: bool = True,
) -> Tensor:
    """The eager sequence of :func:`embedding_ascent_` (same arguments, no validation, no backend).

    Computes in float32 (float64 for float64 embeddings) and writes ``embeds`` (and
    ``momentum_buffer``) in place; returns ``embeds``.
    """
    with torch.no_grad():
        x, new_buf = reference_ascent_values(
            embeds, grad, step_size=step_size, norm=norm, radius=radius, origin=origin, max_norm=max_norm,
            mask=mask, momentum=momentum, momentum_buffer=momentum_buffer, maximize=maximize,
        )  # fmt: skip
        embeds.copy_(x)
        if new_buf is not None:
            momentum_buffer.copy_(new_buf)
    return embeds


# --------------------------------------------------------------------------------------------
# Validation: clear errors that name the argument.
# --------------------------------------------------------------------------------------------
def _positive_finite(name: str, v: object, optional: bool) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a positive finite number, got {type(v).__name__}")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {v}")


def _mem_range(t: Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return (0, 0)
    start = t.data_ptr()
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return start, start + (span + 1) * t.element_size()


def _overlap(a: Tensor, b: Tensor) -> bool:
    a0, a1 = _mem_range(a)
    b0, b1 = _mem_range(b)
    return a0 < b1 and b0 < a1


def _non_overlapping(t: Tensor) -> bool:
    """True when no two elements of ``t`` share memory (checked on the strides: dimensions sorted by
    stride must each step past everything the inner ones span)."""
    dims = sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1)
    extent = 0
    for st, s in dims:
        if st <= extent:
            return False
        extent += (s - 1) * st
    return True


def _check_scalars(step_size, norm, radius, max_norm, momentum, maximize) -> None:
    _positive_finite("step_size", step_size, optional=False)
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
    _positive_finite("radius", radius, optional=True)
    _positive_finite("max_norm", max_norm, optional=True)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a finite number >= 0, got {type(momentum).__name__}")
    if not (math.isfinite(momentum) and momentum >= 0):
        raise ValueError(f"momentum must be finite and >= 0, got {momentum}")
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")


def _check_tensors(
    embeds: Tensor,
    grad: Tensor,
    origin: Tensor | None,
    mask: Tensor | None,
    momentum_buffer: Tensor | None,
    radius: float | None,
    momentum: float,
    sfx: str = "",
    names: tuple[str, str, str, str, str] = ("embeds", "grad", "origin", "mask", "momentum_buffer"),
) -> None:
    n_e, n_g, n_o, n_m, n_b = (n + sfx for n in names)
    if not isinstance(embeds, Tensor):
        raise TypeError(f"{n_e} must be a torch.Tensor, got {type(embeds).__name__}")
    if not embeds.is_floating_point():
        raise TypeError(
            f"{n_e} must be a floating-point tensor (float32, bfloat16, float16, float64), got {embeds.dtype}"
        )
    if embeds.dim() < 1:
        raise ValueError(f"{n_e} must have shape [..., H] with at least one dimension, got a 0-d tensor")
    shape = tuple(embeds.shape)
    dev = embeds.device

    def same(name: str, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have the shape of {n_e} {shape}, got {tuple(x.shape)}")
        if x.device != dev:
            raise ValueError(f"{name} must be on {n_e}'s device {dev}, got {x.device}")

    same(n_g, grad)
    # The memory checks read strides and data pointers; under torch.compile (fake tensors) they are
    # left to the ops themselves (the C++ kernels check overlap with ATen's MemoryOverlap).
    compiling = torch.compiler.is_compiling()
    if not compiling and not _non_overlapping(embeds):
        raise ValueError(
            f"{n_e} has elements that share memory (e.g. an expanded tensor); the in-place update needs one "
            "memory location per element: pass a .clone()"
        )
    if radius is not None and origin is None:
        raise ValueError("origin is required when radius is given (the ball is centred on origin)")
    if origin is not None:
        if radius is None:
            raise ValueError("origin is given but radius is None: set radius to project onto the ball around origin")
        same(n_o, origin)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"{n_m} must be a boolean tensor of shape {shape[:-1]} (True = update the token), got "
                f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        if tuple(mask.shape) != shape[:-1]:
            raise ValueError(f"{n_m} must have the leading shape of {n_e} {shape[:-1]}, got {tuple(mask.shape)}")
        if mask.device != dev:
            raise ValueError(f"{n_m} must be on {n_e}'s device {dev}, got {mask.device}")
    if momentum_buffer is None:
        if momentum > 0:
            raise ValueError(
                f"{n_b} is required when momentum > 0 (the accumulated direction lives in it between steps; "
                f"start from torch.zeros_like({n_e}))"
            )
    else:
        same(n_b, momentum_buffer)
        acc = torch.float64 if embeds.dtype == torch.float64 else torch.float32
        if momentum_buffer.dtype not in (embeds.dtype, acc):
            raise TypeError(
                f"{n_b} must have the dtype of {n_e} ({embeds.dtype}) or {acc}, got {momentum_buffer.dtype}"
            )
        if not compiling and not _non_overlapping(momentum_buffer):
            raise ValueError(f"{n_b} has elements that share memory (e.g. an expanded tensor): pass a .clone()")
        if not compiling and _overlap(embeds, momentum_buffer):
            raise ValueError(f"{n_b} must not share memory with {n_e}")


def _cast(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return x if x is None or x.dtype == dtype else x.to(dtype)


# --------------------------------------------------------------------------------------------
# Registration of the compiled ops (fake tensors for torch.compile) and the Triton custom ops.
# --------------------------------------------------------------------------------------------
def _register_compiled() -> None:
    if _ext.library() is None:
        return

    @torch.library.register_fake("fastkd::embedding_ascent_")
    def _fake(embeds, grad, origin, mask, momentum_buffer, step_size, norm, radius, max_norm, momentum, maximize):
        return None

    @torch.library.register_fake("fastkd::embedding_ascent_multi_")
    def _fake_multi(
        embeds, grads, origins, masks, momentum_buffers, step_size, norm, radius, max_norm, momentum, maximize
    ):
        return None


_register_compiled()

_triton_ops: dict[str, object] = {}


def _triton_op(name: str):
    """The Triton custom ops, defined on first use (importing triton is not free)."""
    if _triton_ops:
        return _triton_ops[name]
    from fastkd.kernels import embedding_ascent as tk

    @torch.library.custom_op("fastkd::embedding_ascent_triton_", mutates_args=("embeds", "momentum_buffer"))
    def embedding_ascent_triton_(
        embeds: Tensor,
        grad: Tensor,
        origin: Tensor | None,
        mask: Tensor | None,
        momentum_buffer: Tensor | None,
        step_size: float,
        norm: int,
        radius: float | None,
        max_norm: float | None,
        momentum: float,
        maximize: bool,
    ) -> None:
        tk.embedding_ascent_(
            embeds, grad, origin, mask, momentum_buffer, step_size, norm, radius, max_norm, momentum, maximize
        )

    @torch.library.custom_op("fastkd::embedding_ascent_multi_triton_", mutates_args=("embeds", "momentum_buffers"))
    def embedding_ascent_multi_triton_(
        embeds: list[Tensor],
        grads: list[Tensor],
        origins: list[Tensor],
        masks: list[Tensor | None],
        momentum_buffers: list[Tensor],
        step_size: float,
        norm: int,
        radius: float | None,
        max_norm: float | None,
        momentum: float,
        maximize: bool,
    ) -> None:
        tk.embedding_ascent_multi_(
            embeds, grads, origins, masks, momentum_buffers, step_size, norm, radius, max_norm, momentum, maximize
        )

    @embedding_ascent_triton_.register_fake
    def _fake(embeds, grad, origin, mask, momentum_buffer, step_size, norm, radius, max_norm, momentum, maximize):
        return None

    @embedding_ascent_multi_triton_.register_fake
    def _fake_multi(
        embeds, grads, origins, masks, momentum_buffers, step_size, norm, radius, max_norm, momentum, maximize
    ):
        return None

    _triton_ops["single"] = embedding_ascent_triton_
    _triton_ops["multi"] = embedding_ascent_multi_triton_
    return _triton_ops[name]


# --------------------------------------------------------------------------------------------
# Backends and the public functions.
# --------------------------------------------------------------------------------------------
# Backend choice (Op.pick) reads files and environment variables; under torch.compile it is
# evaluated once while tracing and its result kept as a constant, so the graph has no break.
# Backend arguments: (embeds, grad, origin, mask, momentum_buffer, step_size, norm, radius, max_norm,
# momentum, maximize), with norm as its name, grad and origin already in embeds' dtype.
@OP.register("torch")
def _torch_impl(embeds, grad, origin, mask, buf, step_size, norm, radius, max_norm, momentum, maximize):
    reference_embedding_ascent_(
        embeds, grad, step_size=step_size, norm=norm, radius=radius, origin=origin, max_norm=max_norm, mask=mask,
        momentum=momentum, momentum_buffer=buf, maximize=maximize,
    )  # fmt: skip


@OP.register("cpu", "cuda")  # fastkd._C: the dispatcher picks the CPU or CUDA kernel
def _compiled(embeds, grad, origin, mask, buf, step_size, norm, radius, max_norm, momentum, maximize):
    torch.ops.fastkd.embedding_ascent_(
        embeds, grad, origin, mask, buf, float(step_size), NORMS[norm], radius, max_norm, float(momentum), maximize
    )


@OP.register("triton", prepare=lambda: _triton_op("single"))  # outside traced code
def _triton_impl(embeds, grad, origin, mask, buf, step_size, norm, radius, max_norm, momentum, maximize):
    _triton_op("single")(
        embeds, grad, origin, mask, buf, float(step_size), NORMS[norm], radius, max_norm, float(momentum), maximize
    )


# Multi-tensor backends: (embeds, grads, origins, masks, momentum_buffers, ...scalars) with lists;
# origins / momentum_buffers are [] when absent, masks entries may be None.
@MULTI_OP.register("torch")
def _torch_multi(embeds, grads, origins, masks, bufs, step_size, norm, radius, max_norm, momentum, maximize):
    for i, e in enumerate(embeds):
        _torch_impl(
            e, grads[i], origins[i] if origins else None, masks[i] if masks else None, bufs[i] if bufs else None,
            step_size, norm, radius, max_norm, momentum, maximize,
        )  # fmt: skip


@MULTI_OP.register("cpu", "cuda")  # fastkd._C: the dispatcher picks the CPU or CUDA kernel
def _compiled_multi(embeds, grads, origins, masks, bufs, step_size, norm, radius, max_norm, momentum, maximize):
    torch.ops.fastkd.embedding_ascent_multi_(
        embeds, grads, origins, masks, bufs, float(step_size), NORMS[norm], radius, max_norm, float(momentum), maximize
    )


@MULTI_OP.register("triton", prepare=lambda: _triton_op("multi"))
def _triton_multi(embeds, grads, origins, masks, bufs, step_size, norm, radius, max_norm, momentum, maximize):
    _triton_op("multi")(
        embeds, grads, origins, masks, bufs, float(step_size), NORMS[norm], radius, max_norm, float(momentum), maximize
    )


def embedding_ascent_(
    embeds: Tensor,
    grad: Tensor,
    *,
    step_size: float,
    norm: str = "l2",
    radius: float | None = None,
    origin: Tensor | None = None,
    max_norm: float | None = None,
    mask: Tensor | None = None,
    momentum: float = 0.0,
    momentum_buffer: Tensor | None = None,
    maximize: bool = True,
    backend: str | None = None,
) -> Tensor:
    """One gradient step on token embeddings, in place and fused into one pass; returns ``embeds``.

    For each token row (last dimension H), in float32 (float64 for float64 embeddings):

    1. ``g = grad`` (``-grad`` when ``maximize=False``: the embedding-guessing stage descends the
       teacher's loss; the adversarial stage ascends the divergence).
    2. With a ``momentum_buffer`` (MI-FGSM): ``buf = momentum * buf + g / ||g||_1``, then
       ``g = buf``. The L1 norm is taken per token over H, as in MI-FGSM's
       ``g_{t+1} = mu g_t + grad / ||grad||_1`` with each token as its own perturbation: it makes the
       accumulated direction independent of the gradient's scale, which varies by orders of
       magnitude across tokens and steps, so old and new gradients are weighed by ``momentum``
       alone. (A mean-absolute normalisation only rescales the buffer by H; it changes nothing for
       ``norm="l2"`` or ``"sign"``.)
    3. Direction ``d``: ``"l2"`` ``g / ||g||_2``; ``"linf"`` or ``"sign"`` ``sign(g)`` (FGSM);
       ``"none"`` ``g`` (plain gradient step).
    4. ``embeds += step_size * d``. A row whose (momentum) gradient is exactly zero is not stepped
       (no NaN); the projections below still apply to it, so a row already inside both constraints
       keeps its exact bits.
    5. ``radius``: project back into the ball of that radius around ``origin`` (same shape as
       embeds): the L2 ball for ``norm="l2"`` / ``"none"`` (rescale ``embeds - origin``), the L∞
       box for ``"linf"`` / ``"sign"`` (clamp each coordinate).
    6. ``max_norm``: rescale rows whose L2 norm exceeds it (keeps pseudo embeddings within the norm
       range of real word embeddings).
    7. Rows where ``mask`` (bool, shape ``embeds.shape[:-1]``) is False — [CLS], [SEP], padding — are
       neither read nor written: they and their momentum buffer rows keep their exact bits.

    Args:
        embeds: ``[..., H]`` float32 / bfloat16 / float16 / float64, updated in place. Any strides:
            rows that can be addressed with one row stride (e.g. slices along the leading dims) are
            updated where they are; other layouts are updated on a contiguous copy that is then
            copied back into ``embeds``'s own storage. Tensors whose elements share memory
            (expanded) are refused. Runs under ``torch.no_grad()``, so a leaf with
            ``requires_grad=True`` (the usual pseudo-embedding parameter) is fine.
        grad: same shape; any floating dtype (cast to embeds' dtype).
        step_size: > 0.
        norm: ``"l2"``, ``"linf"``, ``"sign"`` or ``"none"``.
        radius, origin: both or neither; radius > 0.
        max_norm: > 0 or None.
        mask: bool ``[...]`` or None (every token is updated).
        momentum, momentum_buffer: ``momentum >= 0``; the buffer (same shape, dtype of embeds or
            float32 — float64 for float64 embeds; start from zeros) is updated in place. It is
            required when ``momentum > 0``; with ``momentum == 0`` and a buffer the step uses the
            L1-normalised gradient.
        maximize: ascend (True) or descend (False).
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (automatic; also
            ``FASTKD_BACKEND``).

    NaN in ``grad`` propagates into the updated rows, never silently skipped.
    """
    _check_scalars(step_size, norm, radius, max_norm, momentum, maximize)
    _check_tensors(embeds, grad, origin, mask, momentum_buffer, radius, momentum)
    grad = _cast(grad, embeds.dtype)
    origin = _cast(origin, embeds.dtype)
    name = OP.pick(embeds.device, backend)
    if embeds.numel() == 0:
        return embeds
    with torch.no_grad():
        OP(name, embeds, grad, origin, mask, momentum_buffer, step_size, norm, radius, max_norm, momentum, maximize)
    return embeds


def embedding_ascent_multi_(
    embeds: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    step_size: float,
    norm: str = "l2",
    radius: float | None = None,
    origins: Sequence[Tensor] | None = None,
    max_norm: float | None = None,
    masks: Sequence[Tensor | None] | None = None,
    momentum: float = 0.0,
    momentum_buffers: Sequence[Tensor] | None = None,
    maximize: bool = True,
    backend: str | None = None,
) -> list[Tensor]:
    """:func:`embedding_ascent_` on a list of tensors in one launch; returns ``list(embeds)``.

    Every tensor gets the same step (``step_size``, ``norm``, ``radius``, ``max_norm``,
    ``momentum``, ``maximize``). ``grads`` has one tensor per ``embeds`` tensor (same shape each);
    ``origins`` and ``momentum_buffers`` are None or one per tensor; ``masks`` is None or one entry
    per tensor (an entry may be None). All ``embeds`` share one dtype and device; H may differ
    between tensors (e.g. a teacher's and a student's embeddings of different widths).
    """
    _check_scalars(step_size, norm, radius, max_norm, momentum, maximize)
    if isinstance(embeds, Tensor) or not isinstance(embeds, Sequence):
        raise TypeError(
            f"embeds must be a list or tuple of tensors, got {type(embeds).__name__} (use embedding_ascent_ for one tensor)"
        )
    if isinstance(grads, Tensor) or not isinstance(grads, Sequence):
        raise TypeError(f"grads must be a list or tuple of tensors, got {type(grads).__name__}")
    n = len(embeds)
    for name, seq in (("grads", grads), ("origins", origins), ("masks", masks), ("momentum_buffers", momentum_buffers)):
        if seq is None:
            continue
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple, got {type(seq).__name__}")
        if len(seq) != n:
            raise ValueError(f"{name} must have one entry per embeds tensor ({n}), got {len(seq)}")
    if radius is not None and origins is None:
        raise ValueError("origins is required when radius is given (the ball is centred on origin)")
    if origins is not None and radius is None:
        raise ValueError("origins is given but radius is None: set radius to project onto the balls around origins")
    if momentum > 0 and momentum_buffers is None:
        raise ValueError("momentum_buffers is required when momentum > 0 (start from zeros_like of each embeds tensor)")
    for i in range(n):
        _check_tensors(
            embeds[i], grads[i], origins[i] if origins is not None else None,
            masks[i] if masks is not None else None, momentum_buffers[i] if momentum_buffers is not None else None,
            radius, momentum, sfx=f"[{i}]",
            names=("embeds", "grads", "origins", "masks", "momentum_buffers"),
        )  # fmt: skip
        if embeds[i].dtype != embeds[0].dtype:
            raise TypeError(f"embeds[{i}] must have the dtype of embeds[0] ({embeds[0].dtype}), got {embeds[i].dtype}")
        if embeds[i].device != embeds[0].device:
            raise ValueError(f"embeds[{i}] must be on embeds[0]'s device {embeds[0].device}, got {embeds[i].device}")
        if momentum_buffers is not None and momentum_buffers[i].dtype != momentum_buffers[0].dtype:
            raise TypeError(
                f"momentum_buffers[{i}] must have the dtype of momentum_buffers[0] ({momentum_buffers[0].dtype}), "
                f"got {momentum_buffers[i].dtype}"
            )
    if n == 0:
        return []
    if not torch.compiler.is_compiling():
        for i in range(n):
            for j in range(i):
                if _overlap(embeds[i], embeds[j]):
                    raise ValueError(f"embeds[{i}] and embeds[{j}] share memory; each tensor must be updated once")
    dtype = embeds[0].dtype
    e_list = list(embeds)
    g_list = [_cast(g, dtype) for g in grads]
    o_list = [_cast(o, dtype) for o in origins] if origins is not None else []
    m_list = list(masks) if masks is not None else []
    b_list = list(momentum_buffers) if momentum_buffers is not None else []
    name = MULTI_OP.pick(embeds[0].device, backend)
    with torch.no_grad():
        MULTI_OP(name, e_list, g_list, o_list, m_list, b_list, step_size, norm, radius, max_norm, momentum, maximize)
    return e_list
