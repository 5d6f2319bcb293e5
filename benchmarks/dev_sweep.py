"""Choose a method's demo options on the dev split (never the test split).

    python benchmarks/dev_sweep.py asdfd --steps 150 -O construct_steps=3 -O construct_step_size=0.1
    python benchmarks/dev_sweep.py t3 --steps 150 -O source_fraction=0.5

Runs one method with the demo's teacher, student and budget (``fastkd.demo``; the given ``-O``
options override the budget's) and prints the dev accuracy curve and the final dev accuracy, the
numbers the demo's settings are chosen by. The test split is not read. Each run appends one JSON line
to ``--log`` (default ``dev_sweep.jsonl``) so a sweep leaves its record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from fastkd import demo as D  # noqa: E402
from fastkd.cli import _parse_kv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "method",
        choices=(*D.METHODS, "supervised"),
        help="a demo method, or supervised (the upper bound: KD on the real training sentences)",
    )
    p.add_argument("--budget", choices=sorted(D.BUDGETS), default="cpu")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the budget's)")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE", help="method option")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None)
    p.add_argument("--work", default="fastkd-dev-sweep", help="folder for the runs")
    p.add_argument("--log", default="dev_sweep.jsonl", help="JSON lines record of the runs")
    args = p.parse_args(argv)

    from fastkd import assets as A
    from fastkd.loop import DistillConfig, distill
    from fastkd.methods import reads_ood
    from fastkd.models import load_classifier

    budget = D.BUDGETS[args.budget]
    steps = args.steps or budget.steps
    needed = ["minilm", "movie_reviews", "wordnet"] + (["smollm2"] if args.method == "t3" else [])
    assets = A.prepare(args.cache, assets=needed, progress=False)
    dev = D._device("auto")
    teacher_dir, _ = D.prepare_teacher(assets, budget, cache=args.cache, device=dev, seed=args.seed, teacher=None)
    t_model, tokenizer = load_classifier(teacher_dir, dev)
    t_model.eval().requires_grad_(False)
    given = _parse_kv(args.option, "-O/--option")
    options = {**budget.method_options.get(args.method, {}), **D.TASK_WORDS.get(args.method, {}), **given}
    if args.method == "t3":
        options["generator"] = os.path.join(assets.smollm2_dir, assets.smollm2_file)
    cfg = DistillConfig(
        teacher=teacher_dir, method=args.method, ood=assets.wordnet_path if reads_ood(args.method) else None,
        train=assets.split_path("train") if args.method == "supervised" else None,
        eval=assets.split_path("dev"), out_dir=str(Path(args.work) / args.method), student_layers=D.STUDENT["layers"],
        student_hidden=D.STUDENT["hidden"], student_heads=D.STUDENT["heads"],
        student_intermediate=D.STUDENT["intermediate"], max_steps=steps, batch_size=budget.batch_size,
        max_length=budget.max_length, lr=budget.lr, eval_every=max(10, steps // 6), save_every=0, seed=args.seed,
        device=str(dev), method_options=options, overwrite=True, progress=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = distill(cfg, teacher=t_model, tokenizer=tokenizer)
    curve = [(h["step"], round(100 * h["accuracy"], 1)) for h in result.history if "accuracy" in h]
    record = {
        "method": args.method, "budget": args.budget, "steps": steps, "seed": args.seed, "options": given,
        "dev_accuracy": result.final.get("accuracy"), "curve": curve, "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    with open(args.log, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
