"""Shared test setup.

* Without a GPU, Triton kernels run on CPU tensors under TRITON_INTERPRET=1; the variable must be
  set before any @triton.jit kernel is defined, so it is set here, first.
* ``backend_params(op)`` lists the backends that can run here for parametrisation; a backend that is
  not available is skipped with its reason, never silently dropped. ``fused_op_params`` does the
  same for an op's raw ``torch.library`` ops (opcheck), and ``TRITON_NUMPY_WARNINGS`` filters the
  numpy warnings of the Triton interpreter.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTKD_NO_EXT_WARNING", "0")

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton kernels run on the CPU through the (exact but slow) interpreter: tests keep their shapes small.
INTERPRETED = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

# Max-normalised error tolerances of the softmax losses (distill_loss, topk_distill) against float64:
# |actual - ref|.max() / |ref|.max(). The loss accumulates in float32 for every input dtype; a
# gradient is rounded to the input dtype once (2**-9 relative for bfloat16, 2**-11 for float16).
LOGITS_TOL = {
    torch.float64: {"loss": 1e-10, "grad": 1e-10},
    torch.float32: {"loss": 2e-5, "grad": 2e-5},
    torch.bfloat16: {"loss": 2e-5, "grad": 8e-3},
    torch.float16: {"loss": 2e-5, "grad": 2e-3},
}


def backend_params(op) -> list:
    """pytest params for every backend of an op, skipped with the reason when it cannot run here."""
    from fastkd.backends import BACKENDS

    params = []
    dev = torch.device(DEVICE)
    for name in BACKENDS:
        if name not in op.impls:
            continue
        ok, reason = op.usable(name, dev)
        if not ok and name == "cuda" and DEVICE == "cpu":
            reason = reason or "no CUDA device"
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def op_devices() -> list:
    """pytest params "cpu" and "cuda" for tests that call a compiled op of fastkd._C directly: its C++
    argument checks run in the CPU and in the CUDA entry point. "cuda" is skipped with the reason
    unless a GPU is present and fastkd._C was built with its CUDA kernels."""
    from fastkd import _ext

    ok = torch.cuda.is_available() and _ext.available() and _ext.cuda_built()
    why = "no CUDA device" if not torch.cuda.is_available() else "fastkd._C built without CUDA kernels"
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=[] if ok else [pytest.mark.skip(reason=why)]),
    ]


def fused_op_params(op, compiled: str, triton_op) -> list:
    """pytest params of getters of an op's raw ops: ``torch.ops.fastkd.<compiled>.default`` (fastkd._C,
    only when the extension is built) and the Triton custom op ``triton_op()`` (skipped with the
    reason where Triton cannot run); ids ``fastkd::<compiled>`` and ``fastkd::<compiled>_triton``."""
    from fastkd import _ext

    ops = []
    if _ext.available():
        ops.append(pytest.param(lambda: getattr(torch.ops.fastkd, compiled).default, id=f"fastkd::{compiled}"))
    ok, reason = op.usable("triton", torch.device(DEVICE))
    marks = [] if ok else [pytest.mark.skip(reason=f"triton unavailable: {reason}")]
    ops.append(pytest.param(triton_op, id=f"fastkd::{compiled}_triton", marks=marks))
    return ops


# The Triton interpreter evaluates masked-out lanes with numpy too (log(0), inf - inf), which warns.
TRITON_NUMPY_WARNINGS = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:triton"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning:triton"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning:triton"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
