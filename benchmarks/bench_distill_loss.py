"""Benchmarks of ``fastkd.distill_loss`` (issue 3) against eager PyTorch, torch.compile and Liger-Kernel.

Run: ``python -m pytest benchmarks/bench_distill_loss.py --benchmark-only -q``
(``FASTKD_BENCH_SIZES=quick|default|full``; ``bash benchmarks/run.sh`` runs the suite and the report).

Cases: classification logits ``[B, C]`` and token-level logits ``[B*T, V]``, V from 2 to 131072,
float32 on CPU (2 threads), bfloat16 on GPU (plus float32 at 16384 x 131072, the shape of
Liger-Kernel's stored KL benchmark). Temperature 2, ``batchmean``, the teacher does not need a
gradient (the usual KD loss); the ``jsd`` variant uses beta = 0.5.

Providers:

* ``eager``   — what users write: ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T),
  log_target=True, reduction="batchmean") * T**2`` in the logits' dtype (the cheapest eager form;
  it does not upcast bf16). The ``jsd`` variant uses ``fastkd.reference_distill_loss``.
* ``compile`` — the same function under ``torch.compile(fullgraph=True)``, warmed up outside the timing.
* ``fastkd-cpu`` / ``fastkd-cuda`` / ``fastkd-triton`` — ``fastkd.distill_loss(..., backend=...)``.
* ``liger``   — ``log_softmax`` of both + ``LigerKLDIVLoss(log_target=True)`` / ``LigerJSD`` (GPU,
  when ``liger_kernel`` is installed).

Classification sizes (per-call overhead, issue 15): ``64x3``, ``256x2`` and ``256x10`` float32
fwd+bwd, fastkd against eager, in one run::

    FASTKD_BENCH_PROVIDERS=eager,fastkd-cpu python -m pytest benchmarks/bench_distill_loss.py \
        --benchmark-only -q -k "full and (cls-64x3- or cls-256x2- or cls-256x10-)"

Modes: ``forward`` is the training forward (the student logits require grad: fastkd writes the
gradient in this pass), ``backward`` the backward alone, ``full`` both.

Floor (bytes that must move): forward reads s and t once (2·N·V·b); full also writes the student
gradient (3·N·V·b). Backward alone has no meaningful floor (fastkd moves the work into forward),
so none is given. The report divides the floor by the measured copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from benchmarks import common
from benchmarks.common import CPU, DEFAULT_FULL, FULL, GPU, MODES, QUICK, bf16, f32
from fastkd.ops.distill_loss import OP

TEMPERATURE = 2.0
BETA = 0.5

# (variant, family, N, V, dtype, devices, size sets). family "cls" = [B, C], "tok" = [B*T, V].
_CASES = [
    # --- CPU, float32 ---------------------------------------------------------------------
    ("kl", "cls", 64, 10, f32, CPU, QUICK),
    ("kl", "tok", 256, 4096, f32, CPU, QUICK),
    ("jsd", "tok", 256, 4096, f32, CPU, QUICK),
    ("kl", "cls", 64, 3, f32, CPU, DEFAULT_FULL),
    ("kl", "cls", 256, 2, f32, CPU, DEFAULT_FULL),
    ("kl", "cls", 256, 10, f32, CPU, DEFAULT_FULL),
    ("kl", "cls", 256, 100, f32, CPU, FULL),
    ("kl", "cls", 256, 1000, f32, CPU, DEFAULT_FULL),
    ("kl", "tok", 1024, 8192, f32, CPU, DEFAULT_FULL),
    ("kl", "tok", 1024, 32000, f32, CPU, DEFAULT_FULL),
    ("kl", "tok", 1024, 131072, f32, CPU, DEFAULT_FULL),
    ("kl", "tok", 4096, 2048, f32, CPU, FULL),
    ("kl", "tok", 4096, 8192, f32, CPU, FULL),
    ("kl", "tok", 4096, 32000, f32, CPU, DEFAULT_FULL),  # issue 3's CPU target case
    ("kl", "tok", 4096, 65536, f32, CPU, FULL),
    ("kl", "tok", 4096, 131072, f32, CPU, FULL),
    ("jsd", "tok", 1024, 32000, f32, CPU, DEFAULT_FULL),
    # --- GPU, bfloat16 (and float32 at Liger's stored shape) -------------------------------
    ("kl", "cls", 64, 10, bf16, GPU, QUICK),
    ("kl", "tok", 1024, 4096, bf16, GPU, QUICK),
    ("jsd", "tok", 1024, 4096, bf16, GPU, QUICK),
    ("kl", "cls", 256, 2, bf16, GPU, DEFAULT_FULL),
    ("kl", "cls", 256, 10, bf16, GPU, DEFAULT_FULL),
    ("kl", "cls", 256, 100, bf16, GPU, DEFAULT_FULL),
    ("kl", "cls", 256, 1000, bf16, GPU, DEFAULT_FULL),
    ("kl", "tok", 16384, 2048, bf16, GPU, DEFAULT_FULL),
    ("kl", "tok", 16384, 8192, bf16, GPU, DEFAULT_FULL),
    ("kl", "tok", 16384, 32000, bf16, GPU, DEFAULT_FULL),
    ("kl", "tok", 16384, 65536, bf16, GPU, DEFAULT_FULL),
    ("kl", "tok", 16384, 131072, bf16, GPU, DEFAULT_FULL),  # issue 3's GPU target case
    ("kl", "tok", 16384, 131072, f32, GPU, DEFAULT_FULL),
    ("jsd", "tok", 16384, 32000, bf16, GPU, DEFAULT_FULL),
]


def _case_id(c) -> str:
    variant, family, N, V, dtype, devices, _ = c
    return f"{variant}-{family}-{N}x{V}-{common.dtype_name(dtype)}-{devices[0]}"


CASES = common.case_params(_CASES, _case_id)


# --------------------------------------------------------------------------------------------
# Providers.
# --------------------------------------------------------------------------------------------
def eager_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The usual eager Hinton KD loss."""
    T = TEMPERATURE
    ls = F.log_softmax(s / T, dim=-1)
    lt = F.log_softmax(t / T, dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True) * (T * T)


def eager_jsd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return fastkd.reference_distill_loss(s, t, temperature=TEMPERATURE, divergence="jsd", beta=BETA)


def _liger_fn(variant: str):
    from liger_kernel.transformers.jsd import LigerJSD
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    T = TEMPERATURE
    if variant == "kl":
        loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        loss = LigerJSD(beta=BETA)

    def fn(s, t):
        return loss(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)) * (T * T)

    return fn


def make_fn(provider: str, variant: str, key: tuple):
    def fused(backend: str):
        def fn(s, t):
            return fastkd.distill_loss(s, t, temperature=TEMPERATURE, divergence=variant, beta=BETA, backend=backend)

        return fn

    return common.provider_fn(
        provider,
        eager=eager_kl if variant == "kl" else eager_jsd,
        key=key,
        fastkd=fused,
        liger=lambda: _liger_fn(variant),
    )


# Extra [N, V] buffers each provider may hold at its peak (in the logits' element size; eager
# and Liger materialise the log-probabilities, their gradients and the pointwise loss). A generous
# upper bound for the memory probe, not a measurement.
_EXTRA_BUFFERS = {"eager": 7, "compile": 4, "liger": 7}


_INPUTS = common.InputCache()


def _inputs(N: int, V: int, dtype: torch.dtype):
    def make(g):
        s = common.randn(N, V, generator=g, dtype=dtype, scale=2)
        t = common.randn(N, V, generator=g, dtype=dtype, scale=2)
        return s.requires_grad_(True), t

    return _INPUTS.get((N, V, dtype), make)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", common.provider_params([OP], liger=True))
@pytest.mark.parametrize("case", CASES)
def test_distill_loss(benchmark, case, provider, mode):
    variant, family, N, V, dtype, _, _ = case
    b = torch.empty((), dtype=dtype).element_size()
    elems = N * V
    # The reference JSD computes in float32 whatever the logits' dtype.
    b_work = 4 if provider in ("eager", "compile") and variant == "jsd" else b
    key = (N, V, dtype)
    need = (0 if _INPUTS.holds(key) else 2 * elems * b) + _EXTRA_BUFFERS.get(provider, 2) * elems * max(b, b_work)
    common.require_fit(need, f"{provider} {mode} on [{N}, {V}] {common.dtype_name(dtype)}")
    s, t = _inputs(N, V, dtype)
    fn = make_fn(provider, variant, (variant, N, V, dtype))
    eager = eager_kl if variant == "kl" else eager_jsd
    floor = {"forward": 2 * elems * b, "backward": None, "full": 3 * elems * b}[mode]
    common.run_case(
        benchmark,
        op="distill_loss",
        variant=None if variant == "kl" else variant,
        provider=provider,
        mode=mode,
        shape=f"{N}x{V}",
        dtype=dtype,
        fwd=lambda: fn(s, t),
        leaves=(s,),
        input_bytes=2 * elems * b,
        floor_bytes=floor,
        extra={"family": family, "temperature": TEMPERATURE},
        baseline=lambda: eager(s, t),
    )
