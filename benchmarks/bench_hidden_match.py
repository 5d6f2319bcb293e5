"""Benchmarks of ``fastkd.hidden_match`` (multi-layer projection + hidden-state loss).

Run: ``python -m pytest benchmarks/bench_hidden_match.py --benchmark-only -q``
(``-k issue`` for the issue-4 shape only; CPU cases use the process's intra-op threads, set
``OMP_NUM_THREADS`` / ``torch.set_num_threads`` to pin them).

Providers (``extra_info["provider"]``):
  eager         the per-layer Python loop users write (``fastkd.reference_hidden_match``:
                ``F.linear`` per layer, loss per token, masked mean), autograd backward
  compile       the same loop under ``torch.compile``
  fastkd-cpu    the fused C++ op; fastkd-cuda / fastkd-triton: the fused GPU ops (GPU only)
Mode ``full`` = forward + backward (student states, weight and bias require grad, teacher states
do not); ``forward`` = the loss alone under ``torch.no_grad()``.

``peak_mem_bytes``: the memory one step needs above its inputs (states, parameters), gradients
included. CPU: measured in a fresh subprocess per case, which builds the inputs, runs one warm-up
step (compilation, library workspaces), frees its gradients, resets the kernel's high-water mark
(``/proc/self/clear_refs`` = 5) and reports ``VmHWM`` after one more step minus ``VmRSS`` before it;
glibc is told to serve every allocation above 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``) so that
freed tensors leave the resident set and the high-water mark follows live tensors. GPU:
``torch.cuda.max_memory_allocated`` over one step minus the allocation before it.
``floor_flops``: the three GEMMs' 2·L·N·Hs·Ht each (one in ``forward`` mode); ``floor_bytes``: the
inputs read once and the gradients written once. ``matmul_flops_per_s``: the device's measured rate
on the projection GEMM (one layer's ``S @ W^T`` through ``torch.mm``), to report the fraction reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import cache

import pytest
import torch

import fastkd
from fastkd.ops.hidden_match import OP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (id, L, B, T, Hs, Ht, loss, masked, projection)
SHAPES = [
    ("issue", 6, 16, 512, 384, 768, "mse", False, "per_layer"),
    ("small-cosine-masked", 4, 8, 256, 256, 512, "cosine", True, "per_layer"),
    ("shared-nmse", 4, 16, 128, 384, 768, "nmse", True, "shared"),
]
SHAPE_IDS = [s[0] for s in SHAPES]
CPU_PROVIDERS = ["eager", "compile", "fastkd-cpu"]
GPU_PROVIDERS = ["eager", "compile", "fastkd-cuda", "fastkd-triton"]
PROVIDERS = ["eager", "compile", "fastkd-cpu", "fastkd-cuda", "fastkd-triton"]


def make_case(shape_id: str, device: str, dtype: torch.dtype, seed: int = 0):
    _, L, B, T, Hs, Ht, loss, masked, proj = next(s for s in SHAPES if s[0] == shape_id)
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = torch.randn(L, B, T, Hs, generator=g).to(device, dtype).requires_grad_()
    Tt = torch.randn(L, B, T, Ht, generator=g).to(device, dtype)
    wshape = (L, Ht, Hs) if proj == "per_layer" else (Ht, Hs)
    W = (torch.randn(*wshape, generator=g) * Hs**-0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(*wshape[:-1], generator=g) * 0.1).to(device, dtype).requires_grad_()
    mask = None
    if masked:
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return (S, Tt, W, b, mask), {"loss": loss}


def make_fn(provider: str, kw: dict):
    if provider == "eager":
        return lambda S, T, W, b, m: fastkd.reference_hidden_match(S, T, W, b, mask=m, **kw)
    if provider == "compile":
        return torch.compile(lambda S, T, W, b, m: fastkd.reference_hidden_match(S, T, W, b, mask=m, **kw))
    backend = provider.split("-", 1)[1]
    return lambda S, T, W, b, m: fastkd.hidden_match(S, T, W, b, mask=m, backend=backend, **kw)


def make_step(provider: str, mode: str, inputs, kw):
    fn = make_fn(provider, kw)
    S, Tt, W, b, m = inputs
    params = (S, W, b)

    def full():
        for p in params:
            p.grad = None
        fn(S, Tt, W, b, m).backward()

    def forward():
        with torch.no_grad():
            return fn(S, Tt, W, b, m)

    return full if mode == "full" else forward


def floors(shape_id: str, mode: str, dtype: torch.dtype) -> tuple[int, int]:
    _, L, B, T, Hs, Ht, _, _, proj = next(s for s in SHAPES if s[0] == shape_id)
    N = B * T
    w = L * Ht * Hs if proj == "per_layer" else Ht * Hs
    elt = torch.finfo(dtype).bits // 8
    gemm = 2 * L * N * Hs * Ht
    if mode == "forward":
        return (L * N * (Hs + Ht) + w) * elt, gemm
    return (L * N * (Hs + Ht) + w + L * N * Hs + w) * elt, 3 * gemm


@cache
def matmul_rate(device: str, dtype: torch.dtype, N: int, Hs: int, Ht: int) -> float:
    """FLOP/s of one projection GEMM [N, Hs] @ [Hs, Ht] on this device (best of 5)."""
    a = torch.randn(N, Hs, device=device, dtype=dtype)
    w = torch.randn(Hs, Ht, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            torch.mm(a, w)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2.0 * N * Hs * Ht / best


_MEM_SCRIPT = r"""
import gc, json, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from benchmarks.bench_hidden_match import make_case, make_step
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
inputs, kw = make_case({shape!r}, "cpu", getattr(torch, {dtype!r}))
step = make_step({provider!r}, {mode!r}, inputs, kw)
step()
for x in inputs:
    if isinstance(x, torch.Tensor):
        x.grad = None
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS")
out = step()
peak = rss("VmHWM")
print(json.dumps({{"peak": peak - base}}))
"""


@cache
def cpu_peak_mem(shape_id: str, provider: str, mode: str, dtype_name: str) -> int | None:
    code = _MEM_SCRIPT.format(
        root=ROOT, threads=torch.get_num_threads(), shape=shape_id, dtype=dtype_name, provider=provider, mode=mode
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": ROOT}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
        return int(json.loads(r.stdout.strip().splitlines()[-1])["peak"])
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError, OSError):
        return None


def gpu_peak_mem(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("mode", ["full", "forward"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_id", SHAPE_IDS)
def test_hidden_match(benchmark, shape_id, provider, mode):
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if provider not in (GPU_PROVIDERS if on_gpu else CPU_PROVIDERS):
        pytest.skip(f"{provider} runs on {'CPU' if on_gpu else 'GPU'} only")
    if mode == "forward" and shape_id != "issue":
        pytest.skip("forward-only timing is kept to the issue shape")
    if provider.startswith("fastkd-"):
        ok, reason = OP.usable(provider.split("-", 1)[1], torch.device(device))
        if not ok:
            pytest.skip(reason)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    inputs, kw = make_case(shape_id, device, dtype)
    step = make_step(provider, mode, inputs, kw)
    step()  # warm-up (and compilation)

    def run():
        step()
        if on_gpu:
            torch.cuda.synchronize()

    rounds = 20 if on_gpu else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    _, L, B, T, Hs, Ht, loss, masked, proj = next(s for s in SHAPES if s[0] == shape_id)
    floor_bytes, floor_flops = floors(shape_id, mode, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    peak = gpu_peak_mem(step) if on_gpu else cpu_peak_mem(shape_id, provider, mode, dtype_name)
    benchmark.group = f"hidden_match {shape_id} {dtype_name}"
    benchmark.extra_info.update(
        op="hidden_match",
        provider=provider,
        mode=mode,
        shape=f"L={L} B={B} T={T} Hs={Hs} Ht={Ht} loss={loss} mask={masked} proj={proj}",
        dtype=dtype_name,
        device=torch.cuda.get_device_name() if on_gpu else "cpu",
        threads=torch.get_num_threads(),
        floor_bytes=floor_bytes,
        floor_flops=floor_flops,
        peak_mem_bytes=peak,
        matmul_flops_per_s=matmul_rate(device, dtype, B * T, Hs, Ht),
    )
