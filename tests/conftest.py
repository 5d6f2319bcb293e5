"""Shared test setup.

* Without a GPU, Triton kernels run on CPU tensors under TRITON_INTERPRET=1; the variable must be
  set before any @triton.jit kernel is defined, so it is set here, first.
* ``backends_for(op)`` lists the backends that can run here for parametrisation; a backend that is
  not available is skipped with its reason, never silently dropped.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTKD_NO_EXT_WARNING", "0")

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
