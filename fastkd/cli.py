"""The ``fastkd`` command line (also ``python -m fastkd``).

    fastkd distill  --teacher DIR --method zskd --ood wordnet --eval dev.csv --out-dir runs/zskd
    fastkd eval     --model runs/zskd/student --data test.csv
    fastkd generate --teacher DIR --ood wordnet --generator LM --num-rows 2000 --out generated.jsonl
    fastkd teacher  ...   (fine-tune a teacher; provided by fastkd.teacher)
    fastkd demo     ...   (the offline end-to-end demo; provided by fastkd.demo)
    fastkd logits   --teacher PATH --data FILE --top-k K --out DIR   (offline teacher logits; fastkd.logits)

Every ``distill`` option can also come from ``--config FILE`` (YAML or JSON, the same names with
``_`` or ``-``); options given on the command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any

# commands whose module has add_arguments() and main()
MODULE_COMMANDS = {"teacher": "fastkd.teacher", "demo": "fastkd.demo", "logits": "fastkd.logits"}
METAVARS = {"teacher": "PATH", "ood": "SOURCE", "train": "SOURCE", "eval": "SOURCE", "out_dir": "DIR", "device": "DEV"}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse_kv(items: Sequence[str] | None, what: str) -> dict[str, str]:
    from fastkd.methods.base import OptionError

    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value
    return out


def _methods_epilog(names: Sequence[str] | None = None) -> str:
    from fastkd.methods import METHODS

    lines = ["methods and their options (-O KEY=VALUE):"]
    for name, cls in METHODS.items():
        if names is not None and name not in names:
            continue
        lines.append(f"  {name:<11} {cls.summary}")
        for opt_name, default, help_text in cls.option_help():
            lines.append(f"      {opt_name} = {default!r}: {help_text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# distill
# --------------------------------------------------------------------------------------------
def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    from fastkd.loop import DIVERGENCES, HIDDEN_LOSSES, SCHEDULES, DistillConfig
    from fastkd.methods import METHODS

    choices = {
        "method": list(METHODS), "schedule": list(SCHEDULES), "divergence": list(DIVERGENCES),
        "hidden_loss": list(HIDDEN_LOSSES), "student_init": ["auto", "teacher", "embeddings", "random"],
    }  # fmt: skip
    p.add_argument("--config", metavar="FILE", help="read options from a YAML or JSON file (default: none)")
    hints = typing.get_type_hints(DistillConfig)
    for f in dataclasses.fields(DistillConfig):
        if f.name == "method_options":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.metadata.get("default", f.default)
        help_text = f.metadata.get("help", "")
        if "(default" not in help_text and "(required" not in help_text:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        base = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["type"] = base
        if f.name in choices:
            kw["choices"] = choices[f.name]
        else:
            kw["metavar"] = METAVARS.get(f.name) or {int: "N", float: "X"}.get(base, "STR")
        p.add_argument(flag, **kw)
    p.add_argument(
        "-O", "--method-option", dest="method_options", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
        help="a method option, repeatable; the options of each method are listed below (default: none)",
    )  # fmt: skip


def distill_config_from_args(args: argparse.Namespace) -> Any:
    """Merge dataclass defaults < --config file < explicit command-line options."""
    from fastkd.loop import DistillConfig, load_config_file

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update({k.replace("-", "_"): v for k, v in load_config_file(args.config).items()})
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func", "method_options")}
    from_file = values.get("method_options") or {}
    if not isinstance(from_file, dict):
        from fastkd.errors import ConfigError

        raise ConfigError(
            f"method_options in {args.config} must be a mapping of option names to values, got {from_file!r}"
        )
    opts = dict(from_file)
    opts.update(_parse_kv(getattr(args, "method_options", None), "-O/--method-option"))
    values.update(given)
    values["method_options"] = opts
    return DistillConfig.from_dict(values, where=args.config or "the command line")


def _run_distill(args: argparse.Namespace) -> int:
    from fastkd.loop import distill

    cfg = distill_config_from_args(args)
    result = distill(cfg)
    summary = {
        "student_dir": result.student_dir, "steps": result.steps, "final": result.final,
        "teacher": result.teacher_metrics, "teacher_params": result.teacher_params,
        "student_params": result.student_params, "wall_time_s": round(result.wall_time_s, 2),
        "interrupted": result.interrupted,
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    return 130 if result.interrupted and cfg.stop_after is None else 0


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="classifier folder or hub id to score (required)")
    p.add_argument("--data", required=True, help="labeled data: CSV/TSV/JSONL file, dataset or named source (required)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per row (default: 128)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")


def _run_eval(args: argparse.Namespace) -> int:
    import time

    from fastkd.data import load_labeled
    from fastkd.errors import ConfigError
    from fastkd.models import evaluate, label_maps, load_classifier, resolve_device
    from fastkd.student import count_parameters

    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive integer (or omitted for all rows), got {args.limit}")
    device = resolve_device(args.device)
    model, tokenizer = load_classifier(args.model, device, what="model")
    rows = load_labeled(args.data, label2id=label_maps(model))
    if args.limit:
        rows = rows[: args.limit]
    n = int(model.config.num_labels)
    bad = sorted({r["label"] for r in rows if not 0 <= r["label"] < n})
    if bad:
        raise ConfigError(f"{args.data!r} has labels {bad[:10]} but the model has {n} classes (0..{n - 1})")
    t0 = time.perf_counter()
    metrics = evaluate(model, tokenizer, rows, batch_size=args.batch_size, max_length=args.max_length, device=device)
    out = {**metrics, "rows": len(rows), "parameters": count_parameters(model), "seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=1))
    return 0


# --------------------------------------------------------------------------------------------
# generate (T3)
# --------------------------------------------------------------------------------------------
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="fine-tuned teacher folder or hub id (required)")
    p.add_argument(
        "--ood", required=True, help="out-of-domain text to rewrite: file, folder, dataset or source (required)"
    )
    p.add_argument(
        "--generator", default=None, help="causal LM: folder, hub id or .gguf file (default: -O generator=...)"
    )
    p.add_argument("--out", required=True, help="output JSONL file (required)")
    p.add_argument("--num-rows", type=int, default=1000, help="rows to generate (default: 1000)")
    p.add_argument("--max-length", type=int, default=64, help="teacher tokens per row when scoring (default: 64)")
    p.add_argument("--pair", action="store_true", help="pair each rewrite with a second OOD sentence (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--cache", default=None, metavar="DIR",
        help="keep the generated rows in DIR, keyed by teacher, text, options and sizes, and reuse them "
        "(default: none)",
    )  # fmt: skip
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars (default: on)"
    )
    p.add_argument(
        "-O", "--option", dest="options", action="append", metavar="KEY=VALUE",
        help="a T3 option, repeatable; listed below (default: none)",
    )  # fmt: skip


def _run_generate(args: argparse.Namespace) -> int:
    from fastkd.data import load_text, write_jsonl
    from fastkd.errors import ConfigError as DistillError
    from fastkd.methods.t3 import T3, generate_dataset
    from fastkd.models import load_classifier, resolve_device

    if args.num_rows < 1:
        raise DistillError(f"--num-rows must be positive, got {args.num_rows}")
    opts = _parse_kv(args.options, "-O/--option")
    if args.generator:
        opts["generator"] = args.generator
    options = T3.parse_options(opts)
    if not options.generator:
        raise DistillError("give the rewriting LM with --generator (folder, hub id or .gguf file)")
    device = resolve_device(args.device)
    teacher, tokenizer = load_classifier(args.teacher, device)
    texts = load_text(args.ood)
    info: dict = {}
    rows = generate_dataset(
        teacher, tokenizer, texts, options, num_rows=args.num_rows, device=device, max_length=args.max_length,
        seed=args.seed, pair_task=args.pair, progress=args.progress, cache=args.cache, info=info,
    )  # fmt: skip
    write_jsonl(args.out, rows)
    counts = [sum(r["label"] == k for r in rows) for k in range(int(teacher.config.num_labels))]
    conf = sum(r["teacher_confidence"] for r in rows) / len(rows)
    summary = {"out": args.out, "rows": len(rows), "teacher_label_counts": counts, "mean_confidence": conf}
    if args.cache is not None:
        summary["cached"] = bool(info.get("cached"))
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------------------------
# the parser and main
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd", formatter_class=_Formatter,
        description="Data-free knowledge distillation of NLP classifiers with fused kernels.",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "distill", help="distil a teacher classifier into a smaller student", formatter_class=_Formatter,
        description="Distil a fine-tuned sequence classifier into a smaller student, data-free or not.",
        epilog=_methods_epilog(),
    )  # fmt: skip
    add_distill_arguments(p)
    p.set_defaults(func=_run_distill)

    p = sub.add_parser(
        "eval", help="score a classifier on labeled data (accuracy, macro-F1, MCC)", formatter_class=_Formatter,
        description="Score a sequence classifier on a labeled file; prints JSON.",
    )  # fmt: skip
    add_eval_arguments(p)
    p.set_defaults(func=_run_eval)

    p = sub.add_parser(
        "generate", help="T3: rewrite OOD text into labelled task-like text (JSONL)", formatter_class=_Formatter,
        description="Tune a causal LM (DFKD-T3) and write generated task-like text with the teacher's labels.",
        epilog=_methods_epilog(["t3"]),
    )  # fmt: skip
    add_generate_arguments(p)
    p.set_defaults(func=_run_generate)

    for name, module_name in MODULE_COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else name, formatter_class=_Formatter, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    return parser


def _quiet_transformers() -> None:
    # transformers' own "Loading weights" bars and load reports would bury fastkd's one-line errors
    # and progress bars; a command line has its own.
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


def _version() -> str:
    from fastkd import __version__

    return f"fastkd {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastkd`` console script; returns the exit status.

    Every fastkd error (:class:`fastkd.errors.FastKDError`) is one line on stderr and exit status 2,
    whatever the command; argparse's own usage errors are status 2 as well.
    """
    from fastkd.assets import register_sources
    from fastkd.errors import FastKDError

    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    try:
        register_sources()
        return int(args.func(args) or 0)
    except FastKDError as e:
        print(f"fastkd {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
