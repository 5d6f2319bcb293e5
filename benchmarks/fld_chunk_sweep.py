"""fused_linear_distill: time and memory against the chunk size (rows per chunk), next to eager.

The fused op walks the rows in chunks: each chunk runs its two logit GEMMs, the softmax-divergence
kernel and the student's two gradient GEMMs, and adds its weight gradient [V, H] into one float32
accumulator. Small chunks keep the [C, V] buffers small but make short GEMMs and one pass over the
accumulator each (at 16384 x 4096 x 128256 and 64 rows: 256 passes over 2 GiB); large chunks cost
memory. This sweep finds where the time flattens on a machine (``default_chunk_size`` is the choice).

    python -m benchmarks.fld_chunk_sweep                          # GPU case, cuda and triton backends
    python -m benchmarks.fld_chunk_sweep --device cpu --shape 2048x512x32000 --backends cpu --chunks 32,64,256

Prints a Markdown table (median of ``--reps`` fwd+bwd calls after one warm-up, peak memory above the
inputs) and writes it as JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import fastkd
from fastkd.ops.fused_linear_distill import default_chunk_size

TEMPERATURE = 2.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _peak_above(device: torch.device, base: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def time_one(fn, leaves, device: torch.device, reps: int) -> tuple[float, int | None]:
    """Median seconds of ``fn().backward()`` over ``reps`` calls after a warm-up, and the peak memory
    one call adds (CUDA only)."""

    def call():
        for x in leaves:
            x.grad = None
        fn().backward()
        _sync(device)

    call()
    base = _peak_reset(device)
    call()
    peak = _peak_above(device, base)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="16384x4096x128256", help="N x H x V")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="cuda,triton", help="comma list of fastkd backends")
    ap.add_argument("--chunks", default="64,256,512,1040,2048,4096", help="comma list of rows per chunk")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-eager", action="store_true", help="skip eager (it materialises the [N, V] logits)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    try:
        N, H, V = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape must be N x H x V, e.g. 16384x4096x128256, got {args.shape!r}")
    try:
        chunks = [int(c) for c in args.chunks.split(",") if c]
    except ValueError:
        ap.error(f"--chunks must be a comma list of positive ints, got {args.chunks!r}")
    if not chunks or min(chunks) < 1:
        ap.error(f"--chunks must be a comma list of positive ints, got {args.chunks!r}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs, ht = r(N, H).requires_grad_(True), r(N, H)
    ws, wt = r(V, H, scale=2 / H**0.5).requires_grad_(True), r(V, H, scale=2 / H**0.5)
    flops = 8 * N * H * V  # logits of both sides, then the student's two gradient GEMMs
    rows = []

    def add(provider: str, chunk: int | None, sec: float, peak: int | None) -> None:
        rows.append({
            "provider": provider, "chunk": chunk, "ms": sec * 1e3, "tflops": flops / sec / 1e12,
            "peak_mib": None if peak is None else peak / 2**20,
        })  # fmt: skip
        c = "" if chunk is None else f" chunk {chunk}"
        m = "" if peak is None else f", {peak / 2**20:.0f} MiB above the inputs"
        print(f"{provider}{c}: {sec * 1e3:.2f} ms ({flops / sec / 1e12:.1f} TFLOP/s){m}", flush=True)

    if not args.no_eager:

        def eager():
            s = hs @ ws.t()
            with torch.no_grad():
                t = ht @ wt.t()
            T = TEMPERATURE
            return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                            log_target=True) * (T * T)  # fmt: skip

        add("eager", None, *time_one(eager, (hs, ws), device, args.reps))
    for backend in [b for b in args.backends.split(",") if b]:
        for chunk in chunks:

            def fused(backend=backend, chunk=chunk):
                return fastkd.fused_linear_distill_loss(hs, ws, ht, wt, temperature=TEMPERATURE, backend=backend,
                                                        chunk_size=chunk)  # fmt: skip

            add(f"fastkd-{backend}", chunk, *time_one(fused, (hs, ws), device, args.reps))

    default = default_chunk_size(N, V, device)
    print(
        f"\n{N}x{H}x{V} {args.dtype} on {device} (default chunk here: {default} rows), fwd+bwd, median of {args.reps}"
    )
    print("\n| provider | chunk | ms | TFLOP/s | MiB above inputs |\n|---|---:|---:|---:|---:|")
    for row in rows:
        mib = "–" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        print(f"| {row['provider']} | {row['chunk'] or '–'} | {row['ms']:.2f} | {row['tflops']:.1f} | {mib} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            meta = {"shape": [N, H, V], "dtype": args.dtype, "device": str(device), "default_chunk": default}
            if device.type == "cuda":
                meta["device_name"] = torch.cuda.get_device_name(device)
            meta.update(torch=torch.__version__, reps=args.reps)
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
