"""Quality benchmark: how close each data-free method gets to the teacher, and why it falls short.

    python benchmarks/quality.py                       # GPU-sized budget (3,000 steps x 64 rows)
    python benchmarks/quality.py --budget cpu          # the demo's CPU budget
    python benchmarks/quality.py --from-demo DIR       # analyse a finished `fastkd demo -o DIR` run

It runs the comparison of ``fastkd demo`` (MiniLM teacher fine-tuned on the movie-review
sentences; ``random``, ``ood``, ``zskd``, ``asdfd``, ``t3`` into a 2-layer, hidden-128 student;
see :mod:`fastkd.demo`) and writes, under ``benchmarks/results/quality/`` (``--results``):

* ``quality.md`` — device, versions, seed, budget; per method the test accuracy and % of the
  teacher; the goals of issue 7 (best data-free method >= 92% of the teacher, every data-free
  method >= 75%, ``random`` < ``ood`` < each seed method) marked met / not met; and, per method,
  the evidence needed to explain a shortfall:

  - *teacher confidence on the method's inputs*: the teacher's mean max-probability on batches
    the method produces (drawn after training, from the method's final state where the run left a
    checkpoint), and the share of those inputs it labels with confidence > 0.9;
  - *class balance of the pseudo labels*: the share of those inputs the teacher puts in each
    class (a method that feeds one class teaches a one-class student);
  - *divergence*: KL(teacher || student) and agreement on those training inputs versus on the
    real dev sentences at the end (a student that matches the teacher on its training inputs but
    not on dev learnt the wrong distribution), and the curves of dev KL and dev accuracy against
    steps (``divergence.png``);

* ``quality.json`` — all of it, machine-readable; ``accuracy.png`` — dev accuracy per step.

Settings are never chosen on the test split: the budgets and method options are fixed in
:mod:`fastkd.demo`, curves and diagnostics use the dev split, and the test split is read once per
student for the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from fastkd import demo as D  # noqa: E402

SEED_METHODS = ("zskd", "asdfd", "t3")
DATA_FREE = ("random", "ood", *SEED_METHODS)
GOAL_BEST, GOAL_EACH = 92.0, 75.0


# ------------------------------------------------------------------------------------------------
# Evidence: what the teacher says about the inputs each method trains on
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _view_stats(ctx: Any, student: Any, views: list[Any]) -> dict[str, Any]:
    import torch.nn.functional as F

    t_logits, s_logits = [], []
    for v in views:
        t_logits.append(ctx.forward(ctx.teacher, v, "teacher").logits.float())
        s_logits.append(ctx.forward(student, v, "student").logits.float())
    t = torch.cat(t_logits)
    s = torch.cat(s_logits)
    p = t.softmax(-1)
    conf = p.max(-1).values
    labels = p.argmax(-1)
    balance = torch.bincount(labels, minlength=t.shape[-1]).float() / len(labels)
    return {
        "rows": len(labels),
        "teacher_confidence_mean": float(conf.mean()),
        "teacher_confident_share": float((conf > 0.9).float().mean()),
        "pseudo_label_balance": [round(float(b), 4) for b in balance],
        "student_agreement": float((s.argmax(-1) == labels).float().mean()),
        "kl_teacher_student": float(
            F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
        ),
    }


def probe_method(
    run_dir: Path,
    method: str,
    teacher_dir: str,
    options: dict[str, Any],
    *,
    ood: str | None,
    batches: int,
    batch_size: int,
    max_length: int,
    device: torch.device,
    seed: int = 1234,
) -> dict[str, Any]:
    """Draw ``batches`` training batches from ``method`` (final state when a checkpoint exists) and score them."""
    from fastkd import checkpoint as ckpt_io
    from fastkd import data as fdata
    from fastkd.methods import get_method
    from fastkd.methods.base import MethodContext, StepInfo
    from fastkd.models import load_classifier
    from fastkd.student import EmbeddingBridge

    teacher, tok = load_classifier(teacher_dir, device)
    teacher.eval().requires_grad_(False)
    student, _ = load_classifier(str(run_dir / "student"), device)
    student.eval()
    cls = get_method(method)
    ctx = MethodContext(
        teacher=teacher, student=student, tokenizer=tok, device=device, num_labels=int(teacher.config.num_labels),
        pair_task=False, max_length=max_length, temperature=2.0, divergence="kl", seed=seed, micro_batch_size=batch_size,
        ood_texts=fdata.load_text(ood) if cls.needs_ood and ood else None, bridge=EmbeddingBridge(teacher, student),
        progress=False,
    )  # fmt: skip
    m = cls(ctx, cls.parse_options(options))
    m.setup()
    state = "initial"
    ckpt = ckpt_io.find_latest(str(run_dir))
    if ckpt is not None:
        m.load_state_dict(ckpt_io.load(ckpt, student)["trainer"]["method"])
        state = "final"
    g = torch.Generator().manual_seed(seed)
    if state == "initial":  # fills generated pools, runs the first generator updates
        m.before_step(0, g)
    views = []
    for b in range(batches):
        info = StepInfo(
            step=b,
            micro=0,
            rank=0,
            world=1,
            batch_size=batch_size,
            offset=b * batch_size,
            generator=torch.Generator().manual_seed(seed + b),
        )
        with torch.enable_grad():  # adversarial methods differentiate through the teacher here
            views.extend(m.batch(info))
    stats = _view_stats(ctx, student, views)
    stats["method_state"] = state
    stats["views"] = sorted({v.name for v in views})
    return stats


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import transformers

    import fastkd

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastkd": fastkd.__version__,
    }
    try:
        import subprocess

        out["git"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    return out


def goals(rows: dict[str, dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """(goal, met?, numbers) for the three goals of issue 7; ``None`` when a needed method did not run."""
    pct = {m: r["pct_of_teacher"] for m, r in rows.items() if m in DATA_FREE and r.get("pct_of_teacher") is not None}
    acc = {m: r["accuracy"] for m, r in rows.items() if m in DATA_FREE and r.get("accuracy") is not None}
    out: list[tuple[str, bool | None, str]] = []
    seeds = {m: pct[m] for m in SEED_METHODS if m in pct}
    if seeds:
        best = max(seeds, key=seeds.get)
        out.append(
            (
                f"best data-free method >= {GOAL_BEST:.0f}% of the teacher",
                seeds[best] >= GOAL_BEST,
                f"{best}: {seeds[best]:.1f}%",
            )
        )
    else:
        out.append((f"best data-free method >= {GOAL_BEST:.0f}% of the teacher", None, "no seed method ran"))
    short = {m: p for m, p in pct.items() if m in SEED_METHODS and p < GOAL_EACH}
    out.append(
        (
            f"every data-free seed method (zskd, asdfd, t3) >= {GOAL_EACH:.0f}% of the teacher",
            (not short) if seeds else None,
            ", ".join(f"{m}: {p:.1f}%" for m, p in pct.items() if m in SEED_METHODS),
        )
    )
    if "random" in acc and "ood" in acc and seeds:
        ok = acc["random"] < acc["ood"] and all(acc["ood"] < acc[m] for m in seeds)
        out.append(
            (
                "random < ood < each seed method",
                ok,
                ", ".join(f"{m} {100 * a:.1f}%" for m, a in sorted(acc.items(), key=lambda kv: kv[1])),
            )
        )
    else:
        out.append(("random < ood < each seed method", None, "random, ood or the seed methods did not run"))
    return out


def plot_divergence(path: Path, histories: dict[str, list[dict[str, Any]]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for method, hist in histories.items():
        pts = [(h["step"], h.get("kl_to_teacher"), h.get("agreement")) for h in hist]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=method)
            axes[1].plot([p[0] for p in pts], [100 * (p[2] or 0) for p in pts], marker="o", markersize=3, label=method)
    axes[0].set_ylabel("KL(teacher || student) on dev")
    axes[1].set_ylabel("agreement with the teacher on dev (%)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(results: Path, summary: dict[str, Any], evidence: dict[str, Any], note: str) -> str:
    rows = {r["method"]: r for r in summary["rows"]}
    g = goals(rows)
    b = summary["budget"]
    lines = [
        "# fastkd quality benchmark",
        "",
        f"- device: {summary['device']} ({summary['machine']})",
        f"- versions: {', '.join(f'{k} {v}' for k, v in summary['versions'].items())}",
        f"- seed: {summary['seed']}; budget `{b['name']}`: {b['steps']} steps x {b['batch_size']} rows per method, lr {b['lr']}, max length {b['max_length']}",
        f"- teacher: MiniLM-L6-H384 fine-tuned on the movie-review train split ({summary['teacher'].get('epochs', '?')} epochs), test accuracy {100 * summary['teacher']['test']['accuracy']:.1f}%",
        f"- student: {summary['student']}",
        f"- command: `{summary.get('command', '')}`",
    ]
    if note:
        lines += ["", note]
    lines += ["", "## Results (test split)", "", D.render_table(summary["rows"]).rstrip(), "", "## Goals (issue 7)", ""]
    for goal, met, numbers in g:
        word = "not run" if met is None else ("met" if met else "**not met**")
        lines.append(f"- {goal}: {word} ({numbers})")
    lines += ["", "## Evidence per method", ""]
    lines.append(
        "Teacher on a sample of the method's training inputs after training; dev = the real dev sentences at the end."
    )
    lines.append("")
    lines.append(
        "| method | inputs probed | teacher confidence | share > 0.9 | pseudo-label balance (neg/pos) | student agreement on them | KL on them | dev agreement | dev KL |"
    )
    lines.append("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for m, e in evidence.items():
        final = summary["methods"].get(m, {}).get("dev_final", {})
        if "error" in e:
            lines.append(
                f"| {m} | probe failed: {e['error']} | | | | | | {final.get('agreement', float('nan')):.3f} | {final.get('kl_to_teacher', float('nan')):.3f} |"
            )
            continue
        bal = "/".join(f"{100 * x:.0f}%" for x in e["pseudo_label_balance"])
        lines.append(
            f"| {m} | {e['rows']} ({e['method_state']}) | {e['teacher_confidence_mean']:.3f} | {100 * e['teacher_confident_share']:.0f}% | {bal}"
            f" | {100 * e['student_agreement']:.1f}% | {e['kl_teacher_student']:.3f} | {100 * final.get('agreement', float('nan')):.1f}% | {final.get('kl_to_teacher', float('nan')):.3f} |"
        )
    lines += [
        "",
        "Curves: `accuracy.png` (dev accuracy), `divergence.png` (dev KL to the teacher and agreement) against steps.",
        "",
    ]
    text = "\n".join(lines) + "\n"
    (results / "quality.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=sorted(D.BUDGETS), default="gpu", help="budget of fastkd.demo (default: gpu)")
    p.add_argument("--methods", nargs="+", choices=D.METHODS, default=None, help="methods (default: the budget's)")
    p.add_argument("--steps", type=int, default=None, help="steps per method (default: the budget's)")
    p.add_argument(
        "--from-demo", default=None, help="analyse this finished `fastkd demo -o DIR` run instead of running one"
    )
    p.add_argument("--work", default="fastkd-quality", help="folder for the runs (default: ./fastkd-quality)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "quality"), help="where the report goes")
    p.add_argument("--cache", default=None, help="asset cache (default: $FASTKD_CACHE or ~/.cache/fastkd)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--probe-batches", type=int, default=8, help="training batches drawn per method for the evidence (default: 8)"
    )
    p.add_argument(
        "--note", default="", help="a line added to the report (e.g. why the budget differs from the goal's)"
    )
    args = p.parse_args(argv)

    if args.from_demo:
        work = Path(args.from_demo)
        summary = json.loads((work / "results.json").read_text())
    else:
        ns = argparse.Namespace(
            quick=False,
            budget=args.budget,
            methods=args.methods,
            steps=args.steps,
            batch_size=None,
            eval_every=None,
            device=args.device,
        )
        budget = D.budget_from_args(ns)
        work = Path(args.work)
        summary = D.run_demo(budget, output=work, cache=args.cache, device=args.device, seed=args.seed)
        summary = json.loads((work / "results.json").read_text())
    summary["versions"] = _versions()
    device = torch.device(summary["device"])
    b = summary["budget"]
    evidence: dict[str, Any] = {}
    for method, det in summary["methods"].items():
        if "error" in det:
            evidence[method] = {"error": det["error"][:120]}
            continue
        try:
            evidence[method] = probe_method(
                work / "runs" / method, method, summary["teacher"]["path"], det.get("options", {}),
                ood=det.get("ood") or _ood_of(summary, args.cache), batches=args.probe_batches,
                batch_size=min(32, b["batch_size"]), max_length=b["max_length"], device=device,
            )  # fmt: skip
        except Exception as exc:  # evidence is best effort; the report says what failed
            evidence[method] = {"error": f"{exc.__class__.__name__}: {str(exc)[:120]}"}
        print(f"[quality] {method}: {evidence[method]}", file=sys.stderr)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plot_divergence(
        results / "divergence.png", {m: d.get("history", []) for m, d in summary["methods"].items() if "history" in d}
    )
    if (work / "accuracy.png").is_file():
        shutil.copyfile(work / "accuracy.png", results / "accuracy.png")
    text = write_report(results, summary, evidence, args.note)
    (results / "quality.json").write_text(
        json.dumps(
            {"summary": summary, "evidence": evidence, "goals": goals({r["method"]: r for r in summary["rows"]})},
            indent=1,
            default=str,
        )
    )
    print(text)
    return 0


def _ood_of(summary: dict[str, Any], cache: str | None) -> str | None:
    from fastkd.assets import cache_dir

    path = cache_dir(cache) / "data" / "wordnet.txt"
    return summary.get("ood") or (str(path) if os.path.isfile(path) else None)


if __name__ == "__main__":
    sys.exit(main())
