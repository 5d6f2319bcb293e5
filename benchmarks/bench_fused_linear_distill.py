"""Benchmarks of ``fastkd.fused_linear_distill_loss`` (issue 16) against eager PyTorch with the logits
materialised, the same code under torch.compile, and Liger-Kernel's fused-linear JSD (GPU).

Run: ``python -m pytest benchmarks/bench_fused_linear_distill.py --benchmark-only -q``
(``FASTKD_BENCH_SIZES=quick|default|full``; ``bash benchmarks/run.sh`` runs the suite and the report).

Cases ``N x H x V``: student and teacher hidden states ``[N, H]`` and lm_heads ``[V, H]`` (no bias),
temperature 2, ``batchmean``; the student's hidden states and weight require grad, the teacher's do
not. CPU float32 ``4096 x 512 x 32000`` is issue 16's CPU target (peak memory at most 1/8 of eager's,
at least 1.5x eager's speed); GPU bfloat16 ``16384 x 4096 x 128256`` its GPU case.

Providers:

* ``eager``   — what users write: ``s = h_s @ W_s.T``, ``t = h_t @ W_t.T`` (under ``no_grad``), then
  ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True, reduction="batchmean") * T**2``
  (the ``jsd`` variant: ``fastkd.reference_distill_loss`` on the logits).
* ``compile`` — the same function under ``torch.compile(fullgraph=True)``.
* ``fastkd-cpu`` / ``fastkd-cuda`` / ``fastkd-triton`` — ``fastkd.fused_linear_distill_loss(...,
  backend=...)`` with the default chunk size.
* ``liger``   — ``LigerFusedLinearJSD`` (GPU, ``jsd`` variant only: Liger has no fused-linear KL).

Floor (FLOPs that must be done): forward computes both logits (4·N·H·V); full adds the student's
two gradient GEMMs (8·N·H·V). fastkd computes the gradients in the forward pass, so its
``forward`` is most of ``full``: compare ``full``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from benchmarks import common
from benchmarks.common import CPU, DEFAULT_FULL, FULL, GPU, MODES, QUICK, bf16, f32
from fastkd.ops.fused_linear_distill import OP

TEMPERATURE = 2.0
BETA = 0.5

# (variant, N, H, V, dtype, devices, size sets)
_CASES = [
    ("kl", 256, 64, 4096, f32, CPU, QUICK),
    ("kl", 1024, 256, 32000, f32, CPU, FULL),
    ("kl", 4096, 512, 32000, f32, CPU, DEFAULT_FULL),  # issue 16's CPU target case
    ("jsd", 4096, 512, 32000, f32, CPU, FULL),
    ("kl", 1024, 256, 32000, bf16, GPU, QUICK),
    ("kl", 16384, 4096, 128256, bf16, GPU, DEFAULT_FULL),  # issue 16's GPU case
    ("jsd", 16384, 4096, 128256, bf16, GPU, DEFAULT_FULL),  # against Liger's fused-linear JSD
]


def _case_id(c) -> str:
    variant, N, H, V, dtype, devices, _ = c
    return f"{variant}-{N}x{H}x{V}-{common.dtype_name(dtype)}-{devices[0]}"


CASES = common.case_params(_CASES, _case_id)


def _divergence(variant: str):
    if variant == "kl":

        def div(s, t):
            T = TEMPERATURE
            return F.kl_div(
                F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True
            ) * (T * T)

        return div
    return lambda s, t: fastkd.reference_distill_loss(s, t, temperature=TEMPERATURE, divergence="jsd", beta=BETA)


def make_fn(provider: str, variant: str, key: tuple):
    div = _divergence(variant)

    def eager(hs, ws, ht, wt):
        s = hs @ ws.t()
        with torch.no_grad():
            t = ht @ wt.t()
        return div(s, t)

    def liger():
        from liger_kernel.transformers import LigerFusedLinearJSD

        # Liger's JSD: beta weights the teacher the same way (beta = 0.5 is symmetric); no T^2 factor.
        # shift_labels (required positionally in 0.8.5): None, every row counts.
        loss = LigerFusedLinearJSD(jsd_beta=BETA, temperature=TEMPERATURE)
        return lambda hs, ws, ht, wt: loss(hs, ws, ht, wt, None)

    def fused(backend: str):
        def fn(hs, ws, ht, wt):
            return fastkd.fused_linear_distill_loss(
                hs, ws, ht, wt, temperature=TEMPERATURE, divergence=variant, beta=BETA, backend=backend
            )

        return fn

    return common.provider_fn(provider, eager=eager, key=key, fastkd=fused, liger=liger)


# Extra [N, V] buffers a provider may hold at its peak (a generous bound for the memory probe).
_EXTRA_BUFFERS = {"eager": 8, "compile": 5, "liger": 2}

_INPUTS = common.InputCache()


def _inputs(N: int, H: int, V: int, dtype: torch.dtype):
    def make(g):
        def r(*shape, scale=1.0):
            return common.randn(*shape, generator=g, dtype=dtype, scale=scale)

        hs, ht = r(N, H), r(N, H)
        ws, wt = r(V, H, scale=2 / H**0.5), r(V, H, scale=2 / H**0.5)
        return hs.requires_grad_(True), ws.requires_grad_(True), ht, wt

    return _INPUTS.get((N, H, V, dtype), make)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", common.provider_params([OP], liger=True))
@pytest.mark.parametrize("case", CASES)
def test_fused_linear_distill(benchmark, case, provider, mode):
    variant, N, H, V, dtype, _, _ = case
    if provider == "liger" and variant != "jsd":
        pytest.skip("Liger-Kernel has a fused-linear JSD, no fused-linear KL")
    b = torch.empty((), dtype=dtype).element_size()
    key = (N, H, V, dtype)
    inputs_bytes = (2 * N * H + 2 * V * H) * b
    need = (0 if _INPUTS.holds(key) else inputs_bytes) + _EXTRA_BUFFERS.get(provider, 1) * N * V * max(b, 4)
    common.require_fit(need, f"{provider} {mode} on {N}x{H}x{V} {common.dtype_name(dtype)}")
    hs, ws, ht, wt = _inputs(N, H, V, dtype)
    fn = make_fn(provider, variant, key)
    flops = {"forward": 4 * N * H * V, "backward": None, "full": 8 * N * H * V}[mode]
    common.run_case(
        benchmark,
        op="fused_linear_distill",
        variant=None if variant == "kl" else variant,
        provider=provider,
        mode=mode,
        shape=f"{N}x{H}x{V}",
        dtype=dtype,
        fwd=lambda: fn(hs, ws, ht, wt),
        leaves=(hs, ws),
        input_bytes=inputs_bytes,
        floor_flops=flops,
        extra={"family": "lm-head", "temperature": TEMPERATURE},
    )
