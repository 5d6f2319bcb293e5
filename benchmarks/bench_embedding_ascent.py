"""Benchmarks of ``fastkd.embedding_ascent_`` (issue 5): one in-place gradient step on token embeddings.

Run: ``python -m pytest benchmarks/bench_embedding_ascent.py --benchmark-only -q``
(``FASTKD_BENCH_SIZES=quick|default|full``; ``bash benchmarks/run.sh`` runs the suite and the report).

Cases: embeddings ``[B, T, H]`` float32 on CPU (2 threads; issue 5's target is [64, 128, 768]),
bfloat16 on GPU. Two step variants: ``l2`` (L2-normalised step, projection onto an L2 ball of
radius 0.5 around the origin, max_norm 10, a token mask: the adversarial stage) and ``sign-momentum``
(MI-FGSM: momentum 0.9 with its buffer, sign step, L-inf box of radius 0.05, the mask).

Providers:

* ``eager``   — ``fastkd.reference_embedding_ascent_``: the step as eager PyTorch writes it (6-10
  kernels over the same memory, then the in-place copies).
* ``compile`` — ``torch.compile(fullgraph=True)`` of its math (``reference_ascent_values``) with the
  two in-place copies run eagerly: Inductor's CPU backend crashes compiling the ``copy_`` into the
  embeddings together with the three chained row reductions (``KeyError: 'bufN'`` in outer-loop
  fusion, pytorch issues #188228 / #196570).
* ``fastkd-cpu`` / ``fastkd-cuda`` / ``fastkd-triton`` — ``fastkd.embedding_ascent_(..., backend=...)``.

Mode ``forward`` only: the step is an optimiser-style update with no backward.

Floor (bytes that must move): read embeds, grad, origin and the mask, write embeds; with momentum
also read and write the buffer. ``floor_flops``: None (memory-bound, about 10 flops per element).
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from benchmarks import common
from benchmarks.common import CPU, DEFAULT_FULL, DEVICE, FULL, GPU, QUICK, bf16, f32
from fastkd.ops.embedding_ascent import OP, reference_ascent_values, reference_embedding_ascent_

VARIANTS = {
    "l2": {"norm": "l2", "radius": 0.5, "max_norm": 10.0, "momentum": 0.0},
    "sign-momentum": {"norm": "sign", "radius": 0.05, "max_norm": None, "momentum": 0.9},
}

# (variant, B, T, H, dtype, devices, size sets)
_CASES = [
    ("l2", 4, 32, 768, f32, CPU, QUICK),
    ("sign-momentum", 4, 32, 768, f32, CPU, QUICK),
    ("l2", 64, 128, 768, f32, CPU, DEFAULT_FULL),  # issue 5's CPU target case
    ("sign-momentum", 64, 128, 768, f32, CPU, DEFAULT_FULL),
    ("l2", 64, 128, 384, f32, CPU, FULL),
    ("l2", 256, 128, 1024, f32, CPU, FULL),
    ("l2", 4, 32, 768, bf16, GPU, QUICK),
    ("l2", 64, 128, 768, bf16, GPU, DEFAULT_FULL),
    ("sign-momentum", 64, 128, 768, bf16, GPU, DEFAULT_FULL),
    ("l2", 256, 512, 4096, bf16, GPU, DEFAULT_FULL),
    ("sign-momentum", 256, 512, 4096, bf16, GPU, FULL),
]


def _case_id(c) -> str:
    variant, B, T, H, dtype, devices, _ = c
    return f"{variant}-{B}x{T}x{H}-{common.dtype_name(dtype)}-{devices[0]}"


CASES = common.case_params(_CASES, _case_id)


def _inputs(B: int, T: int, H: int, dtype: torch.dtype, momentum: float):
    g = common.seeded_generator()
    e = common.randn(B, T, H, generator=g, dtype=dtype)
    grad = common.randn(B, T, H, generator=g, dtype=dtype)
    origin = e.clone()
    mask = torch.rand(B, T, generator=g, device=DEVICE) > 0.1
    buf = torch.zeros_like(e) if momentum > 0 else None
    return e, grad, origin, mask, buf


def make_fn(provider: str, variant: str, key: tuple, e, grad, origin, mask, buf):
    kw = dict(step_size=0.01, origin=origin, mask=mask, momentum_buffer=buf, **VARIANTS[variant])
    if provider == "eager":
        return lambda: reference_embedding_ascent_(e, grad, **kw)
    if provider == "compile":
        math_fn = common.compiled(reference_ascent_values, key)

        def fn():
            x, nb = math_fn(e, grad, **kw)
            e.copy_(x)
            if nb is not None:
                buf.copy_(nb)

        return fn
    backend = common.backend_of(provider)
    assert backend is not None, provider
    return lambda: fastkd.embedding_ascent_(e, grad, backend=backend, **kw)


@pytest.mark.parametrize("provider", common.provider_params([OP]))
@pytest.mark.parametrize("case", CASES)
def test_embedding_ascent(benchmark, case, provider):
    variant, B, T, H, dtype, _, _ = case
    opts = VARIANTS[variant]
    b = torch.empty((), dtype=dtype).element_size()
    n = B * T * H
    streams = 3 + (1 if opts["momentum"] > 0 else 0)  # embeds, grad, origin (+ buffer)
    # eager holds about 8 float32 temporaries of the embeddings' size at its peak (an upper bound)
    common.require_fit(
        n * b * streams + (8 * n * 4 if provider in ("eager", "compile") else 0), f"{provider} on {B}x{T}x{H}"
    )
    e, grad, origin, mask, buf = _inputs(B, T, H, dtype, opts["momentum"])
    fn = make_fn(provider, variant, (variant, B, T, H, dtype), e, grad, origin, mask, buf)
    floor = n * b * (streams + 1 + (1 if buf is not None else 0)) + B * T  # + write embeds (+ buffer), mask
    common.run_case(
        benchmark,
        op="embedding_ascent_",
        variant=variant,
        provider=provider,
        mode="forward",
        shape=f"{B}x{T}x{H}",
        dtype=dtype,
        fwd=fn,
        input_bytes=n * b * streams + B * T,
        floor_bytes=floor,
        floor_flops=None,
        extra={"family": "ascent", "step": variant},
    )
