"""Offline teacher logits: run a teacher once, store its top-K logits, train students later.

``fastkd logits --teacher PATH --data FILE --top-k K --out DIR`` (:func:`main`) runs a teacher over
a text or labeled file and writes to ``DIR``:

* ``shard-00000.safetensors``, ... each holding, for the positions of its rows concatenated:
  ``input_ids`` [P] int32 (the tokens the teacher saw), ``ids`` [P, K] int32 (the teacher's top-K
  token ids), ``logits`` [P, K] float32 (its raw logits there), ``lse`` [P] float32 (the logsumexp
  over the full vocabulary of logits / temperature), ``row_offsets`` [R + 1] int64 (row r holds
  positions ``row_offsets[r]:row_offsets[r + 1]``) and, for labeled data, ``labels`` [R] int64.
  A causal LM contributes every position of a row; a classifier one position per row (its logits
  for the row) while ``input_ids`` keeps the row's tokens.
* ``index.json``: the format version, the kind (``causal_lm`` / ``classifier``), K, the
  temperature, the vocabulary size, the tokenizer's fingerprint, the shards and their row counts.

:class:`TeacherLogits` reads a folder back (:meth:`TeacherLogits.row` yields ids / logits / lse per
row) and refuses a student tokenizer whose fingerprint differs from the teacher's
(:meth:`TeacherLogits.check_tokenizer`). ``fastkd.topk_distill_loss`` (or the ``teacher_topk=``
option of ``fastkd.fused_linear_distill_loss``) takes the three tensors as they are; with K equal
to the vocabulary size and the stored logsumexp it is exactly the live-teacher KL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fastkd.errors import FastKDError

FORMAT = "fastkd-teacher-logits"
VERSION = 1
INDEX = "index.json"


class TeacherLogitsError(FastKDError, ValueError):
    """An offline-logits folder is missing, malformed, or does not match the student."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary (token -> id, added tokens included) and the
    special tokens. Two tokenizers with the same fingerprint give the same ids for the same text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())}
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_kind(model) -> str:
    """``causal_lm`` for a ``*ForCausalLM`` / LM-head model, else ``classifier``."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    return "classifier"


def _topk(logits: torch.Tensor, k: int, temperature: float):
    logits = logits.float()
    lse = torch.logsumexp(logits / temperature, dim=-1)
    if k >= logits.shape[-1]:
        vals, ids = logits.sort(dim=-1, descending=True)
    else:
        vals, ids = logits.topk(k, dim=-1)
    return ids.to(torch.int32), vals, lse


@torch.no_grad()
def write_teacher_logits(
    teacher,
    tokenizer,
    rows: Sequence[dict[str, Any]] | Sequence[str],
    out_dir: str,
    *,
    top_k: int,
    temperature: float = 1.0,
    max_length: int = 128,
    batch_size: int = 16,
    rows_per_shard: int = 4096,
    device: str | torch.device = "cpu",
    source: dict[str, Any] | None = None,
) -> str:
    """Run ``teacher`` over ``rows`` (texts, or dicts with ``text``, optional ``text_pair``, ``label``)
    and write the shards and ``index.json`` to ``out_dir``; returns the index path."""
    from safetensors.torch import save_file

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise TeacherLogitsError(f"top_k must be a positive int, got {top_k!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise TeacherLogitsError(f"temperature must be positive, got {temperature!r}")
    rows = [{"text": r} if isinstance(r, str) else r for r in rows]
    if not rows:
        raise TeacherLogitsError("no rows to run the teacher on")
    kind = model_kind(teacher)
    teacher = teacher.to(device).eval()
    os.makedirs(out_dir, exist_ok=True)
    labeled = all("label" in r and r["label"] is not None for r in rows)
    shards: list[dict[str, Any]] = []
    vocab = None
    k_eff = None
    buf: dict[str, list] = {"input_ids": [], "ids": [], "logits": [], "lse": [], "lengths": [], "labels": []}

    def flush() -> None:
        if not buf["lengths"]:
            return
        offsets = torch.zeros(len(buf["lengths"]) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(buf["lengths"], dtype=torch.int64).cumsum(0)
        tensors = {
            "input_ids": torch.cat(buf["input_ids"]).to(torch.int32),
            "ids": torch.cat(buf["ids"]).contiguous(),
            "logits": torch.cat(buf["logits"]).contiguous(),
            "lse": torch.cat(buf["lse"]).contiguous(),
            "row_offsets": offsets,
            "token_offsets": torch.tensor([0] + [len(x) for x in buf["input_ids"]], dtype=torch.int64).cumsum(0),
        }
        if labeled:
            tensors["labels"] = torch.tensor(buf["labels"], dtype=torch.int64)
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, name))
        shards.append({"file": name, "rows": len(buf["lengths"]), "positions": int(offsets[-1])})
        for v in buf.values():
            v.clear()

    for b0 in range(0, len(rows), batch_size):
        batch = rows[b0 : b0 + batch_size]
        texts = [r["text"] for r in batch]
        pairs = [r.get("text_pair") for r in batch]
        enc = tokenizer(
            texts, pairs if any(p is not None for p in pairs) else None, truncation=True, max_length=max_length,
            padding=True, return_tensors="pt",
        )  # fmt: skip
        enc = {k: v.to(device) for k, v in enc.items()}
        logits = teacher(**enc).logits
        vocab = logits.shape[-1]
        k_eff = min(top_k, vocab)
        ids, vals, lse = _topk(logits, k_eff, float(temperature))
        am = enc["attention_mask"].bool()
        for i in range(len(batch)):
            toks = enc["input_ids"][i][am[i]].cpu()
            buf["input_ids"].append(toks)
            if kind == "causal_lm":
                buf["ids"].append(ids[i][am[i]].cpu())
                buf["logits"].append(vals[i][am[i]].cpu())
                buf["lse"].append(lse[i][am[i]].cpu())
                buf["lengths"].append(int(am[i].sum()))
            else:
                buf["ids"].append(ids[i : i + 1].cpu())
                buf["logits"].append(vals[i : i + 1].cpu())
                buf["lse"].append(lse[i : i + 1].cpu())
                buf["lengths"].append(1)
            if labeled:
                buf["labels"].append(int(batch[i]["label"]))
        if len(buf["lengths"]) >= rows_per_shard:
            flush()
    flush()
    index = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "top_k": k_eff,
        "temperature": float(temperature),
        "vocab_size": vocab,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "padding_side": getattr(tokenizer, "padding_side", "right"),
        "pad_token_id": tokenizer.pad_token_id,
        "max_length": max_length,
        "rows": len(rows),
        "labeled": labeled,
        "shards": shards,
        "source": source or {},
    }
    path = os.path.join(out_dir, INDEX)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    return path


class TeacherLogits:
    """A folder written by :func:`write_teacher_logits` / ``fastkd logits``, read lazily shard by shard.

    >>> tl = TeacherLogits("runs/logits")          # doctest: +SKIP
    >>> tl.check_tokenizer(student_tokenizer)      # raises TeacherLogitsError on a mismatch  # doctest: +SKIP
    >>> r = tl.row(0)  # {"input_ids", "ids", "logits", "lse"(, "label")}  # doctest: +SKIP
    """

    def __init__(self, path: str) -> None:
        index_path = os.path.join(path, INDEX)
        if not os.path.isfile(index_path):
            raise TeacherLogitsError(f"teacher_logits_dir {path!r} has no {INDEX} (write it with `fastkd logits`)")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise TeacherLogitsError(
                f"{index_path} is not a {FORMAT} v{VERSION} index (format {self.index.get('format')!r}, "
                f"version {self.index.get('version')!r})"
            )
        self.path = path
        self.kind: str = self.index["kind"]
        self.top_k: int = self.index["top_k"]
        self.temperature: float = self.index["temperature"]
        self.vocab_size: int = self.index["vocab_size"]
        self._starts = [0]
        for s in self.index["shards"]:
            self._starts.append(self._starts[-1] + s["rows"])
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer that would give other token ids than the teacher's."""
        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.index["tokenizer_fingerprint"]:
            raise TeacherLogitsError(
                f"the student's tokenizer (fingerprint {fp[:12]}...) differs from the one the teacher logits in "
                f"{self.path!r} were made with ({self.index['tokenizer_fingerprint'][:12]}...): token ids would not match"
            )

    def check_temperature(self, temperature: float) -> None:
        if abs(float(temperature) - self.temperature) > 1e-12 * max(1.0, abs(self.temperature)):
            raise TeacherLogitsError(
                f"the teacher logits in {self.path!r} store the logsumexp at temperature {self.temperature}, "
                f"training asks for {temperature}; rerun `fastkd logits --temperature {temperature}`"
            )

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != s:
            from safetensors.torch import load_file

            self._cache = (s, load_file(os.path.join(self.path, self.index["shards"][s]["file"])))
        return self._cache[1]

    def row(self, i: int) -> dict[str, torch.Tensor | int]:
        """Row ``i``: ``input_ids`` [L] int64, ``ids`` [P, K] int32, ``logits`` [P, K] and ``lse`` [P]
        float32 (P = L for a causal LM, 1 for a classifier), ``label`` when the data was labeled."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        s = next(j for j in range(len(self._starts) - 1) if self._starts[j + 1] > i)
        t = self._shard(s)
        r = i - self._starts[s]
        a, b = int(t["row_offsets"][r]), int(t["row_offsets"][r + 1])
        ta, tb = int(t["token_offsets"][r]), int(t["token_offsets"][r + 1])
        out: dict[str, Any] = {
            "input_ids": t["input_ids"][ta:tb].long(),
            "ids": t["ids"][a:b],
            "logits": t["logits"][a:b],
            "lse": t["lse"][a:b],
        }
        if "labels" in t:
            out["label"] = int(t["labels"][r])
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self.row(i)

    def dataset(self) -> list[dict[str, Any]]:
        """Rows for :class:`fastkd.integrations.transformers.DistillationTrainer`: ``input_ids``,
        ``attention_mask``, ``teacher_ids``, ``teacher_logits``, ``teacher_lse`` (and ``labels``)."""
        out = []
        for r in self:
            d = {
                "input_ids": r["input_ids"],
                "attention_mask": torch.ones_like(r["input_ids"]),
                "teacher_ids": r["ids"],
                "teacher_logits": r["logits"],
                "teacher_lse": r["lse"],
            }
            if "label" in r:
                d["labels"] = r["label"]
            out.append(d)
        return out


# --------------------------------------------------------------------------------------------
# fastkd logits
# --------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, metavar="PATH", help="teacher model folder (transformers)")
    p.add_argument("--data", required=True, metavar="FILE", help="text (one row per line) or labeled file")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="logits kept per position")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (shards + index.json)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the stored logsumexp (1.0)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per row (128)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per teacher batch (16)")
    p.add_argument("--rows-per-shard", type=int, default=4096, help="rows per safetensors shard (4096)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu or cuda (cpu)")


def _load_rows(data: str) -> list[dict[str, Any]]:
    from fastkd.data import DataError, load_labeled, load_text

    try:
        return load_labeled(data)
    except DataError:
        return [{"text": t} for t in load_text(data)]


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except TeacherLogitsError as e:
        print(f"fastkd logits: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg = AutoConfig.from_pretrained(args.teacher)
    archs = cfg.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    teacher = auto.from_pretrained(args.teacher)
    tok = AutoTokenizer.from_pretrained(args.teacher)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = _load_rows(args.data)
    path = write_teacher_logits(
        teacher, tok, rows, args.out, top_k=args.top_k, temperature=args.temperature, max_length=args.max_length,
        batch_size=args.batch_size, rows_per_shard=args.rows_per_shard, device=args.device,
        source={"teacher": os.path.abspath(args.teacher), "data": os.path.abspath(args.data)},
    )  # fmt: skip
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    print(json.dumps({k: index[k] for k in ("kind", "rows", "top_k", "vocab_size", "temperature")} | {"index": path}))
    return 0
