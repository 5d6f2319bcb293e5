"""``offline``: distil from teacher logits stored by ``fastkd logits``; the teacher never runs.

``fastkd distill --method offline --teacher-logits DIR --teacher PATH ...`` reads the rows of
``DIR`` (their tokens, as the teacher saw them, and the teacher's top-K logits and logsumexp) in a
seeded shuffled order that is a function of the stream position, like the other methods, so a
resumed run reads what the uninterrupted run read. The loop computes the KD term with
:func:`fastkd.topk_distill_loss` on the stored ids / logits / logsumexp (with K = V this equals
the live-teacher KL) and never calls the teacher's forward; ``--teacher`` only gives the student's
architecture, its initialisation and the tokenizer.

The folder is checked before any work (:func:`open_teacher_logits`): it must be a classifier's
logits (a causal LM's belong to ``DistillationTrainer``), made with the student's tokenizer, at the
run's temperature, with one logit per class, and no stored row longer than ``max_length``.
Stored labels are not attached to the views (no ``ce_weight`` term): ``fastkd logits`` read them
without the teacher's ``label2id``, and the method is KD only, like the data-free ones.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fastkd.errors import ConfigError
from fastkd.methods.base import Method, StepInfo, View


def open_teacher_logits(path: str, tokenizer: Any, *, temperature: float, num_labels: int, max_length: int):
    """The :class:`fastkd.logits.TeacherLogits` at ``path`` after checking it fits the run; a
    one-line :class:`ConfigError` naming ``--teacher-logits`` otherwise."""
    from fastkd.logits import TeacherLogits, TeacherLogitsError

    if not os.path.isdir(path):
        raise ConfigError(f"--teacher-logits {path!r} is not a folder (write one with `fastkd logits`)")
    try:
        store = TeacherLogits(path)
        if store.kind != "classifier":
            raise ConfigError(
                f"--teacher-logits {path!r} holds {store.kind} logits; `fastkd distill` trains classifiers "
                "(train a causal LM from them with fastkd.integrations.transformers.DistillationTrainer)"
            )
        store.check_tokenizer(tokenizer)
        store.check_temperature(temperature)
    except TeacherLogitsError as e:
        raise ConfigError(f"--teacher-logits: {e}") from None
    if store.vocab_size != num_labels:
        raise ConfigError(
            f"--teacher-logits {path!r} stores {store.vocab_size} logits per row but the teacher has "
            f"{num_labels} classes: were they made by another teacher?"
        )
    longest = max(_row_lengths(store))
    if longest > max_length:
        raise ConfigError(
            f"--teacher-logits {path!r} holds rows of up to {longest} tokens but max_length is {max_length}: "
            f"pass --max-length {longest} or more (the teacher's logits belong to the whole row)"
        )
    return store


def _row_lengths(store: Any) -> list[int]:
    """Token counts of every stored row, read from the shards' offsets only."""
    from safetensors import safe_open

    out: list[int] = []
    for shard in store.index["shards"]:
        with safe_open(os.path.join(store.path, shard["file"]), framework="pt") as f:
            offsets = f.get_tensor("token_offsets")
        out.extend((offsets[1:] - offsets[:-1]).tolist())
    return out


class Offline(Method):
    name = "offline"
    summary = "KD from stored teacher logits (--teacher-logits DIR from `fastkd logits`); the teacher never runs"
    needs_teacher_logits = True

    def setup(self) -> None:
        from fastkd.data import ShuffledStream

        store = self.ctx.teacher_logits
        if store is None:
            raise ValueError("needs --teacher-logits DIR (written by `fastkd logits`)")
        self.store = store
        self.stream = ShuffledStream(len(store), self.ctx.seed)
        tok = self.ctx.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.sep = tok.sep_token_id
        self.left = getattr(tok, "padding_side", "right") == "left"
        self.uses_types = "token_type_ids" in getattr(tok, "model_input_names", ())

    def _token_types(self, ids: list[int]) -> list[int]:
        """Segment ids as a BERT-style tokenizer gives them: 0 through the first [SEP], 1 after it
        (all 0 for a single text, which ends at its only [SEP])."""
        if self.sep is None or self.sep not in ids:
            return [0] * len(ids)
        cut = ids.index(self.sep) + 1
        return [0] * cut + [1] * (len(ids) - cut)

    def batch(self, info: StepInfo) -> list[View]:
        rows = [self.store.row(i) for i in self.stream.indices(info.offset, info.batch_size)]
        b, width = len(rows), max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((b, width), self.pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        types = torch.zeros((b, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids = r["input_ids"].tolist()
            at = slice(width - len(ids), width) if self.left else slice(0, len(ids))  # the tokenizer's side
            input_ids[i, at] = torch.tensor(ids)
            mask[i, at] = 1
            types[i, at] = torch.tensor(self._token_types(ids))
        dev = self.ctx.device
        teacher = {  # one stored position per classifier row: [B, K], [B, K], [B]
            "teacher_ids": torch.cat([r["ids"] for r in rows]).to(dev),
            "teacher_logits": torch.cat([r["logits"] for r in rows]).to(dev),
            "teacher_lse": torch.cat([r["lse"] for r in rows]).to(dev),
        }
        return [
            View(
                attention_mask=mask.to(dev), input_ids=input_ids.to(dev),
                token_type_ids=types.to(dev) if self.uses_types else None, name="offline",
                extras=teacher,
            )
        ]  # fmt: skip
