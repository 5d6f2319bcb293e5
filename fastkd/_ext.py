"""Loading of the compiled library ``fastkd._C``.

The compiled library is optional: when it is missing, or was built for another torch, fastkd keeps
working on the pure-PyTorch (``torch``) and Triton backends and warns once with the reason.
Loading never initialises CUDA.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import cache
from types import ModuleType

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_PATH = os.path.join(_HERE, "_build_info.json")


def _torch_base_version(v: str) -> str:
    return v.split("+", maxsplit=1)[0]


@cache
def build_info() -> dict:
    """What ``setup.py`` recorded when it built ``fastkd._C`` ({} when it did not)."""
    try:
        with open(BUILD_INFO_PATH, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@cache
def _load() -> tuple[ModuleType | None, str]:
    info = build_info()
    built_for = info.get("torch")
    if built_for is not None and _torch_base_version(built_for) != _torch_base_version(torch.__version__):
        return None, (
            f"fastkd._C was built for torch {built_for}, you have torch {torch.__version__}; "
            "rebuild with `pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)"
        )
    try:
        from fastkd import _C
    except ImportError as e:
        msg = str(e)
        if "No module named" in msg or "cannot import name" in msg:
            return None, (
                "fastkd._C is not built (pure-Python install); build it with "
                "`pip install --no-build-isolation .` or `python setup.py build_ext --inplace`"
            )
        if "undefined symbol" in msg:
            return (
                None,
                f"fastkd._C does not match this torch {torch.__version__} (undefined symbol); rebuild it: {msg}",
            )
        return None, f"fastkd._C failed to load: {msg}"
    return _C, ""


_warned = False


def library() -> ModuleType | None:
    """The compiled module, or None (after one warning giving the reason)."""
    global _warned
    mod, reason = _load()
    if mod is None and not _warned and os.environ.get("FASTKD_NO_EXT_WARNING") != "1":
        _warned = True
        warnings.warn(f"fastkd: compiled kernels unavailable, using the reference backend. {reason}", stacklevel=3)
    return mod


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


def cuda_built() -> bool:
    """Whether ``fastkd._C`` holds CUDA kernels (decided at build time)."""
    mod = _load()[0]
    return bool(mod is not None and mod.cuda_built())


def cpu_capability() -> str:
    """The instruction-set level the C++ CPU kernels run at: ``default``, ``avx2`` or ``avx512``.

    The best level the CPU supports, or the lower one forced with ``FASTKD_CPU_CAPABILITY``; a
    level above the CPU's raises ValueError naming what the CPU supports. ``""`` without ``fastkd._C``.
    """
    mod = _load()[0]
    return "" if mod is None else mod.cpu_capability()


def cpu_capability_line() -> str:
    """One line for ``python -m fastkd.info``: the level in use, the CPU's best and the compiled ones."""
    mod = _load()[0]
    if mod is None:
        return "CPU kernels: unavailable"
    forced = os.environ.get("FASTKD_CPU_CAPABILITY", "")
    try:
        level = mod.cpu_capability()
    except ValueError as e:
        return f"CPU kernels: error: {e}"
    return (
        f"CPU kernels: {level} (this CPU: up to {mod.cpu_best_capability()}; compiled: "
        f"{', '.join(mod.cpu_built_capabilities())}; "
        + (
            f"forced by FASTKD_CPU_CAPABILITY={forced})"
            if forced
            else "FASTKD_CPU_CAPABILITY=default|avx2 forces a lower one)"
        )
    )
