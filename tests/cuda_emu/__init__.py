"""The one build helper of the CUDA-kernel emulation (``tests/cuda_emu/``).

Each ``emu_*.cpp`` here compiles some of ``csrc/*.cuh`` with g++ under the host emulation of
``cuda_host_emu.h`` (each CUDA thread a fiber; ``__syncthreads``, warp shuffles and dynamic shared
memory emulated), so that machines without a GPU test the CUDA kernels' logic. :func:`load` builds
one of them into a shared library, cached in the temporary folder under a hash of every source it
depends on (and of the torch version, whose headers it includes), and loads it with ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

EMU_DIR = Path(__file__).resolve().parent
CSRC = EMU_DIR.parents[1] / "csrc"
# The dtype codes every emu_*.cpp uses.
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _sources(source: str, extra: tuple[str, ...]) -> list[Path]:
    return [EMU_DIR / source, EMU_DIR / "cuda_host_emu.h", *sorted(CSRC.glob("*.cuh")), *(CSRC / e for e in extra)]


def library_path(source: str, extra_deps: tuple[str, ...] = ()) -> Path:
    """Where the build of ``source`` (a file of tests/cuda_emu/) is cached; ``extra_deps``: other
    csrc/ files it includes besides the ``*.cuh`` (e.g. ``hidden_match_math.h``)."""
    deps = _sources(source, extra_deps)
    key = hashlib.sha256(b"".join(p.read_bytes() for p in deps) + torch.__version__.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fastkd_cuda_emu_{Path(source).stem}_{key}.so"


@functools.cache
def load(source: str, extra_deps: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (once per content) and load ``tests/cuda_emu/<source>``; skips the test without g++."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is needed to build the CUDA kernel emulation")
    path = library_path(source, extra_deps)
    if not path.exists():
        from torch.utils.cpp_extension import include_paths

        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        cmd = [gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas"]
        cmd += [f"-I{CSRC}", f"-I{EMU_DIR}", *(f"-I{p}" for p in include_paths()), str(EMU_DIR / source)]
        cmd += ["-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"building the CUDA emulation {source} failed:\n{r.stderr[-4000:]}"
        os.replace(tmp, path)  # atomic: a parallel test process sees the old state or the whole library
    return ctypes.CDLL(str(path))
