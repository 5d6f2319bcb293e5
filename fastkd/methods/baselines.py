"""The baselines the data-free methods are measured against.

* ``random`` — random token sequences (uniform over the vocabulary without special tokens, random
  lengths), labelled only by the teacher's soft outputs: the floor every method must beat.
* ``ood`` — plain KD on out-of-domain sentences (and pairs built from them for pair tasks), with
  no adversarial part: Zero-shot KD's first ingredient alone. ``-O balance=N`` (ours, off by
  default) labels the first N rows of its stream with the teacher once and draws them
  class-balanced (:class:`fastkd.methods.base.BalancedSampler`); the labels are kept per teacher
  in the fastkd cache (``balance_cache``; :class:`fastkd.methods.base.LabelCache`), so a second
  run labels nothing. ``balance=32768`` is the quality benchmark's ``ood-balanced`` row: on WordNet
  glosses (whose tweet teacher calls ~1% of them positive) 8 points above plain ``ood`` on tweet
  test; on Jane Austen's sentences, the benchmark's corpus since, level with it (-0.1).
* ``supervised`` — KD on the real task training data: the upper bound, for comparison only. It is
  the only method that reads the training split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd.methods.base import BalanceOptions, Method, StepInfo, View, ood_sampler, opt


class RandomTokens(Method):
    name = "random"
    summary = "random token sequences (baseline floor)"

    @dataclass
    class Options:
        min_tokens: int = opt(4, "shortest random sequence (tokens, before special tokens)")

        def check(self) -> None:
            if self.min_tokens < 1:
                raise ValueError("min_tokens must be >= 1")

    def setup(self) -> None:
        tok = self.ctx.tokenizer
        vocab = len(tok)
        special = set(self.ctx.special_ids())
        self.candidates = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
        self.cls = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        self.sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def batch(self, info: StepInfo) -> list[View]:
        g = info.generator
        b, max_len = info.batch_size, self.ctx.max_length
        n_special = (self.cls is not None) + (self.sep is not None) * (2 if self.ctx.pair_task else 1)
        room = max(1, max_len - n_special)
        lo = min(self.opt.min_tokens, room)
        lengths = torch.randint(lo, room + 1, (b,), generator=g).tolist()
        rows, types = [], []
        for n in lengths:
            ids = self.candidates[torch.randint(len(self.candidates), (n,), generator=g)].tolist()
            if self.ctx.pair_task and n >= 2:
                cut = int(torch.randint(1, n, (), generator=g))
                a, b_ = ids[:cut], ids[cut:]
                row = ([self.cls] if self.cls is not None else []) + a + [self.sep] + b_ + [self.sep]
                tt = [0] * (len(a) + 2) + [1] * (len(b_) + 1)
            else:
                row = ([self.cls] if self.cls is not None else []) + ids + ([self.sep] if self.sep is not None else [])
                tt = [0] * len(row)
            rows.append(row)
            types.append(tt[: len(row)] + [0] * (len(row) - len(tt)))
        width = max(len(r) for r in rows)
        dev = self.ctx.device
        input_ids = torch.full((b, width), self.pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        token_types = torch.zeros((b, width), dtype=torch.long)
        for i, (r, tt) in enumerate(zip(rows, types)):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            token_types[i, : len(r)] = torch.tensor(tt)
        uses_types = "token_type_ids" in getattr(self.ctx.tokenizer, "model_input_names", ())
        return [
            View(
                attention_mask=mask.to(dev), input_ids=input_ids.to(dev),
                token_type_ids=token_types.to(dev) if uses_types else None, name="random",
            )
        ]  # fmt: skip


class OutOfDomain(Method):
    name = "ood"
    summary = "KD on out-of-domain text, no adversarial part (baseline)"
    needs_ood = True

    @dataclass
    class Options(BalanceOptions):
        length_buckets: bool = opt(
            True, "batch stream rows of similar length (less padding); false: stream order (a control of balance)"
        )

        def check(self) -> None:
            self.check_balance("ood")

    def setup(self) -> None:
        self.sampler = ood_sampler(self.ctx, self.opt.balance, self.opt.balance_cache, self.opt.length_buckets)

    def batch(self, info: StepInfo) -> list[View]:
        texts, pairs = self.sampler.rows(info.offset, info.batch_size)
        view = self.ctx.encode_texts(texts, pairs)
        view.name = "ood"
        return [view]


class Supervised(Method):
    name = "supervised"
    summary = "KD on the real task training data (upper bound, not data-free)"
    data_free = False

    def setup(self) -> None:
        rows = self.ctx.train_rows
        assert rows is not None
        self.rows = rows
        from fastkd.data import ShuffledStream

        self.stream = ShuffledStream(len(rows), self.ctx.seed)

    def batch(self, info: StepInfo) -> list[View]:
        rows = [self.rows[i] for i in self.stream.indices(info.offset, info.batch_size)]
        pairs = [r.get("text_pair") for r in rows] if self.ctx.pair_task else None
        view = self.ctx.encode_texts([r["text"] for r in rows], pairs)
        view.labels = torch.tensor([r["label"] for r in rows], device=self.ctx.device)
        view.name = "train"
        return [view]
