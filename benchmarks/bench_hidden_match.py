"""Benchmarks of ``fastkd.hidden_match`` (issue 4): multi-layer projection + hidden-state loss, against
the per-layer PyTorch loop users write and the same loop under ``torch.compile``.

Run: ``python -m pytest benchmarks/bench_hidden_match.py --benchmark-only -q``
(``FASTKD_BENCH_SIZES=quick|default|full``; ``bash benchmarks/run.sh`` runs the suite and the report).

Cases: L layer pairs of ``[B, T, Hs]`` student and ``[B, T, Ht]`` teacher states, float32 on CPU
(2 threads), bfloat16 on GPU. Issue 4's target: L = 6, B·T = 8192, Hs = 384, Ht = 768, MSE, one
projection per layer (``default`` and ``full``). The other cases vary the loss (cosine, nmse), the
projection (shared, none) and add a padding mask (each sequence keeps a random 50-100 % of its
tokens).

Providers:

* ``eager``   — ``fastkd.reference_hidden_match``: a Python loop over layers, ``F.linear`` per
  layer, the loss per token in float32, the masked mean (what TextBrewer / torchdistill do).
* ``compile`` — the same function under ``torch.compile(fullgraph=True)``.
* ``fastkd-cpu`` / ``fastkd-cuda`` / ``fastkd-triton`` — ``fastkd.hidden_match(..., backend=...)``.

The student states, weight and bias require grad, the teacher states do not. Modes: ``forward``
is the training forward (fastkd computes every gradient in it: its three GEMMs), ``backward`` the
backward alone, ``full`` both. Floors: ``floor_flops`` is the GEMM work of the mode (forward: the
projection, 2·L·N·Hs·Ht; full: projection, dS and dW, three times that; backward: None, as fastkd
moves it into the forward); ``floor_bytes`` reads the inputs once (and full also writes dS and dW).
The report gives the achieved fraction of the measured matmul rate.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from benchmarks import common
from benchmarks.common import CPU, DEFAULT_FULL, DEVICE, FULL, GPU, MODES, QUICK, bf16, f32
from fastkd.ops.hidden_match import OP

# (loss, projection, masked, L, B, T, Hs, Ht, dtype, devices, size sets)
_CASES = [
    # --- CPU, float32 ---------------------------------------------------------------------
    ("mse", "per_layer", False, 2, 2, 64, 64, 128, f32, CPU, QUICK),
    ("cosine", "none", True, 2, 2, 64, 128, 128, f32, CPU, QUICK),
    ("mse", "per_layer", False, 6, 16, 512, 384, 768, f32, CPU, DEFAULT_FULL),  # issue 4's CPU target
    ("cosine", "per_layer", True, 4, 8, 256, 256, 512, f32, CPU, DEFAULT_FULL),
    ("nmse", "shared", True, 4, 16, 128, 384, 768, f32, CPU, DEFAULT_FULL),
    ("cosine", "none", True, 6, 16, 512, 768, 768, f32, CPU, FULL),  # DistilBERT-style, no projection
    ("mse", "per_layer", True, 4, 32, 512, 312, 768, f32, CPU, FULL),  # TinyBERT-4 <- BERT-base widths
    # --- GPU, bfloat16 ----------------------------------------------------------------------
    ("mse", "per_layer", False, 2, 4, 128, 128, 256, bf16, GPU, QUICK),
    ("mse", "per_layer", False, 6, 16, 512, 384, 768, bf16, GPU, DEFAULT_FULL),  # issue 4's GPU target
    ("mse", "per_layer", True, 12, 32, 512, 768, 1024, bf16, GPU, DEFAULT_FULL),
    ("cosine", "shared", True, 6, 32, 512, 384, 768, bf16, GPU, DEFAULT_FULL),
    ("cosine", "none", True, 6, 32, 512, 768, 768, bf16, GPU, DEFAULT_FULL),
]


def _shape(c) -> str:
    _, _, _, L, B, T, Hs, Ht, *_ = c
    return f"L{L}xB{B}xT{T}x{Hs}to{Ht}"


def _case_id(c) -> str:
    loss, proj, masked, *_, dtype, devices, _ = c
    return f"{loss}-{proj}{'-masked' if masked else ''}-{_shape(c)}-{common.dtype_name(dtype)}-{devices[0]}"


CASES = common.case_params(_CASES, _case_id)


_INPUTS = common.InputCache()


def _inputs(key: tuple):
    proj, masked, L, B, T, Hs, Ht, dtype = key

    def make(g):
        def rnd(*shape, scale=1.0):
            return common.randn(*shape, generator=g, dtype=dtype, scale=scale)

        S = rnd(L, B, T, Hs).requires_grad_(True)
        Tt = rnd(L, B, T, Ht)
        W = b = None
        if proj != "none":
            wshape = (L, Ht, Hs) if proj == "per_layer" else (Ht, Hs)
            W = rnd(*wshape, scale=Hs**-0.5).requires_grad_(True)
            b = rnd(*wshape[:-1], scale=0.1).requires_grad_(True)
        mask = None
        if masked:
            gen = torch.Generator().manual_seed(1)
            lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
            mask = (torch.arange(T)[None, :] < lengths[:, None]).to(DEVICE)
        return S, Tt, W, b, mask

    return _INPUTS.get(key, make)


def make_fn(provider: str, loss: str, key: tuple):
    def eager(S, T, W, b, mask):
        return fastkd.reference_hidden_match(S, T, W, b, loss=loss, mask=mask)

    def fused(backend: str):
        def fn(S, T, W, b, mask):
            return fastkd.hidden_match(S, T, W, b, loss=loss, mask=mask, backend=backend)

        return fn

    return common.provider_fn(provider, eager=eager, key=(loss, *key), fastkd=fused)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", common.provider_params([OP]))
@pytest.mark.parametrize("case", CASES)
def test_hidden_match(benchmark, case, provider, mode):
    loss, proj, masked, L, B, T, Hs, Ht, dtype, _, _ = case
    elt = torch.empty((), dtype=dtype).element_size()
    N = B * T
    w_elems = 0 if proj == "none" else (L * Ht * Hs if proj == "per_layer" else Ht * Hs)
    b_elems = 0 if proj == "none" else (L * Ht if proj == "per_layer" else Ht)
    input_bytes = (L * N * (Hs + Ht) + w_elems + b_elems) * elt
    key = (proj, masked, L, B, T, Hs, Ht, dtype)
    held = _INPUTS.holds(key)  # frees the previous case's inputs before probing
    # Extra memory a provider may hold at its peak, in [L, N, Ht] tensors of 4 bytes (eager keeps the
    # projection, the difference and float32 copies per layer); an upper bound for the probe.
    extra = {"eager": 4, "compile": 3}.get(provider, 2) * L * N * Ht * 4
    common.require_fit((0 if held else input_bytes) + extra, f"{provider} {mode} on {_shape(case)}")
    S, Tt, W, b, mask = _inputs(key)
    fn = make_fn(provider, loss, key)
    gemm = 0 if proj == "none" else 2 * L * N * Hs * Ht
    floor_flops = {"forward": gemm, "backward": None, "full": 3 * gemm}[mode] or None
    read = input_bytes
    variant = None if (loss, proj, masked) == ("mse", "per_layer", False) else f"{loss}-{proj}" + "-masked" * masked
    floor_bytes = {"forward": read, "backward": None, "full": read + (L * N * Hs + w_elems + b_elems) * elt}[mode]
    common.run_case(
        benchmark,
        op="hidden_match",
        variant=variant,
        provider=provider,
        mode=mode,
        shape=_shape(case),
        dtype=dtype,
        fwd=lambda: fn(S, Tt, W, b, mask),
        leaves=tuple(x for x in (S, W, b) if x is not None),
        input_bytes=input_bytes,
        floor_bytes=floor_bytes,
        floor_flops=floor_flops,
        extra={
            "layers": L,
            "tokens": N,
            "hidden_student": Hs,
            "hidden_teacher": Ht,
            "loss": loss,
            "projection": proj,
            "kept_tokens": N if mask is None else int(mask.sum()),
        },
    )
