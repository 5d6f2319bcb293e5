"""Benchmarks of ``fastkd.nearest_tokens`` (issue 5): decode embeddings into vocabulary ids.

Run: ``python -m pytest benchmarks/bench_nearest_tokens.py --benchmark-only -q``
(``FASTKD_BENCH_SIZES=quick|default|full``; ``bash benchmarks/run.sh`` runs the suite and the report).

Cases: N embeddings of width H against a vocabulary of V rows (BERT's 30522), top-k by cosine
similarity (``l2`` and ``dot`` variants in the full set); float32 on CPU (2 threads; issue 5's
target is N = 8192, V = 30522, H = 384, k = 1), bfloat16 on GPU.

Providers:

* ``eager``   — the usual decoding: normalise both sides, ``matmul``, ``topk`` (it materialises the
  [N, V] score matrix: 1 GB at the target case).
* ``compile`` — the same function under ``torch.compile(fullgraph=True)``.
* ``fastkd-cpu`` / ``fastkd-cuda`` / ``fastkd-triton`` — ``fastkd.nearest_tokens(..., backend=...)``.

Mode ``forward`` (no gradient). Floors: ``floor_flops`` = 2 N V H (the dot products; the CPU
kernel's default path does most of them as int8 GEMM, see csrc/nearest_tokens.cpp);
``floor_bytes`` = reading the embeddings and the vocabulary once and writing ids and scores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from benchmarks import common
from benchmarks.common import CPU, DEFAULT_FULL, FULL, GPU, QUICK, bf16, f32
from fastkd.ops.nearest_tokens import OP

BERT_V = 30522

# (metric, N, V, H, k, dtype, devices, size sets)
_CASES = [
    ("cosine", 256, 4096, 128, 1, f32, CPU, QUICK),
    ("cosine", 1024, BERT_V, 384, 1, f32, CPU, DEFAULT_FULL),
    ("cosine", 8192, BERT_V, 384, 1, f32, CPU, DEFAULT_FULL),  # issue 5's CPU target case
    ("cosine", 8192, BERT_V, 384, 10, f32, CPU, FULL),
    ("l2", 8192, BERT_V, 384, 1, f32, CPU, FULL),
    ("dot", 8192, BERT_V, 768, 1, f32, CPU, FULL),
    ("cosine", 256, 4096, 128, 1, bf16, GPU, QUICK),
    ("cosine", 8192, BERT_V, 384, 1, bf16, GPU, DEFAULT_FULL),
    ("cosine", 65536, BERT_V, 768, 1, bf16, GPU, DEFAULT_FULL),
    ("l2", 65536, 128256, 4096, 5, bf16, GPU, FULL),
]


def _case_id(c) -> str:
    metric, N, V, H, k, dtype, devices, _ = c
    return f"{metric}-{N}x{V}x{H}-k{k}-{common.dtype_name(dtype)}-{devices[0]}"


CASES = common.case_params(_CASES, _case_id)


def eager_nearest(e: torch.Tensor, w: torch.Tensor, k: int, metric: str):
    """The usual eager decoding: the whole [N, V] score matrix, then topk."""
    if metric == "cosine":
        return (F.normalize(e, dim=-1) @ F.normalize(w, dim=-1).T).topk(k, dim=-1)
    if metric == "dot":
        return (e @ w.T).topk(k, dim=-1)
    return torch.cdist(e, w).topk(k, dim=-1, largest=False)


_INPUTS = common.InputCache()


def _inputs(N: int, V: int, H: int, dtype: torch.dtype):
    def make(g):
        return common.randn(N, H, generator=g, dtype=dtype), common.randn(V, H, generator=g, dtype=dtype)

    return _INPUTS.get((N, V, H, dtype), make)


@pytest.mark.parametrize("provider", common.provider_params([OP]))
@pytest.mark.parametrize("case", CASES)
def test_nearest_tokens(benchmark, case, provider):
    metric, N, V, H, k, dtype, _, _ = case
    b = torch.empty((), dtype=dtype).element_size()
    inputs = (N + V) * H * b
    scores = N * V * max(b, 4) * (2 if provider in ("eager", "compile") else 0)  # eager: scores (+ topk's work)
    common.require_fit(inputs + scores + (N + V) * H * 4, f"{provider} on N={N} V={V} H={H}")
    e, w = _inputs(N, V, H, dtype)
    if provider in ("eager", "compile"):
        fn0 = eager_nearest if provider == "eager" else common.compiled(eager_nearest, (metric, N, V, H, k, dtype))
        fn = lambda: fn0(e, w, k, metric)
    else:
        backend = common.backend_of(provider)
        fn = lambda: fastkd.nearest_tokens(e, w, k=k, metric=metric, backend=backend)
    common.run_case(
        benchmark,
        op="nearest_tokens",
        variant=None if metric == "cosine" else metric,
        provider=provider,
        mode="forward",
        shape=f"{N}x{V}x{H}",
        dtype=dtype,
        fwd=fn,
        input_bytes=inputs,
        floor_bytes=inputs + N * k * (8 + 4),
        floor_flops=2 * N * V * H,
        extra={"family": "decode", "k": k, "metric": metric},
    )
