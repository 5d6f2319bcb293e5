"""Peak memory of one call, for the benchmarks' ``peak_mem_bytes``.

CPU (Linux): the call runs in a fresh Python process (``python -c``) that builds the case, calls it
once to warm up (library loading, thread pools, torch.compile), then tells glibc to map every buffer
above 64 KiB freshly and to return freed memory to the system (``mallopt(M_MMAP_THRESHOLD)``,
``malloc_trim``), resets the resident-set high-water mark (``/proc/self/clear_refs``) and calls
it again. ``VmHWM - VmRSS`` before that call is the peak resident memory the call adds, every
allocation included (ATen, BLAS workspaces, the outputs), and no heap page recycled from earlier
calls can hide one. A fresh process keeps the allocator settings out of the timed runs.

CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_here(fn: Callable[[], object]) -> int:
    """In this process: the peak resident memory one call of ``fn`` adds (fn already warmed up)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed: freed big buffers are unmapped at once
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    fn()
    return max(0, _status("VmHWM") - base)


def cpu_peak_bytes(module: str, builder: str, *args: object, threads: int = 2, timeout: int = 900) -> int | None:
    """Run ``module.builder(*args)`` (which returns the call to measure) in a fresh process and return
    the peak resident memory one call adds; None where /proc/self/clear_refs is unavailable."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    code = (
        "import importlib, sys, torch\n"
        f"torch.set_num_threads({threads})\n"
        f"from benchmarks._peak_memory import peak_here\n"
        f"fn = getattr(importlib.import_module({module!r}), {builder!r})(*{args!r})\n"
        "fn()\n"
        "print('PEAK', peak_here(fn))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    for line in r.stdout.splitlines():
        if line.startswith("PEAK "):
            return int(line.split()[1])
    raise RuntimeError(f"peak-memory subprocess failed: {r.stderr[-2000:]}")


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
