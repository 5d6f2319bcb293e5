"""Does the DFKD-T3 rewriter learn within a CPU budget? (issue 13, analysis only: no student, no test split)

Tunes the rewriter for ``--steps`` REINFORCE updates at ``--lr`` (the benchmark's pool settings
otherwise: ``quality.T3_POOL``), samples ``--rows`` rewrites with random intended labels (same seed,
so the same sources and labels for every setting), and counts how often the teacher gives the
intended label, overall and per class, with the tuning history (reward terms per update) and the
pool statistics. Writes one JSON per call.

    python benchmarks/t3_tune_probe.py --task tweets --teacher DIR --steps 48 --lr 1e-4 --out probe.json

``--teacher``: a fine-tuned teacher folder (``quality.py --prepare-only`` makes and caches them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from benchmarks import quality  # noqa: E402  (the benchmark's pool settings)
from fastkd import assets as A  # noqa: E402
from fastkd.data import load_text  # noqa: E402
from fastkd.methods.t3 import T3, generate_dataset  # noqa: E402
from fastkd.models import load_classifier  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=sorted(quality.TASK_WORDS))
    ap.add_argument("--teacher", required=True, help="fine-tuned teacher folder")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--steps", type=int, default=48, help="REINFORCE updates before sampling")
    ap.add_argument("--lr", type=float, default=1e-5, help="generator learning rate (t3's tune_lr)")
    ap.add_argument("--layers", type=int, default=2, help="tuned top blocks (t3's tune_layers; 0: all)")
    ap.add_argument("--rows", type=int, default=128, help="rewrites sampled after tuning")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="asset cache (default: $FASTKD_CACHE, else ~/.cache/fastkd)")
    a = ap.parse_args(argv)
    if a.steps < 0 or a.rows < 1 or a.lr <= 0:
        ap.error("--steps must be >= 0, --rows >= 1 and --lr > 0")
    torch.set_num_threads(a.threads)
    got = A.prepare(a.cache, assets=["smollm2", "wordnet"], progress=False)
    pool = quality.t3_pool_settings(a.task)
    spec = {k: v for k, v in pool.items() if k not in ("num_rows", "gen_dtype", "gen_batch")}
    spec.update(tune_steps=a.steps, tune_lr=a.lr, tune_layers=a.layers, gen_batch=16, **quality.TASK_WORDS[a.task])
    opts = T3.parse_options({**spec, "generator": os.path.join(got.smollm2_dir, got.smollm2_file)})
    teacher, tok = load_classifier(a.teacher, torch.device("cpu"))
    teacher.eval().requires_grad_(False)
    info: dict = {}
    t0 = time.time()
    rows = generate_dataset(
        teacher, tok, load_text(got.wordnet_path), opts, num_rows=a.rows, device=torch.device("cpu"),
        max_length=quality.BUDGET["max_length"], seed=a.seed, progress=False, info=info,
    )  # fmt: skip
    n_labels = int(teacher.config.num_labels)
    per_class = {}
    for k in range(n_labels):
        asked = [r for r in rows if r["intended_label"] == k]
        per_class[k] = {"asked": len(asked), "given": sum(r["label"] == k for r in asked)}
    res = {
        "task": a.task, "steps": a.steps, "lr": a.lr, "layers": a.layers, "rows": a.rows, "seed": a.seed,
        "threads": a.threads, "intended_frac": sum(r["label"] == r["intended_label"] for r in rows) / len(rows),
        "intended_per_class": per_class, "wall_s": round(time.time() - t0, 1), "tune_s": info.get("tune_s"),
        "pool": info.get("pool"), "history": info.get("tune_history"), "examples": [r["text"] for r in rows[:16]],
    }  # fmt: skip
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in ("steps", "lr", "intended_frac", "intended_per_class", "wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
