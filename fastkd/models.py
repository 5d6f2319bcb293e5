"""Models: choose the device, load a classifier and its tokenizer, predict, evaluate, save.

Every command (``fastkd teacher``, ``distill``, ``eval``, ``demo``) and the benchmarks load and run
models through these functions, so a folder that one command writes the next one reads, with the
same errors::

    model, tokenizer = load_classifier("out/student")        # folder or hub id
    logits = predict_logits(model, tokenizer, rows)          # [N, num_labels], rows in order
    metrics = evaluate(model, tokenizer, rows)               # accuracy, macro_f1, mcc
    save_model(model, tokenizer, "out/student2")             # save_pretrained of both

Errors are :class:`fastkd.errors.ModelError` with one line that names the path and what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastkd.data import encode
from fastkd.errors import ModelError
from fastkd.metrics import classification_metrics

__all__ = [
    "ModelError",
    "evaluate",
    "label_maps",
    "load_classifier",
    "max_positions",
    "predict_logits",
    "resolve_device",
    "save_model",
]


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when available, else the CPU; otherwise the named device, checked."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ModelError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} requested but CUDA is not available")
    return dev


def _looks_like_path(s: str) -> bool:
    # hub ids look like "name" or "org/name"; anything else that does not exist is a missing path
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s or os.path.splitdrive(s)[0] != ""


def load_classifier(path: str, device: torch.device | str = "cpu", *, what: str = "teacher") -> tuple[nn.Module, Any]:
    """Load a fine-tuned sequence classifier and its tokenizer (folder or hub id), with clear errors.

    ``what`` names the model in the messages (``teacher``, ``model``, ...).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = os.fspath(path) if path else ""
    if not path:
        raise ModelError(f"no {what} given (--{what} PATH_OR_HUB_ID)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ModelError(f"{what} {path!r} is a file; give the folder that holds config.json and the weights")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{what} folder {path!r} has no config.json (is it a transformers model folder?)")
    if not os.path.exists(path) and _looks_like_path(path):
        raise ModelError(f"{what} path {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"cannot load {what} {path!r}: {e.__class__.__name__}: {e}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelError(
            f"{what} {path!r} is not a sequence classifier (architectures: {archs or 'none'}); fine-tune one "
            "first, e.g. with `fastkd teacher`"
        )
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"cannot load {what} {path!r}: {e.__class__.__name__}: {e}") from None
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ModelError(f"{what} {path!r} lacks trained weights for {missing[:6]}; is it fine-tuned?")
    return model.to(device), tokenizer


def label_maps(model_or_config: Any) -> dict[str, int] | None:
    """The model's ``label2id`` when it carries real label names, else None (``LABEL_0``... are not names)."""
    config = getattr(model_or_config, "config", model_or_config)
    raw = getattr(config, "label2id", None) or {}
    mapping = {str(k): int(v) for k, v in raw.items()}
    if not mapping or all(k == f"LABEL_{v}" for k, v in mapping.items()):
        return None
    return mapping


def max_positions(model_or_config: Any) -> int | None:
    """The longest input (in tokens) the model's position embeddings allow, when it has a limit."""
    config = getattr(model_or_config, "config", model_or_config)
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> str:
    """``save_pretrained`` of the model and its tokenizer into ``out_dir``; returns the folder."""
    out = os.fspath(out_dir)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _batches(rows: Sequence[dict], size: int) -> Iterator[list[dict]]:
    for i in range(0, len(rows), size):
        yield list(rows[i : i + size])


@torch.no_grad()
def predict_logits(
    model: nn.Module, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 64, max_length: int = 128,
    device: torch.device | str | None = None,
) -> Tensor:  # fmt: skip
    """``[N, num_labels]`` float32 logits (on the CPU) for labeled (or unlabeled) rows, in their order.

    Rows are sorted by length into batches (less padding), run in eval mode under bf16 autocast on
    CUDA, and returned in the order given.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ModelError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]) + len(rows[i].get("text_pair") or ""))
    chunks: list[Tensor] = []
    try:
        for chunk in _batches([rows[i] for i in order], batch_size):
            pairs = [r.get("text_pair") for r in chunk]
            enc = encode(
                tokenizer, [r["text"] for r in chunk], pairs if any(p is not None for p in pairs) else None,
                max_length=max_length, device=device,
            )  # fmt: skip
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                chunks.append(model(**enc).logits.float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    ordered = torch.cat(chunks)
    logits = torch.empty_like(ordered)
    logits[torch.tensor(order)] = ordered
    return logits


def evaluate(
    model: nn.Module, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 64, max_length: int = 128,
    device: torch.device | str | None = None,
) -> dict[str, float]:  # fmt: skip
    """Accuracy, macro-F1 and MCC of a sequence classifier on labeled rows (see :mod:`fastkd.metrics`)."""
    logits = predict_logits(model, tokenizer, rows, batch_size=batch_size, max_length=max_length, device=device)
    return classification_metrics(logits.argmax(-1), [r["label"] for r in rows])
