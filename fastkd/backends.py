"""The backend registry: which implementation of an op runs, and why.

Backends, fastest first where they apply:

* ``cuda``   – the compiled CUDA kernels in ``fastkd._C`` (CUDA tensors).
* ``triton`` – the Triton kernels in ``fastkd.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is exact but slow, so it is never chosen automatically on CPU).
* ``cpu``    – the compiled, vectorised C++ kernels in ``fastkd._C`` (CPU tensors).
* ``torch``  – the pure-PyTorch reference (any device, always available).

Choice: an explicit ``backend=`` argument wins, then the ``FASTKD_BACKEND`` environment variable,
then the op's automatic order for the tensors' device. A backend named explicitly that cannot run
raises :class:`BackendUnavailableError` saying what is missing; the automatic choice falls back
quietly to the next backend in the op's order (fastest first).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from functools import cache

import torch

from fastkd import _ext
from fastkd.errors import BackendUnavailableError

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "FASTKD_BACKEND"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _triton_import_error() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton failed to import: {e}"
    return ""


def _cuda_available() -> bool:
    # torch.cuda.is_available() does not create a CUDA context.
    return torch.cuda.is_available()


def backend_status(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for a backend on this machine; reason is "" when available."""
    if name == "torch":
        return True, ""
    if name == "cpu":
        if not _ext.available():
            return False, _ext.unavailable_reason()
        return True, ""
    if name == "cuda":
        if not _ext.available():
            return False, _ext.unavailable_reason()
        if not _ext.cuda_built():
            return False, (
                "fastkd._C was built without CUDA kernels (no CUDA toolkit or a CPU-only torch at build "
                "time, or FASTKD_CUDA=0); on a GPU machine rebuild with FASTKD_CUDA=1"
            )
        if not _cuda_available():
            return False, "no CUDA device is visible to torch"
        return True, ""
    if name == "triton":
        err = _triton_import_error()
        if err:
            return False, err
        if triton_interpret() or _cuda_available():
            return True, ""
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors, slowly)"
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def backend_supports_device(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    if name == "cpu":
        return (device.type == "cpu"), f"backend 'cpu' runs on CPU tensors, got {device.type} tensors"
    if name == "cuda":
        return (device.type == "cuda"), f"backend 'cuda' runs on CUDA tensors, got {device.type} tensors"
    if name == "triton":
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpret():
            return True, ""
        return False, (
            f"backend 'triton' runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device.type} tensors"
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


# Automatic order per device type, fastest first. The Triton interpreter is exact but slow, so it is
# never an automatic choice for CPU tensors.
DEFAULT_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}


class Op:
    """One op's implementations, keyed by backend.

    >>> OP = Op("distill_loss")
    >>> @OP.register("torch")
    ... def _torch_impl(*args): ...
    """

    def __init__(self, name: str, auto_order: dict[str, Sequence[str]] | None = None) -> None:
        self.name = name
        self.impls: dict[str, Callable] = {}
        self.prepare: dict[str, Callable[[], object]] = {}
        self.auto_order = {**DEFAULT_AUTO_ORDER, **(auto_order or {})}
        _OPS[name] = self

    def register(self, *backends: str, prepare: Callable[[], object] | None = None) -> Callable[[Callable], Callable]:
        """Register one implementation for ``backends``; ``prepare`` runs when :meth:`pick` chooses one."""
        for backend in backends:
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

        def deco(fn: Callable) -> Callable:
            for backend in backends:
                self.impls[backend] = fn
                if prepare is not None:
                    self.prepare[backend] = prepare
            return fn

        return deco

    def usable(self, backend: str, device: torch.device) -> tuple[bool, str]:
        if backend not in self.impls:
            return False, f"op {self.name!r} has no {backend!r} implementation"
        ok, reason = backend_status(backend)
        if not ok:
            return False, reason
        return backend_supports_device(backend, device)

    def select(self, device: torch.device, backend: str | None = None) -> str:
        """The backend that will run this op for tensors on ``device``."""
        requested = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
        if requested is not None:
            if requested not in BACKENDS:
                src = "backend" if backend is not None else ENV_VAR
                raise ValueError(f"{src} must be one of {BACKENDS} or None, got {requested!r}")
            ok, reason = self.usable(requested, device)
            if not ok:
                raise BackendUnavailableError(f"fastkd.{self.name}: backend {requested!r} cannot run: {reason}")
            return requested
        for name in self.auto_order.get(device.type, ("torch",)):
            if self.usable(name, device)[0]:
                return name
        return "torch"

    def pick(self, device: torch.device, backend: str | None = None) -> str:
        """:meth:`select` for use inside the op's Python entry point, ``torch.compile`` included.

        Under ``torch.compile`` the choice is made once, at trace time, like any Python-level
        decision: the registry reads the environment and the build info, which Dynamo cannot trace.
        A backend's ``prepare`` hook (e.g. defining its ``custom_op`` lazily) runs here, outside the
        traced code.
        """
        return _pick(self.name, str(device), backend)

    def __call__(self, backend_name: str, *args, **kwargs):
        return self.impls[backend_name](*args, **kwargs)


_OPS: dict[str, Op] = {}


@torch.compiler.assume_constant_result
def _pick(op_name: str, device: str, backend: str | None) -> str:
    op = _OPS[op_name]
    name = op.select(torch.device(device), backend)
    hook = op.prepare.get(name)
    if hook is not None:
        hook()
    return name


def available_backends() -> dict[str, tuple[bool, str]]:
    return {name: backend_status(name) for name in BACKENDS}
