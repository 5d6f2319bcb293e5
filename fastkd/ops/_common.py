"""Plumbing shared by the fused ops of ``fastkd.ops`` (``distill_loss``, ``topk_distill``,
``fused_linear_distill``, ``hidden_match``, ``nearest_tokens``): registration of the compiled ops
with ``torch.library``, the Triton custom ops defined on first use, the accumulation dtype, and the
argument checks they have in common. Every check raises a one-line error that names the argument
and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fastkd import _ext


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the fused ops: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Registration with torch.library: fake tensors (torch.compile) and autograd.
# --------------------------------------------------------------------------------------------
def register_compiled(
    name: str,
    fake: Callable,
    setup_context: Callable | None = None,
    make_backward: Callable[[], Callable] | None = None,
) -> None:
    """Register ``fake`` and, with ``make_backward``, autograd for ``fastkd::<name>`` of ``fastkd._C``.

    Nothing without the extension, or with a stale build that lacks the op (the other backends
    serve). ``make_backward()`` is only called when the op exists (it may look the op up).
    """
    if _ext.library() is None or not hasattr(torch.ops.fastkd, name):
        return
    torch.library.register_fake(f"fastkd::{name}")(fake)
    if make_backward is not None:
        torch.library.register_autograd(f"fastkd::{name}", make_backward(), setup_context=setup_context)


def lazy_triton_op(
    define: Callable[[], Callable],
    fake: Callable,
    setup_context: Callable | None = None,
    make_backward: Callable[[Callable], Callable] | None = None,
) -> Callable[[], Callable]:
    """A getter of a Triton custom op that is defined on first use (importing triton is not free).

    ``define()`` imports the kernels and returns the ``torch.library.custom_op``; the getter then
    registers ``fake`` and, with ``make_backward(op)``, the op's autograd, once, and returns the
    same op on every later call. Pass the getter as the ``prepare`` of the op's ``triton`` backend,
    so the op is defined outside traced code.
    """
    cache: list[Callable] = []

    def get() -> Callable:
        if cache:
            return cache[0]
        op = define()
        op.register_fake(fake)
        if make_backward is not None:
            op.register_autograd(make_backward(op), setup_context=setup_context)
        cache.append(op)
        return op

    return get


# --------------------------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------------------------
def check_float_tensor(x, name: str) -> None:
    """``name`` must be a floating-point torch.Tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16, float64), got {x.dtype}")


def check_temperature(temperature) -> None:
    """``temperature`` must be a positive finite Python number (not a bool, not a tensor)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive finite number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")


def check_one_of(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _is_integer_tensor(x) -> bool:
    return isinstance(x, Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def _is_bool_tensor(x) -> bool:
    return isinstance(x, Tensor) and x.dtype == torch.bool


def check_row_selection(
    labels: Tensor | None, mask: Tensor | None, lead: tuple, device: torch.device, shape_name: str = "the leading shape"
) -> None:
    """``labels`` (integer) and ``mask`` (boolean, True = keep the row), if given, must have the
    rows' leading shape ``lead`` (called ``shape_name`` in the message) and be on ``device``."""
    for name, x, ok, kind in (
        ("labels", labels, _is_integer_tensor, "an integer tensor of shape {lead}"),
        ("mask", mask, _is_bool_tensor, "a boolean tensor of shape {lead} (True = keep the row)"),
    ):
        if x is None:
            continue
        if not ok(x):
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name} must be {kind.format(lead=lead)}, got {got}")
        if tuple(x.shape) != lead:
            raise ValueError(f"{name} must have {shape_name} {lead}, got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} must be on {device}, got {x.device}")
