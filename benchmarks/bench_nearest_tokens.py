"""Benchmarks of fastkd.nearest_tokens: decode N = 8192 embeddings against BERT's vocabulary
(V = 30522, H = 384 as in MiniLM-sized models), top-1 by cosine similarity.

Providers: ``eager`` (the usual eager code: normalise both sides, ``matmul``, ``topk``: it
materialises the [N, V] score matrix), ``compile`` (``torch.compile`` of the same), ``fastkd-cpu``
(CPU float32, 2 threads); on a GPU (bfloat16) ``eager``, ``compile``, ``fastkd-cuda``,
``fastkd-triton``. Mode ``forward``.

Run: ``python -m pytest benchmarks/bench_nearest_tokens.py --benchmark-only -q``
(``-k small`` for a quick run with N = 1024).

extra_info: ``floor_flops`` = 2 N V H (the dot products); ``floor_bytes`` = reading the embeddings
and the vocabulary once plus writing ids and scores; ``peak_mem_bytes`` as in
``benchmarks/_peak_memory.py`` (CPU: peak resident memory one call adds, measured in a fresh
process; CUDA: peak allocated during the call).
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from benchmarks._peak_memory import cpu_peak_bytes, cuda_peak_bytes

HAS_CUDA = torch.cuda.is_available()
V, H, K = 30522, 384, 1
SHAPES = {"target": 8192, "small": 1024}
PROVIDERS = [
    ("cpu", "eager"),
    ("cpu", "compile"),
    ("cpu", "fastkd-cpu"),
    ("cuda", "eager"),
    ("cuda", "compile"),
    ("cuda", "fastkd-cuda"),
    ("cuda", "fastkd-triton"),
]


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def eager_nearest(e: torch.Tensor, w: torch.Tensor, k: int = K):
    """The usual eager decoding: cosine scores for the whole vocabulary, then topk."""
    en = torch.nn.functional.normalize(e, dim=-1)
    wn = torch.nn.functional.normalize(w, dim=-1)
    return (en @ wn.T).topk(k, dim=-1)


def build(device: str, provider: str, shape_name: str):
    """The call to time (also used by the peak-memory subprocess)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = _dtype(device)
    e = torch.randn(SHAPES[shape_name], H, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(V, H, generator=g).to(device=device, dtype=dtype)
    if provider == "eager":
        return lambda: eager_nearest(e, w)
    if provider == "compile":
        compiled = torch.compile(eager_nearest)
        return lambda: compiled(e, w)
    backend = provider.split("-", 1)[1]
    return lambda: fastkd.nearest_tokens(e, w, k=K, metric="cosine", backend=backend)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(("device", "provider"), PROVIDERS, ids=[f"{d}-{p}" for d, p in PROVIDERS])
def test_nearest_tokens(benchmark, device, provider, shape_name):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip(f"{provider} on cuda needs a CUDA device")
    if device == "cpu":
        torch.set_num_threads(2)
    N = SHAPES[shape_name]
    fn = build(device, provider, shape_name)
    fn()  # warm up (compilation, thread pools)
    if device == "cuda":
        peak = cuda_peak_bytes(fn)
        run = lambda: (fn(), torch.cuda.synchronize())
    else:
        peak = cpu_peak_bytes("benchmarks.bench_nearest_tokens", "build", device, provider, shape_name)
        run = fn
    dtype = _dtype(device)
    elem = torch.tensor([], dtype=dtype).element_size()
    dname = str(dtype).split(".")[-1]
    benchmark.group = f"nearest_tokens N={N} V={V} H={H} k={K} cosine {dname}"
    benchmark.extra_info.update(
        op="nearest_tokens",
        provider=provider,
        mode="forward",
        shape=[N, V, H],
        dtype=dname,
        device=device,
        k=K,
        metric="cosine",
        threads=torch.get_num_threads() if device == "cpu" else None,
        floor_bytes=(N + V) * H * elem + N * K * (8 + 4),
        floor_flops=2 * N * V * H,
        peak_mem_bytes=peak,
    )
    rounds = 3 if (shape_name == "target" and device == "cpu") else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
