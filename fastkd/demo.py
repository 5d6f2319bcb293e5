"""``fastkd demo``: the whole job on a real model, offline, with one command.

What it does (``python -m fastkd.demo`` is the same command):

1. prepares the offline assets (:mod:`fastkd.assets`): the MiniLM encoder, the movie-review
   sentences with their fixed train/dev/test split, WordNet glosses as out-of-domain (OOD) text
   and, when ``t3`` runs, the SmolLM2 generator;
2. fine-tunes the teacher (MiniLM, 6 layers, hidden 384, 22.7 M parameters) on the training split,
   or reuses the one cached in ``<cache>/teachers/`` (:mod:`fastkd.teacher`);
3. distils it with each data-free method (``zskd``, ``asdfd``, ``t3``) and the ``random`` and
   ``ood`` baselines (:func:`fastkd.loop.distill`) into a student of 2 layers, hidden 128, 4 heads,
   feed-forward 512 (4.39 M parameters, 5.2x smaller: the teacher's vocabulary of 30,522 word
   pieces is kept, so the word embeddings dominate a small student and only a narrower hidden
   size makes it small; its embeddings start as the teacher's projected onto their top 128
   principal directions); no method sees the training split: the dev split is evaluated during
   training (the curves), the test split once at the end (the table);
4. prints a table (method, test accuracy, % of teacher, parameters, compression, student
   inference speed-up, wall time) and writes it as ``results.md`` and ``results.csv``, the run
   details as ``results.json``, and ``accuracy.png``: dev accuracy against training steps.

Budgets (``--budget``; ``--quick`` is ``--budget quick``):

* ``cpu`` (default without a GPU): all five methods, 300 steps of 32 rows each, 12.5 minutes on 2
  idle CPU cores once the teacher is cached (fine-tuning it takes ~6 more minutes the first time);
  the teacher's forward pass dominates a step, the adversarial and generator methods cost 2-4
  steps' worth each. 600 steps (``--steps 600``, 26.5 minutes) were tried and chosen against on
  the dev split: ood, zskd and t3 end where they were at 300 steps, and asdfd drifts away from
  the real data (dev accuracy 72.6% at step 200, 52.5% at step 600);
* ``quick``: ``random``, ``ood`` and ``zskd``, 120 steps each, 2.5 minutes; it uses the cached
  full teacher when there is one, otherwise it fine-tunes a quick teacher (1 epoch on 2,000
  training sentences);
* ``gpu`` (default with a GPU): all methods, 3,000 steps of 64 rows each.

``--steps``, ``--methods``, ``--batch-size`` and the ``--student-*`` options override a budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fastkd.errors import DemoError, FastKDError

__all__ = ["BUDGETS", "Budget", "add_arguments", "main", "run_demo"]

METHODS = ("random", "ood", "zskd", "asdfd", "t3")


@dataclass(frozen=True)
class Budget:
    """How much work one demo run does."""

    name: str
    methods: tuple[str, ...]
    steps: int
    batch_size: int = 32
    eval_every: int = 50
    lr: float = 5e-4
    max_length: int = 64
    teacher_epochs: int = 2
    teacher_train_rows: int | None = None  # None: the whole training split
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)


# Per-method options that keep the CPU budget's costs in line (generator work is the expensive part).
_CPU_OPTIONS = {
    "t3": {
        "pool_size": 256,
        "gen_batch": 16,
        "max_new_tokens": 32,
        "tune_steps": 2,
        "refresh_every": 200,
        "tune_batch": 8,
        # chosen on the dev split (benchmarks/dev_sweep.py, 300 steps): 73.9% with half of each batch
        # the WordNet source text against 71.4% on the 256 generated texts alone, which the student
        # memorises (KL 0.005 on them against 0.35 on dev in the first quality run)
        "source_fraction": 0.5,
    },
    "zskd": {"gen_every": 100, "gen_steps": 5},
    "asdfd": {"construct_steps": 3},
}

BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        "quick",
        ("random", "ood", "zskd"),
        steps=120,
        eval_every=40,
        teacher_epochs=1,
        teacher_train_rows=2000,
        method_options=_CPU_OPTIONS,
    ),
    "cpu": Budget("cpu", METHODS, steps=300, eval_every=50, method_options=_CPU_OPTIONS),
    "gpu": Budget(
        "gpu",
        METHODS,
        steps=3000,
        batch_size=64,
        eval_every=250,
        lr=3e-4,
        method_options={"t3": {"pool_size": 2048, "gen_batch": 64, "refresh_every": 500}},
    ),
}

STUDENT = {"layers": 2, "hidden": 128, "heads": 4, "intermediate": 512}
TASK_WORDS = {"t3": {"task": "movie review", "label_words": "negative,positive"}}


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[fastkd demo] {msg}", file=sys.stderr, flush=True)


def _device(name: str) -> torch.device:
    from fastkd.models import resolve_device

    return resolve_device(name)


def prepare_teacher(
    assets: Any, budget: Budget, *, cache: str | None, device: torch.device, seed: int, teacher: str | None
) -> tuple[str, dict[str, Any]]:
    """The teacher folder and its info: a given one, the cached full one, or a freshly fine-tuned one."""
    from fastkd import teacher as T
    from fastkd.data import load_labeled

    if teacher is not None:
        return teacher, {"source": "given", "path": teacher}
    train = load_labeled(assets.split_path("train"))
    dev = load_labeled(assets.split_path("dev"))
    full = {"epochs": 2, "lr": 5e-5, "batch_size": 32, "max_length": 64, "seed": seed}
    full_dir = T.default_output(cache, assets.minilm_dir, T._fingerprint(train), full)
    settings, rows, out = full, train, full_dir
    if budget.teacher_train_rows is not None or budget.teacher_epochs != 2:
        if (full_dir / T.META_FILE).is_file():
            _log(f"using the cached full teacher {full_dir}")
        else:
            rows = train[: budget.teacher_train_rows] if budget.teacher_train_rows else train
            settings = {**full, "epochs": budget.teacher_epochs}
            out = T.default_output(cache, assets.minilm_dir, T._fingerprint(rows), settings)
    _log(f"teacher: MiniLM fine-tuned on {len(rows)} training sentences, {settings['epochs']} epoch(s) -> {out}")
    metrics, reused = T.cached_finetune(assets.minilm_dir, rows, dev, out, device=device, **settings)
    _log(
        ("reused the cached teacher" if reused else "fine-tuned the teacher")
        + f": dev accuracy {metrics['accuracy']:.4f}"
    )
    return str(out), {
        "source": "cached" if reused else "fine-tuned",
        "path": str(out),
        "train_rows": len(rows),
        **settings,
        "dev": metrics,
    }


def _time_inference(
    model: Any, tokenizer: Any, rows: Sequence[dict], device: torch.device, max_length: int, repeats: int = 3
) -> float:
    """Median seconds to classify ``rows`` (batches of 64, after one warm-up batch)."""
    from fastkd.models import predict_logits

    predict_logits(model, tokenizer, rows[:64], batch_size=64, max_length=max_length, device=device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        predict_logits(model, tokenizer, rows, batch_size=64, max_length=max_length, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "cached"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _command_line() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    prog = "python -m fastkd.demo" if argv0 == "demo.py" else "fastkd"
    return " ".join([prog, *sys.argv[1:]])


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    head = "| method | test accuracy | % of teacher | parameters | compression | speed-up | wall time |\n"
    head += "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    body = ""
    for r in rows:
        acc = "failed" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        pct = "" if r["pct_of_teacher"] is None else f"{r['pct_of_teacher']:.1f}%"
        body += (
            f"| {r['method']} | {acc} | {pct} | {_fmt_params(r['parameters'])} | {r['compression']:.1f}x"
            f" | {r['speedup']:.1f}x | {_fmt_time(r['wall_time_s'])} |\n"
        )
    return head + body


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    cols = [
        "method",
        "accuracy",
        "macro_f1",
        "pct_of_teacher",
        "parameters",
        "compression",
        "speedup",
        "wall_time_s",
        "steps",
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})


def plot_curves(path: Path, curves: dict[str, list[dict[str, Any]]], teacher_dev: float | None, title: str) -> bool:
    """Dev accuracy against training steps per method; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for method, hist in curves.items():
        pts = [(h["step"], h["accuracy"]) for h in hist if "accuracy" in h]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=method)
    if teacher_dev is not None:
        ax.axhline(100 * teacher_dev, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class DemoReport:
    """Everything the demo's report shows, filled in as the run goes (written after every method)."""

    out: Path
    budget: Budget
    seed: int
    device: torch.device
    t_start: float
    ood_source: str | None
    test_rows: int
    shape: dict[str, int]
    teacher_info: dict[str, Any]
    teacher_test: dict[str, float]
    teacher_params: int
    teacher_time: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    student_time: float | None = None
    teacher_dev: float | None = None


def write_report(r: DemoReport, done: bool) -> tuple[str, dict[str, Any], bool]:
    """Write results.md/.csv/.json and the plot (after every method, so a stopped run keeps its results)."""
    table = render_table(r.rows)
    dev = r.device
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores" + (
        f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
    )
    total = time.perf_counter() - r.t_start
    budget, shape = r.budget, r.shape
    header = (
        f"fastkd demo, budget `{budget.name}` ({budget.steps} steps x {budget.batch_size} rows per method), seed {r.seed}, "
        f"device {dev} ({machine}), torch {torch.__version__}; total {_fmt_time(total)}.\n"
        + ("" if done else f"Partial results: {len(r.rows) - 1} of {len(budget.methods)} methods done.\n")
        + f"Teacher: MiniLM-L6-H384 fine-tuned on the movie-review training split ({r.teacher_info['source']}). "
        f"Student: {shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} heads, feed-forward {shape['intermediate']}. "
        f"Accuracy on the held-out test split ({r.test_rows:,} sentences); speed-up = teacher / student time to classify it on this device.\n\n"
    )
    (r.out / "results.md").write_text(header + table)
    write_csv(r.out / "results.csv", r.rows)
    plotted = plot_curves(
        r.out / "accuracy.png",
        r.curves,
        r.teacher_dev,
        f"fastkd demo ({budget.name} budget): dev accuracy during distillation",
    )
    summary = {
        "budget": asdict(budget),
        "device": str(dev),
        "machine": machine,
        "torch": torch.__version__,
        "seed": r.seed,
        "student": shape,
        "ood": r.ood_source,
        "teacher": {
            **r.teacher_info,
            "test": r.teacher_test,
            "parameters": r.teacher_params,
            "inference_s": r.teacher_time,
        },
        "student_inference_s": r.student_time,
        "rows": r.rows,
        "methods": r.details,
        "total_time_s": total,
        "plot": str(r.out / "accuracy.png") if plotted else None,
        "command": _command_line(),
    }
    (r.out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    return header + table, summary, plotted


def run_demo(
    budget: Budget,
    *,
    output: str | os.PathLike = "fastkd-demo",
    cache: str | None = None,
    device: str = "auto",
    seed: int = 0,
    teacher: str | None = None,
    ood: str | None = None,
    student: dict[str, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo with ``budget``; write the results under ``output`` and return them."""
    from fastkd import assets as A
    from fastkd.data import load_labeled
    from fastkd.loop import DistillConfig, distill
    from fastkd.methods import reads_ood
    from fastkd.models import evaluate, load_classifier
    from fastkd.student import count_parameters

    unknown = [m for m in budget.methods if m not in METHODS]
    if unknown:
        raise DemoError(f"unknown method(s) {unknown}; the demo runs {', '.join(METHODS)}")
    dev = _device(device)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. assets --------------------------------------------------------------------------------
    needed = ["movie_reviews"]
    if teacher is None:
        needed.insert(0, "minilm")
    if ood is None and any(reads_ood(m) for m in budget.methods):
        needed.append("wordnet")
    if "t3" in budget.methods:
        needed.append("smollm2")
    _log(
        f"budget {budget.name!r} on {dev}: methods {', '.join(budget.methods)}, {budget.steps} steps of {budget.batch_size} rows"
    )
    assets = A.prepare(cache, assets=needed, progress=progress)
    ood_source = ood or assets.wordnet_path
    dev_path, test_path = assets.split_path("dev"), assets.split_path("test")
    test_rows = load_labeled(test_path)

    # 2. teacher -------------------------------------------------------------------------------
    teacher_dir, teacher_info = prepare_teacher(assets, budget, cache=cache, device=dev, seed=seed, teacher=teacher)
    t_model, tokenizer = load_classifier(teacher_dir, dev)
    t_model.eval().requires_grad_(False)
    teacher_test = evaluate(t_model, tokenizer, test_rows, batch_size=64, max_length=budget.max_length, device=dev)
    teacher_params = count_parameters(t_model)
    teacher_time = _time_inference(t_model, tokenizer, test_rows, dev, budget.max_length)
    _log(f"teacher test accuracy {teacher_test['accuracy']:.4f} ({_fmt_params(teacher_params)} parameters)")

    # 3. distillation --------------------------------------------------------------------------
    shape = {**STUDENT, **(student or {})}
    r = DemoReport(
        out=out, budget=budget, seed=seed, device=dev, t_start=t_start, ood_source=ood_source,
        test_rows=len(test_rows), shape=shape, teacher_info=teacher_info, teacher_test=teacher_test,
        teacher_params=teacher_params, teacher_time=teacher_time,
    )  # fmt: skip
    r.rows.append(
        {
            "method": "teacher",
            "accuracy": teacher_test["accuracy"],
            "macro_f1": teacher_test["macro_f1"],
            "pct_of_teacher": 100.0,
            "parameters": teacher_params,
            "compression": 1.0,
            "speedup": 1.0,
            "wall_time_s": teacher_info.get("dev", {}).get("train_time_s")
            if teacher_info["source"] == "fine-tuned"
            else None,
            "steps": None,
        }
    )
    for i, method in enumerate(budget.methods, 1):
        _log(f"[{i}/{len(budget.methods)}] distilling with {method}")
        options = {**budget.method_options.get(method, {}), **TASK_WORDS.get(method, {})}
        if method == "t3":
            options["generator"] = os.path.join(assets.smollm2_dir, assets.smollm2_file)
        cfg = DistillConfig(
            teacher=teacher_dir,
            method=method,
            ood=ood_source if reads_ood(method) else None,
            eval=dev_path,
            out_dir=str(out / "runs" / method),
            student_layers=shape["layers"],
            student_hidden=shape["hidden"],
            student_heads=shape["heads"],
            student_intermediate=shape["intermediate"],
            max_steps=budget.steps,
            batch_size=budget.batch_size,
            max_length=budget.max_length,
            lr=budget.lr,
            eval_every=budget.eval_every,
            save_every=0,
            seed=seed,
            device=str(dev),
            method_options=options,
            overwrite=True,
            progress=progress,
        )
        try:
            result = distill(cfg, teacher=t_model, tokenizer=tokenizer)
        except Exception as exc:  # one failing method must not hide the others' results
            _log(f"{method} failed: {exc.__class__.__name__}: {exc}")
            r.rows.append(
                {
                    "method": method,
                    "accuracy": None,
                    "macro_f1": None,
                    "pct_of_teacher": None,
                    "parameters": 0,
                    "compression": 0.0,
                    "speedup": 0.0,
                    "wall_time_s": None,
                    "steps": 0,
                }
            )
            r.details[method] = {"error": f"{exc.__class__.__name__}: {exc}"}
            write_report(r, False)
            continue
        r.teacher_dev = result.teacher_metrics.get("accuracy", r.teacher_dev)
        s_model, s_tok = load_classifier(result.student_dir, dev)
        test = evaluate(s_model, s_tok, test_rows, batch_size=64, max_length=budget.max_length, device=dev)
        if r.student_time is None:  # every student has the same shape: time one of them
            r.student_time = _time_inference(s_model, s_tok, test_rows, dev, budget.max_length)
        r.curves[method] = list(result.history)
        r.rows.append(
            {
                "method": method,
                "accuracy": test["accuracy"],
                "macro_f1": test["macro_f1"],
                "pct_of_teacher": 100 * test["accuracy"] / teacher_test["accuracy"],
                "parameters": result.student_params,
                "compression": teacher_params / result.student_params,
                "speedup": teacher_time / r.student_time,
                "wall_time_s": result.wall_time_s,
                "steps": result.steps,
            }
        )
        r.details[method] = {
            "options": options,
            "dev_final": result.final,
            "test": test,
            "student_dims": result.student_dims,
            "history": result.history,
        }
        _log(
            f"{method}: test accuracy {test['accuracy']:.4f} ({r.rows[-1]['pct_of_teacher']:.1f}% of the teacher) in {_fmt_time(result.wall_time_s)}"
        )
        write_report(r, False)

    # 4. report (after every method) --------------------------------------------------------
    text, summary, plotted = write_report(r, True)
    print(text)
    print(
        f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}"
        + (f", {out / 'accuracy.png'}" if plotted else "")
    )
    return summary


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastkd demo``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the quick budget: random, ood and zskd, 120 steps each (~3 minutes on 2 cores)",
    )
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default=None,
        help="cpu (~13 minutes on 2 idle cores), quick, gpu (default: gpu with a GPU, else cpu)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        metavar="METHOD",
        help=f"methods to run, from {', '.join(METHODS)} (default: the budget's)",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the budget's)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per optimizer step (default: the budget's)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="dev evaluation every N steps, the points of the plot (default: the budget's)",
    )
    parser.add_argument(
        "--output",
        "-o",
        default="fastkd-demo",
        help="folder for results.md/.csv/.json, accuracy.png and the runs (default: ./fastkd-demo)",
    )
    parser.add_argument(
        "--cache", default=None, help="asset and teacher cache (default: $FASTKD_CACHE, else ~/.cache/fastkd)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ... (default: auto)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the teacher fine-tuning and the distillation (default: 0)"
    )
    parser.add_argument(
        "--teacher", default=None, help="use this fine-tuned movie-review classifier instead of fine-tuning MiniLM"
    )
    parser.add_argument(
        "--ood",
        default=None,
        help="out-of-domain text instead of WordNet: a file of one sentence per line, a folder or a named source",
    )
    parser.add_argument(
        "--student-layers", type=int, default=STUDENT["layers"], help=f"student layers (default: {STUDENT['layers']})"
    )
    parser.add_argument(
        "--student-hidden",
        type=int,
        default=STUDENT["hidden"],
        help=f"student hidden size (default: {STUDENT['hidden']})",
    )
    parser.add_argument(
        "--student-heads",
        type=int,
        default=STUDENT["heads"],
        help=f"student attention heads (default: {STUDENT['heads']})",
    )
    parser.add_argument(
        "--student-intermediate",
        type=int,
        default=STUDENT["intermediate"],
        help=f"student feed-forward size (default: {STUDENT['intermediate']})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The budget named by ``--quick`` / ``--budget`` (or chosen by the device), with overrides applied."""
    name = "quick" if args.quick else args.budget
    if name is None:
        name = "gpu" if _device(args.device).type == "cuda" else "cpu"
    budget = BUDGETS[name]
    changes: dict[str, Any] = {}
    if args.methods:
        changes["methods"] = tuple(args.methods)
    for key in ("steps", "batch_size", "eval_every"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise DemoError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            changes[key] = value
    return replace(budget, **changes)


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run ``fastkd demo``; returns the exit status (2 when an asset cannot be obtained or the options are bad)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(
            prog="fastkd demo",
            description=__doc__.split("\n\n")[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(parser)
        args = parser.parse_args(args)
    try:
        budget = budget_from_args(args)
        student = {
            "layers": args.student_layers,
            "hidden": args.student_hidden,
            "heads": args.student_heads,
            "intermediate": args.student_intermediate,
        }
        run_demo(
            budget,
            output=args.output,
            cache=args.cache,
            device=args.device,
            seed=args.seed,
            teacher=args.teacher,
            ood=args.ood,
            student=student,
            progress=not args.no_progress,
        )
    except FastKDError as exc:
        print(f"fastkd demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
