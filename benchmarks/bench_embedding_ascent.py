"""Benchmarks of fastkd.embedding_ascent_: one in-place step on [64, 128, 768] token embeddings.

Providers: ``eager`` (``reference_embedding_ascent_``: the step as eager PyTorch writes it, 6-10
kernels over the same memory), ``compile`` (``torch.compile`` of its math,
``reference_ascent_values``, with the two in-place copies run eagerly: inductor's CPU backend
crashes compiling the copy_ into embeds together with the three chained row reductions, KeyError
'bufN' in outer-loop fusion, pytorch issues #188228 / #196570), ``fastkd-cpu`` (CPU float32, 2
threads); on a GPU (bfloat16) ``eager``, ``compile``, ``fastkd-cuda``, ``fastkd-triton``.
Mode ``forward``: the update has no backward.

Run: ``python -m pytest benchmarks/bench_embedding_ascent.py --benchmark-only -q``
(``-k small`` for a quick run on [8, 128, 768]).

extra_info: ``floor_bytes`` is the memory floor of one step (read embeds, grad, origin, the mask and
the momentum buffer, write embeds and the buffer, each once); ``floor_flops`` None (memory-bound,
~10 flops per element); ``peak_mem_bytes`` as in ``benchmarks/_peak_memory.py`` (CPU: peak
resident memory one call adds, measured in a fresh process; CUDA: peak allocated during the call).
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from benchmarks._peak_memory import cpu_peak_bytes, cuda_peak_bytes
from fastkd.ops.embedding_ascent import reference_ascent_values, reference_embedding_ascent_

HAS_CUDA = torch.cuda.is_available()
CASES = {
    "l2-radius-maxnorm-mask": {"norm": "l2", "radius": 0.5, "max_norm": 10.0, "momentum": 0.0},
    "sign-momentum-radius-mask": {"norm": "sign", "radius": 0.05, "max_norm": None, "momentum": 0.9},
}
SHAPES = {"target": (64, 128, 768), "small": (8, 128, 768)}
# (device, provider): CPU float32 with 2 threads; GPU bfloat16.
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


def _inputs(shape, device, momentum):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = _dtype(device)
    e = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    origin = e.clone()
    mask = (torch.rand(shape[:-1], generator=g) > 0.1).to(device)
    buf = torch.zeros_like(e) if momentum > 0 else None
    return e, grad, origin, mask, buf


def build(device: str, provider: str, case: str, shape_name: str):
    """The call to time: one in-place step (also used by the peak-memory subprocess)."""
    opts = CASES[case]
    e, grad, origin, mask, buf = _inputs(SHAPES[shape_name], device, opts["momentum"])
    kw = dict(step_size=0.01, origin=origin, mask=mask, momentum_buffer=buf, **opts)
    if provider == "eager":
        return lambda: reference_embedding_ascent_(e, grad, **kw)
    if provider == "compile":
        compiled = torch.compile(reference_ascent_values)

        def fn():
            x, nb = compiled(e, grad, **kw)
            e.copy_(x)
            if nb is not None:
                buf.copy_(nb)

        return fn
    backend = provider.split("-", 1)[1]
    return lambda: fastkd.embedding_ascent_(e, grad, backend=backend, **kw)


def _floor_bytes(shape, device, momentum) -> int:
    n = 1
    for s in shape:
        n *= s
    elem = torch.tensor([], dtype=_dtype(device)).element_size()
    streams = 4 + (2 if momentum > 0 else 0)  # read e, grad, origin; write e; read + write buffer
    return n * elem * streams + n // shape[-1]  # + the mask


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("device", "provider"), PROVIDERS, ids=[f"{d}-{p}" for d, p in PROVIDERS])
def test_embedding_ascent(benchmark, device, provider, case, shape_name):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip(f"{provider} on cuda needs a CUDA device")
    if device == "cpu":
        torch.set_num_threads(2)
    shape = SHAPES[shape_name]
    fn = build(device, provider, case, shape_name)
    fn()  # warm up (compilation, thread pools)
    if device == "cuda":
        peak = cuda_peak_bytes(fn)
        run = lambda: (fn(), torch.cuda.synchronize())
    else:
        peak = cpu_peak_bytes("benchmarks.bench_embedding_ascent", "build", device, provider, case, shape_name)
        run = fn
    dtype = str(_dtype(device)).split(".")[-1]
    benchmark.group = f"embedding_ascent_ {case} {list(shape)} {dtype}"
    benchmark.extra_info.update(
        op="embedding_ascent_",
        provider=provider,
        mode="forward",
        shape=list(shape),
        dtype=dtype,
        device=device,
        case=case,
        threads=torch.get_num_threads() if device == "cpu" else None,
        floor_bytes=_floor_bytes(shape, device, CASES[case]["momentum"]),
        floor_flops=None,
        peak_mem_bytes=peak,
    )
    benchmark.pedantic(run, rounds=20 if shape_name == "target" else 50, iterations=1, warmup_rounds=2)
