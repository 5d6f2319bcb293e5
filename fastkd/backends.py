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

Registering an op (the API the ``fastkd/ops/<op>.py`` modules use)::

    OP = Op("my_op")                       # auto_order={"cuda": (...)} overrides the default order

    @OP.register("torch")                  # the reference: no supports(), runs anything
    def _torch_impl(x, k): ...

    @OP.register("cpu", "cuda", supports=lambda x, k: None if k <= 128 else f"k = {k} > 128")
    def _compiled_impl(x, k): ...          # one implementation for several backends

    @OP.register("triton", prepare=_define_triton_op, supports=...)
    def _triton_impl(x, k): ...

    def my_op(x, k, backend=None):         # the public function
        ...validate...
        name = OP.pick(x.device, backend, (x, k))
        return OP(name, x, k)

* ``supports(*args) -> None | str`` (optional, as xformers' ``not_supported_reasons``): called with
  the implementation's own arguments (those passed to :meth:`Op.pick` as ``args``); ``None`` when
  the backend can run them, else the reason it cannot. A backend the user named (``backend=`` or
  ``FASTKD_BACKEND``) that does not support the inputs raises :class:`BackendUnavailableError` with
  that reason; the automatic choice skips it and tries the next one. Keep it cheap (shapes,
  dtypes, Python numbers): it runs on every call, also inside ``torch.compile``'d code.
* ``prepare()`` (optional): runs once the backend can be chosen, outside traced code (e.g. defining
  a ``torch.library.custom_op`` lazily, since importing triton is not free).

Cost per call: the machine- and environment-dependent part of the choice (availability, device
type, the backend argument and the environment variables) is resolved once and
cached per op under the key ``(device type, backend argument, FASTKD_BACKEND)`` (plus
``TRITON_INTERPRET`` when the Triton backend is named),
so :meth:`Op.pick` costs a dictionary look-up plus the ``supports()`` calls of the candidates it
tries; changing either environment variable changes the key. :meth:`Op.select` resolves afresh
(uncached, for tools and tests); :func:`clear_cache` drops every cached choice.
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


SupportsFn = Callable[..., "str | None"]


class Op:
    """One op's implementations, keyed by backend (see the module docstring for the API).

    >>> OP = Op("distill_loss")
    >>> @OP.register("torch")
    ... def _torch_impl(*args): ...
    """

    def __init__(self, name: str, auto_order: dict[str, Sequence[str]] | None = None) -> None:
        self.name = name
        self.impls: dict[str, Callable] = {}
        self.prepare: dict[str, Callable[[], object]] = {}
        self.supports: dict[str, SupportsFn] = {}
        self.auto_order = {**DEFAULT_AUTO_ORDER, **(auto_order or {})}
        # (device type, backend argument, FASTKD_BACKEND[, TRITON_INTERPRET]) -> the candidates, in order
        self._cache: dict[tuple, tuple[tuple[str, SupportsFn | None], ...]] = {}
        _OPS[name] = self

    def register(
        self,
        *backends: str,
        prepare: Callable[[], object] | None = None,
        supports: SupportsFn | None = None,
    ) -> Callable[[Callable], Callable]:
        """Register one implementation for ``backends``; ``prepare`` runs when the backend becomes a
        candidate, ``supports(*args) -> None | reason`` says whether it can run given inputs."""
        for backend in backends:
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

        def deco(fn: Callable) -> Callable:
            for backend in backends:
                self.impls[backend] = fn
                if prepare is not None:
                    self.prepare[backend] = prepare
                if supports is not None:
                    self.supports[backend] = supports
            self._cache.clear()
            return fn

        return deco

    def usable(self, backend: str, device: torch.device) -> tuple[bool, str]:
        """Whether ``backend`` can run this op on ``device`` on this machine (whatever the inputs)."""
        if backend not in self.impls:
            return False, f"op {self.name!r} has no {backend!r} implementation"
        ok, reason = backend_status(backend)
        if not ok:
            return False, reason
        return backend_supports_device(backend, device)

    def _requested(self, backend: str | None) -> str | None:
        requested = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
        if requested is not None and requested not in BACKENDS:
            src = "backend" if backend is not None else ENV_VAR
            raise ValueError(f"{src} must be one of {BACKENDS} or None, got {requested!r}")
        return requested

    def candidates(self, device: torch.device, backend: str | None = None) -> tuple[str, ...]:
        """The backends that may run this op on ``device``, in the order :meth:`pick` tries them:
        the named one alone, or the usable ones of the automatic order (uncached)."""
        requested = self._requested(backend)
        if requested is not None:
            ok, reason = self.usable(requested, device)
            if not ok:
                raise BackendUnavailableError(f"fastkd.{self.name}: backend {requested!r} cannot run: {reason}")
            return (requested,)
        names = tuple(n for n in self.auto_order.get(device.type, ("torch",)) if self.usable(n, device)[0])
        return names or ("torch",)

    def select(self, device: torch.device, backend: str | None = None) -> str:
        """The backend that will run this op for tensors on ``device`` when every backend supports
        the inputs (uncached)."""
        return self.candidates(device, backend)[0]

    def _resolve(self, device_type: str, backend: str | None) -> tuple[tuple[str, SupportsFn | None], ...]:
        env = os.environ.get(ENV_VAR)
        key = (device_type, backend, env)
        if (backend or env) == "triton":  # TRITON_INTERPRET decides whether it can run on CPU tensors
            key = (*key, os.environ.get("TRITON_INTERPRET"))
        hit = self._cache.get(key)
        if hit is None:
            names = self.candidates(torch.device(device_type), backend)
            hit = tuple((n, self.supports.get(n)) for n in names)
            # prepare the backends that can be chosen: those up to the first one without supports()
            for n, sup in hit:
                hook = self.prepare.get(n)
                if hook is not None:
                    hook()
                if sup is None:
                    break
            self._cache[key] = hit
        return hit

    def pick(self, device: torch.device, backend: str | None = None, args: tuple = ()) -> str:
        """The backend to run this op's implementation on ``args`` (its arguments, for the
        ``supports()`` checks) with tensors on ``device``; raises :class:`BackendUnavailableError`
        when a named backend cannot run, or none of the candidates supports the inputs.

        Eager: a cached look-up (see the module docstring). Under ``torch.compile`` the
        machine-dependent part is made once, at trace time, like any Python-level decision (the
        registry reads the environment and the build info, which Dynamo cannot trace); the
        ``supports()`` checks are traced, and guarded on, as ordinary Python.
        """
        if torch.compiler.is_compiling():
            names = _candidates_at_trace(self.name, device.type, backend)
            cands = tuple((n, self.supports.get(n)) for n in names)
        else:
            cands = self._resolve(device.type, backend)
        reasons = []
        for name, sup in cands:
            if sup is None:
                return name
            reason = sup(*args)
            if reason is None:
                return name
            reasons.append(f"{name!r}: {reason}")
        if len(cands) == 1:
            raise BackendUnavailableError(
                f"fastkd.{self.name}: backend {cands[0][0]!r} cannot run these inputs: {reasons[0].split(': ', 1)[1]}"
            )
        raise BackendUnavailableError(f"fastkd.{self.name}: no backend supports these inputs ({'; '.join(reasons)})")

    def clear_cache(self) -> None:
        self._cache.clear()

    def __call__(self, backend_name: str, *args, **kwargs):
        return self.impls[backend_name](*args, **kwargs)


_OPS: dict[str, Op] = {}


@torch.compiler.assume_constant_result
def _candidates_at_trace(op_name: str, device_type: str, backend: str | None) -> tuple[str, ...]:
    return tuple(n for n, _ in _OPS[op_name]._resolve(device_type, backend))


def clear_cache() -> None:
    """Forget every op's cached backend choice (after changing what is installed or visible)."""
    for op in _OPS.values():
        op.clear_cache()


def available_backends() -> dict[str, tuple[bool, str]]:
    return {name: backend_status(name) for name in BACKENDS}
