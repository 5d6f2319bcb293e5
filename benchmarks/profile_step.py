"""Profile the data-free step at the demo's settings, and time it against another checkout.

    python -m benchmarks.profile_step --method ood --steps 12            # operator table of this checkout
    python -m benchmarks.profile_step --ab /path/to/old/checkout --reps 2 # steps/s, old vs this, alternating
    python -m benchmarks.profile_step --src /path/to/old/checkout        # operator table of the old loop

Settings (issue 15): the MiniLM teacher (6 layers x 384; a seeded random head is enough for timing,
or ``--teacher DIR``), a student of 2 layers x 128 (4 heads, feed-forward 512), 32 rows of up to 64
tokens of WordNet glosses per step, CPU, 2 threads. Steps/s is measured between logged steps 5 and
``--steps`` from ``metrics.jsonl`` (model loading and student construction excluded).
Each A/B run is its own process; the two sides alternate so that a change of machine load hits both.
On a loaded machine wall time says little; the A/B run also reports CPU seconds per step: the
process's CPU time of a ``--steps`` run minus that of a 5-step run, divided by the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_teacher(out: str) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastkd.assets import prepare

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    src = prepare(assets=["minilm"], progress=False).minilm_dir
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=2).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


RUN = r"""
import json, os, sys, time, torch
sys.path.insert(0, {src!r})
from fastkd.loop import DistillConfig, distill
torch.set_num_threads({threads})
cfg = DistillConfig(teacher={teacher!r}, method={method!r}, ood={ood!r}, out_dir={out!r}, student_layers=2,
    student_hidden=128, student_heads=4, student_intermediate=512, max_steps={steps}, batch_size=32, max_length=64,
    eval_every=0, save_every=0, log_every=1, progress=False, seed=0, overwrite=True,
    method_options={options!r})
if {profile}:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as p:
        distill(cfg)
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=30))
else:
    import resource
    distill(cfg)
    recs = [json.loads(l) for l in open(os.path.join(cfg.out_dir, "metrics.jsonl")) if '"eval"' not in l]
    w = {{r["step"]: r["wall_s"] for r in recs}}
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({{"steps_per_s": ({steps} - 5) / (w[{steps}] - w[5]), "cpu_s": cpu.ru_utime + cpu.ru_stime}}))
"""


def run(src: str, method: str, steps: int, teacher: str, ood: str, threads: int, profile: bool) -> str:
    options = {"gen_every": 10, "gen_steps": 1} if method == "zskd" else {}
    with tempfile.TemporaryDirectory() as out:
        code = RUN.format(src=src, teacher=teacher, method=method, ood=ood, out=out, steps=steps, threads=threads,
                          options=options, profile=profile)  # fmt: skip
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return res.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="ood")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher", default=None, help="teacher folder (default: MiniLM with a seeded random head)")
    p.add_argument("--ood", default=None, help="OOD text (default: the WordNet glosses of fastkd.assets)")
    p.add_argument("--ab", default=None, help="another checkout to time against this one")
    p.add_argument("--methods", nargs="+", default=["ood", "zskd"], help="methods of the A/B run")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--src", default=HERE, help="checkout whose loop the operator table profiles (default: this one)")
    args = p.parse_args(argv)

    from fastkd.assets import prepare

    teacher = args.teacher or make_teacher(os.path.join(tempfile.gettempdir(), "fastkd-profile-teacher"))
    ood = args.ood or prepare(assets=["wordnet"], progress=False).wordnet_path
    if args.ab is None:
        print(run(args.src, args.method, args.steps, teacher, ood, args.threads, True))
        return 0
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for method in args.methods:
            for side, src in (("before", args.ab), ("after", HERE)):
                got = json.loads(run(src, method, args.steps, teacher, ood, args.threads, False).splitlines()[-1])
                short = json.loads(run(src, method, 6, teacher, ood, args.threads, False).splitlines()[-1])
                per_step = (got["cpu_s"] - short["cpu_s"]) / (args.steps - 6)
                rates.setdefault((method, side), []).append(got["steps_per_s"])
                cpus.setdefault((method, side), []).append(per_step)
                print(f"rep {rep + 1} {method} {side}: {got['steps_per_s']:.3f} steps/s, {per_step:.3f} CPU s/step", flush=True)
    for method in args.methods:
        b, a = max(rates[(method, "before")]), max(rates[(method, "after")])
        cb, ca = min(cpus[(method, "before")]), min(cpus[(method, "after")])
        print(
            f"{method}: wall {b:.3f} -> {a:.3f} steps/s ({a / b:.2f}x); CPU {cb:.3f} -> {ca:.3f} s/step ({cb / ca:.2f}x) "
            f"(best of {args.reps})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
