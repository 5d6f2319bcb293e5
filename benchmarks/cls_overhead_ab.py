"""Issue 15 item 4 on a noisy machine: distill_loss fwd+bwd at classification sizes, fastkd against the
eager PyTorch loss, interleaved call by call in one process (the order alternates every call), so that
drift in the machine's speed hits both sides alike. pytest-benchmark times all rounds of one provider,
then the next: on a VM whose speed drifts that moves the ratio by more than the effect measured.

    python -m benchmarks.cls_overhead_ab [--reps 9] [--calls 1000] [--threads 2]

Prints, per size, the median over ``reps`` of the mean time per call, and the ratio eager / fastkd
(>= 1.0: fastkd is not slower, the item's target).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastkd
from benchmarks.bench_distill_loss import TEMPERATURE as T
from benchmarks.bench_distill_loss import eager_kl as eager  # the benchmark's ``eager`` provider

SIZES = ((64, 3), (256, 2), (256, 10))


def fused(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return fastkd.distill_loss(s, t, temperature=T)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for n, v in SIZES:
        s = torch.randn(n, v, requires_grad=True)
        t = torch.randn(n, v)
        per = {"eager": [], "fastkd": []}
        for _ in range(args.reps):
            acc = {"eager": 0.0, "fastkd": 0.0}
            for i in range(args.calls):
                order = (("eager", eager), ("fastkd", fused))
                for name, f in order if i % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    f(s, t).backward()
                    acc[name] += time.perf_counter() - t0
                    s.grad = None
            for k, total in acc.items():
                per[k].append(total / args.calls * 1e6)
        me, mf = statistics.median(per["eager"]), statistics.median(per["fastkd"])
        print(
            f"{n}x{v}: eager median {me:.1f} us (min {min(per['eager']):.1f}), fastkd median {mf:.1f} us "
            f"(min {min(per['fastkd']):.1f}): eager / fastkd = {me / mf:.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
