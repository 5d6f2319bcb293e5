"""``fastkd.scale_grad_``: ``grad *= scale`` in place, the backward of the ops that compute their
gradients in the forward pass (``distill_loss``, ``hidden_match``).

Those ops write d(loss)/d(input) while they compute the loss (the forward has every intermediate at
hand; recomputing in backward would repeat the work), so their backward is one multiplication by
the upstream gradient: a 0-d ``scale`` (``reduction`` to a scalar) or one value per row ``[N]``.
This module is the one place that does it, for every backend:

* ``kernels/scale_grad.py`` (Triton), ``csrc/scale_grad.cpp`` (C++ CPU, at::vec) and
  ``csrc/scale_grad_cuda.cu`` (CUDA; the raw kernel op ``fastkd::scale_grad_kernel_`` for both), and the
  pure-PyTorch reference here. The CUDA and Triton kernels read the scale on the device and skip
  the work where it is 1, so the usual ``loss.backward()`` moves no bytes and never synchronises.
* ONE ``torch.library.custom_op``, ``fastkd::scale_grad_(Tensor(a!) grad, Tensor scale, str
  backend)``, which declares the mutation: torch bumps ``grad``'s version counter, so a second
  backward through the same graph (``retain_graph=True``) fails autograd's saved-tensor check instead
  of scaling twice, and functionalization / ``torch.compile`` see the in-place write.
* :func:`scale_saved_grads`: the shared backward helper of the fused ops.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from fastkd import _ext
from fastkd.backends import Op

OP = Op("scale_grad_")


def reference_scale_grad_(grad: Tensor, scale: Tensor) -> None:
    """``grad[i, ...] *= scale`` (0-d) or ``scale[i]`` (``[N]``), in place, in ``scale``'s precision."""
    s = scale if scale.dim() == 0 else scale.reshape(-1, *([1] * (grad.dim() - 1)))
    if grad.dtype == s.dtype:
        grad.mul_(s)
    else:
        grad.copy_(grad.to(s.dtype) * s)


def _check_inputs(grad: Tensor, scale: Tensor) -> None:
    if not isinstance(grad, Tensor) or not grad.is_floating_point():
        raise TypeError(
            f"grad must be a floating-point tensor, got {grad.dtype if isinstance(grad, Tensor) else type(grad).__name__}"
        )
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        raise TypeError(
            f"scale must be a floating-point tensor, got "
            f"{scale.dtype if isinstance(scale, Tensor) else type(scale).__name__}"
        )
    if not grad.is_contiguous():
        raise ValueError("grad must be contiguous (it is written in place)")
    if scale.device != grad.device:
        raise ValueError(f"scale must be on grad's device {grad.device}, got {scale.device}")
    if scale.dim() != 0 and not (scale.dim() == 1 and grad.dim() >= 1 and scale.shape[0] == grad.shape[0]):
        rows = grad.shape[0] if grad.dim() else "N"
        raise ValueError(f"scale must be 0-d or [N] = [{rows}] (one value per row of grad), got {tuple(scale.shape)}")


@OP.register("torch")
def _torch_impl(grad: Tensor, scale: Tensor) -> None:
    if scale.dim() == 0 and scale.device.type == "cpu" and float(scale) == 1.0:
        return
    reference_scale_grad_(grad, scale)


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.fastkd, name)


# A fastkd._C built before scale_grad_ became a custom op defines fastkd::scale_grad_ itself (as the
# raw kernel): the custom op cannot take its name, so until it is rebuilt the raw op serves and the
# version counter is bumped by hand.
_STALE_BUILD = _ext.library() is not None and not _has_op("scale_grad_kernel_") and _has_op("scale_grad_")
if _STALE_BUILD:
    warnings.warn(
        "fastkd._C predates fastkd::scale_grad_kernel_; rebuild it (`python setup.py build_ext --inplace`)",
        stacklevel=2,
    )


def _kernel_op():
    """The compiled kernel op, or None without fastkd._C."""
    if _ext.library() is None:
        return None
    if _STALE_BUILD:
        return torch.ops.fastkd.scale_grad_.default
    return getattr(torch.ops.fastkd, "scale_grad_kernel_", None)


@OP.register("cpu", "cuda")  # fastkd._C: the dispatcher picks the CPU or CUDA kernel
def _compiled_impl(grad: Tensor, scale: Tensor) -> None:
    op = _kernel_op()
    if op is None:  # a stale build: the reference does the same
        reference_scale_grad_(grad, scale)
    else:
        op(grad, scale.contiguous())


def _prepare_triton() -> None:
    from fastkd.kernels import scale_grad  # noqa: F401  (importing triton is not free: on first use)


@OP.register("triton", prepare=_prepare_triton)
def _triton_impl(grad: Tensor, scale: Tensor) -> None:
    from fastkd.kernels import scale_grad as tk

    tk.scale_grad_(grad, scale.contiguous())


if not _STALE_BUILD:

    @torch.library.custom_op("fastkd::scale_grad_", mutates_args=("grad",))
    def _scale_grad_op(grad: Tensor, scale: Tensor, backend: str) -> None:
        OP(backend, grad, scale)

    @_scale_grad_op.register_fake
    def _(grad, scale, backend):
        return None

    _run = torch.ops.fastkd.scale_grad_.default
else:

    def _run(grad: Tensor, scale: Tensor, backend: str) -> None:
        OP(backend, grad, scale)
        torch.autograd.graph.increment_version(grad)


def scale_grad_(grad: Tensor, scale: Tensor, *, backend: str | None = None) -> Tensor:
    """``grad[i, ...] *= scale`` (0-d) or ``scale[i]`` (``[N]``, one value per row), in place; returns
    ``grad``. ``grad``: a contiguous floating-point tensor; ``scale``: a floating-point tensor on its
    device (the product is computed in float32, or float64 for float64 ``grad`` or ``scale``).
    ``backend`` as for every fastkd op. Bumps ``grad``'s version counter."""
    _check_inputs(grad, scale)
    name = OP.pick(grad.device, backend, (grad, scale))
    _run(grad, scale, name)
    return grad


def scale_saved_grads(
    grads: Sequence[Tensor | None], upstream: Tensor, backend: str | None = None
) -> list[Tensor | None]:
    """The backward of an op that computed its gradients in the forward pass.

    ``grads``: the gradients the forward wrote (None where not requested), each with the upstream
    gradient's shape as leading dimensions (``upstream`` 0-d, or ``[N]`` for per-row losses);
    ``backend``: the backend that ran the forward (``scale_grad_`` runs on the same one; None: the
    compiled kernels of the gradients' device, for the ``fastkd._C`` ops). Returns
    them multiplied by ``upstream``:

    * eagerly, in place through the ``fastkd::scale_grad_`` custom op (the buffers are the op's own
      outputs, used once), which bumps their version so that a second backward through the same
      graph fails autograd's saved-tensor check instead of scaling twice; where the upstream
      gradient is the CPU scalar 1 (``loss.backward()`` on CPU; reading it is free there) they are
      returned untouched, so backward is free and may run again;
    * while AOTAutograd traces backward (``torch.compile``: functional or fake tensors), out of place:
      a traced graph may not mutate a forward output; the compiler plans the buffers itself.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in present) else torch.float32
    scale = upstream if upstream.dtype == acc else upstream.to(acc)
    if any(type(g) is not Tensor for g in present) or type(scale) is not Tensor:
        out: list[Tensor | None] = []
        for g in grads:
            if g is None:
                out.append(None)
            else:
                s = scale if scale.dim() == 0 else scale.reshape(-1, *([1] * (g.dim() - 1)))
                out.append((g * s).to(g.dtype))
        return out
    if scale.dim() == 0 and scale.device.type == "cpu" and float(scale) == 1.0:
        return list(grads)
    scale = scale.contiguous()
    backend = backend or present[0].device.type
    for g in present:
        _run(g, scale, backend)
    return list(grads)
