"""The small interface every distillation method implements, and what the loop gives it.

A method turns "what should the student see next?" into :class:`View` objects: inputs that both
the teacher and the student receive. The loop (:mod:`fastkd.loop`) owns the teacher, the student,
the optimizer and the KD loss; a method only

* ``setup()`` — builds its generators (called once, before a checkpoint is loaded);
* ``before_step(step, generator)`` — optional work before a student step (generator updates);
* ``batch(info)`` — the views for one micro-batch of this rank;
* ``student_loss(view, student_out, teacher_out)`` — an optional extra loss term for the student;
* ``row_weights(view, teacher_logits)`` — optional per-row weights of the KD term on a view (zskd's
  ``adv_balance``); stateless across steps, so a resumed run repeats the uninterrupted one;
* ``student_parameters()`` — extra trainable modules updated with the student (e.g. a head);
* ``state_dict()`` / ``load_state_dict()`` — everything needed for an exact resume (tensors and
  JSON-able values; no pickle).

All randomness comes from the ``torch.Generator`` the loop passes in, seeded from (seed, step,
micro-batch, rank), and the global RNG is reseeded the same way at each step, so a resumed run
repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import fastkd
from fastkd.data import ShuffledStream, encode
from fastkd.errors import OptionError


@dataclass
class View:
    """One batch of inputs, fed to the teacher and the student alike.

    Token inputs: ``input_ids`` ``[B, T]`` (each model looks up its own embeddings; the tokenizer
    is shared). Embedding inputs: ``teacher_embeds`` ``[B, T, Ht]`` in the teacher's word-embedding
    space, used where ``embeds_mask`` ``[B, T]`` is True (everywhere when it is None and there are
    no ``input_ids``); the student receives them through :class:`fastkd.student.EmbeddingBridge`.
    Position and segment embeddings are added by the models themselves.
    """

    attention_mask: Tensor
    input_ids: Tensor | None = None
    teacher_embeds: Tensor | None = None
    embeds_mask: Tensor | None = None
    token_type_ids: Tensor | None = None
    labels: Tensor | None = None
    weight: float = 1.0
    name: str = "data"
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])


@dataclass
class StepInfo:
    """Where a micro-batch sits: the optimizer step, micro-batch and rank, its rows and its RNG."""

    step: int
    micro: int
    rank: int
    world: int
    batch_size: int  # rows of this micro-batch on this rank
    offset: int  # position of its first row in the global sample stream
    generator: torch.Generator


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return True


@dataclass
class MethodContext:
    """What the loop lends a method. Teacher: frozen, eval mode. Student: trained by the loop."""

    teacher: nn.Module
    student: nn.Module
    tokenizer: Any
    device: torch.device
    num_labels: int
    pair_task: bool
    max_length: int
    temperature: float
    divergence: str
    seed: int
    micro_batch_size: int = 8
    batch_size: int = 0  # rows per optimizer step over all ranks and micro-batches (0: micro_batch_size)
    rank: int = 0
    world: int = 1
    ood_texts: list[str] | None = None
    train_rows: list[dict] | None = None
    teacher_logits: Any = None  # fastkd.logits.TeacherLogits: the stored rows of the offline method
    bridge: Any = None
    autocast: Callable[[], AbstractContextManager] = nullcontext
    all_reduce: Callable[[Sequence[Tensor]], None] | None = None
    progress: bool = True

    # ---- forward passes -------------------------------------------------------------------
    def model_inputs(self, model: nn.Module, view: View, side: str) -> dict[str, Tensor]:
        """Keyword arguments for ``model(**kw)`` from a view; ``side`` is "teacher" or "student"."""
        kw: dict[str, Tensor] = {"attention_mask": view.attention_mask}
        if view.token_type_ids is not None and _accepts(model, "token_type_ids"):
            kw["token_type_ids"] = view.token_type_ids
        if view.teacher_embeds is None:
            if view.input_ids is None:
                raise ValueError("a View needs input_ids or teacher_embeds")
            kw["input_ids"] = view.input_ids
            return kw
        emb = view.teacher_embeds
        if side == "student":
            if self.bridge is None:
                raise RuntimeError("embedding views need MethodContext.bridge")
            emb = self.bridge(emb)
        if view.input_ids is not None:
            own = model.get_input_embeddings()(view.input_ids.clamp_min(0))
            mask = view.embeds_mask if view.embeds_mask is not None else torch.ones_like(view.attention_mask)
            emb = torch.where(mask.bool().unsqueeze(-1), emb.to(own.dtype), own)
        kw["inputs_embeds"] = emb
        return kw

    def forward(self, model: nn.Module, view: View, side: str, *, hidden: bool = False):
        """Run one model on a view (under the loop's autocast); returns the transformers output."""
        with self.autocast():
            return model(**self.model_inputs(model, view, side), output_hidden_states=hidden)

    def kd(self, student_logits: Tensor, teacher_logits: Tensor, **kw: Any) -> Tensor:
        """The run's KD divergence (``fastkd.distill_loss`` with its temperature and divergence)."""
        kw.setdefault("temperature", self.temperature)
        kw.setdefault("divergence", self.divergence)
        return fastkd.distill_loss(student_logits.float(), teacher_logits.float(), **kw)

    # ---- helpers for text-based methods ---------------------------------------------------
    @torch.no_grad()
    def teacher_logits_on(
        self, texts: Sequence[str], pairs: Sequence[str | None] | None = None, chunk: int = 64
    ) -> Tensor:  # fmt: skip
        """The teacher's float32 logits ``[N, C]`` on ``texts`` (with ``pairs`` on a pair task), ``chunk`` rows
        at a time, on the CPU."""
        out = []
        for i in range(0, len(texts), chunk):
            view = self.encode_texts(texts[i : i + chunk], pairs[i : i + chunk] if pairs is not None else None)
            with torch.no_grad():
                out.append(self.forward(self.teacher, view, "teacher").logits.float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.num_labels)

    def encode_texts(self, texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> View:
        enc = encode(self.tokenizer, texts, pairs, max_length=self.max_length, device=self.device)
        return View(
            attention_mask=enc["attention_mask"], input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids")
        )

    def word_embeddings(self, model: nn.Module) -> Tensor:
        return model.get_input_embeddings().weight

    def special_ids(self) -> list[int]:
        return sorted({int(i) for i in (self.tokenizer.all_special_ids or []) if i is not None})

    def content_mask(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """True at real (non-special, non-padding) tokens."""
        special = torch.tensor(self.special_ids(), device=input_ids.device, dtype=input_ids.dtype)
        return attention_mask.bool() & ~torch.isin(input_ids, special)

    @contextmanager
    def student_eval(self) -> Iterator[None]:
        """The student in eval mode (no dropout noise) for a method's own passes, its mode restored after."""
        was_training = self.student.training
        self.student.eval()
        try:
            yield
        finally:
            self.student.train(was_training)

    def reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Average the gradients of a method's own modules across ranks (no-op on one process)."""
        if self.all_reduce is not None and self.world > 1:
            self.all_reduce([p.grad for p in params if p.grad is not None])


class Method:
    """Base class of the distillation methods (see the module docstring for the protocol)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    data_free: ClassVar[bool] = True  # False only for the supervised upper bound
    needs_ood: ClassVar[bool] = False  # reads the out-of-domain text source
    accepts_ood: ClassVar[bool] = False  # reads it when given (needs_ood: must be given)
    needs_teacher_logits: ClassVar[bool] = False  # reads stored teacher logits; the teacher never runs
    default_hidden_weight: ClassVar[float] = 0.0
    uses_embeddings: bool = False  # views carry teacher-space embeddings (the loop refits the bridge)

    @dataclass
    class Options:
        pass

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        self.ctx = ctx
        self.opt = options if options is not None else self.Options()

    def setup(self) -> None:
        return None

    def before_step(self, step: int, generator: torch.Generator) -> dict[str, float]:
        return {}

    def batch(self, info: StepInfo) -> list[View]:
        raise NotImplementedError

    def student_loss(self, view: View, student_out: Any, teacher_out: Any) -> Tensor | None:
        return None

    def row_weights(self, view: View, teacher_logits: Tensor) -> Tensor | None:
        """Per-row weights ``[B]`` of the KD term on ``view`` given the teacher's logits on it (the KD
        term becomes ``sum(w * kd_row) / sum(w)``), or None for the plain batch mean."""
        return None

    def student_parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    # ---- options --------------------------------------------------------------------------
    @classmethod
    def option_help(cls) -> list[tuple[str, Any, str]]:
        """``(name, default, help)`` for each option of this method."""
        out = []
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, default, f.metadata.get("help", "")))
        return out

    @classmethod
    def parse_options(cls, values: dict[str, Any] | None) -> Any:
        """Build the Options dataclass from a dict (strings are converted to the field types)."""
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        hints = typing.get_type_hints(cls.Options)
        kwargs = {}
        for key, raw in values.items():
            k = key.replace("-", "_")
            if k not in fields:
                raise OptionError(
                    f"unknown option {key!r} for method {cls.name!r}; valid options: "
                    f"{', '.join(sorted(fields)) or '(none)'}"
                )
            kwargs[k] = _convert(raw, hints[k], f"method option {key!r}")
        opt = cls.Options(**kwargs)
        check = getattr(opt, "check", None)
        if check is not None:
            try:
                check()
            except ValueError as e:
                raise OptionError(f"method {cls.name!r}: {e}") from None
        return opt


def _convert(raw: Any, hint: Any, what: str) -> Any:
    """Convert a (string) option value to the annotated type: bool, int, float, str, or X | None."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        if optional:
            return None
        raise OptionError(f"{what} cannot be None")
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if base is float:
            return float(raw)
        if base is str:
            return str(raw)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be {getattr(base, '__name__', base)}, got {raw!r}") from None
    return raw


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by ``fastkd distill --help``)."""
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# Shared pieces: sampling OOD text (and pairs built from it) deterministically.
# --------------------------------------------------------------------------------------------
class TextSampler:
    """Rows of a text corpus by stream position; for pair tasks, pairs built from the corpus.

    Pairs (Zero-shot KD uses OOD pairs for pair tasks; how it builds them is not specified): half
    the rows pair a sentence with another random sentence (unrelated pairs), half with a copy of
    itself with words dropped and shuffled locally (related, overlapping pairs), so the teacher sees
    both kinds. Which half a row falls in, and the partner, come from the row's own seeded RNG.
    """

    BUCKET_CHUNKS = 16  # a length bucket is drawn from this many batches' worth of the stream

    def __init__(self, texts: Sequence[str], seed: int, pair_task: bool, *, bucket: int = 0) -> None:
        self.texts = list(texts)
        self.stream = ShuffledStream(len(self.texts), seed)
        self.pair_task = pair_task
        self.seed = seed
        self.bucket = bucket
        self._chunk_cache: dict[int, list[int]] = {}

    def _bucketed(self, chunk: int) -> list[int]:
        """The text indices of one chunk of the stream, reordered into length buckets.

        With ``bucket = b`` the stream is cut into chunks of ``16 b`` positions; a chunk's texts are
        sorted by length, cut into 16 groups of ``b`` similar lengths, and the groups are put in a
        seeded random order. A batch of ``b`` rows at an aligned position is one group, so it pads
        to a length close to its rows' own (less padding, the same texts, still a pure function of
        the position: resume reads what the uninterrupted run read).
        """
        got = self._chunk_cache.get(chunk)
        if got is None:
            from fastkd.data import mix_seed

            size = self.bucket * self.BUCKET_CHUNKS
            idx = self.stream.indices(chunk * size, size)
            by_len = sorted(range(size), key=lambda j: (len(self.texts[idx[j]]), j))
            groups = [by_len[g * self.bucket : (g + 1) * self.bucket] for g in range(self.BUCKET_CHUNKS)]
            order = torch.randperm(
                self.BUCKET_CHUNKS, generator=torch.Generator().manual_seed(mix_seed(self.seed, 11, chunk))
            )
            got = [idx[j] for g in order.tolist() for j in groups[g]]
            if len(self._chunk_cache) > 2:
                self._chunk_cache.clear()
            self._chunk_cache[chunk] = got
        return got

    def _indices(self, offset: int, count: int) -> list[int]:
        if self.bucket <= 0:
            return self.stream.indices(offset, count)
        size = self.bucket * self.BUCKET_CHUNKS
        return [self._bucketed(p // size)[p % size] for p in range(offset, offset + count)]

    def rows(self, offset: int, count: int) -> tuple[list[str], list[str | None] | None]:
        idx = self._indices(offset, count)
        texts = [self.texts[i] for i in idx]
        if not self.pair_task:
            return texts, None
        from fastkd.data import mix_seed

        pairs: list[str | None] = []
        for pos, t in zip(range(offset, offset + count), texts):
            g = torch.Generator().manual_seed(mix_seed(self.seed, 7, pos))
            if torch.rand((), generator=g).item() < 0.5:
                pairs.append(self.texts[int(torch.randint(len(self.texts), (), generator=g))])
            else:
                words = t.split()
                keep = [w for w in words if torch.rand((), generator=g).item() > 0.2] or words[:1]
                pairs.append(" ".join(keep))
        return texts, pairs

    def random_rows(self, count: int, generator: torch.Generator) -> tuple[list[str], list[str | None] | None]:
        idx = torch.randint(len(self.texts), (count,), generator=generator).tolist()
        texts = [self.texts[i] for i in idx]
        if not self.pair_task:
            return texts, None
        partner = torch.randint(len(self.texts), (count,), generator=generator).tolist()
        return texts, [self.texts[j] for j in partner]


class BalancedSampler:
    """Rows of a text corpus drawn class-balanced by the teacher's label (ours; the ``balance`` option
    of ``ood`` and ``zskd``).

    The first ``size`` rows of ``base``'s seeded stream (with their pairs on a pair task) are
    labelled by the teacher once (``labels``: one class per row). Row ``p`` of the stream is then a
    class drawn uniformly among those present and a row of that class, both from ``p``'s own seeded
    RNG, so a resumed run reads what the uninterrupted one read. On an OOD corpus the teacher
    labels unevenly (it calls most WordNet glosses neutral on the tweet task); uniform draws then
    show the student the rare classes' rows rarely.
    """

    def __init__(self, base: TextSampler, size: int, labels: Callable[[list[str], list | None], Tensor]) -> None:
        if size < 1:
            raise ValueError(f"balance: expected a number of OOD rows to label >= 1, got {size}")
        size = min(size, len(base.texts))
        self.texts, pairs = base.rows(0, size)
        self.pairs = list(pairs) if pairs is not None else None
        self.seed = base.seed
        got = labels(self.texts, self.pairs)
        by: dict[int, list[int]] = {}
        for i, y in enumerate(got.tolist()):
            by.setdefault(int(y), []).append(i)
        self.by_label = by
        self.classes = sorted(by)

    def label_shares(self, num_labels: int) -> list[float]:
        """The share of each class among the labelled rows."""
        n = sum(len(v) for v in self.by_label.values())
        return [len(self.by_label.get(k, [])) / n for k in range(num_labels)]

    def _pick(self, g: torch.Generator) -> int:
        rows = self.by_label[self.classes[int(torch.randint(len(self.classes), (), generator=g))]]
        return rows[int(torch.randint(len(rows), (), generator=g))]

    def _take(self, idx: list[int]) -> tuple[list[str], list[str | None] | None]:
        return [self.texts[i] for i in idx], [self.pairs[i] for i in idx] if self.pairs is not None else None

    def rows(self, offset: int, count: int) -> tuple[list[str], list[str | None] | None]:
        from fastkd.data import mix_seed

        return self._take(
            [
                self._pick(torch.Generator().manual_seed(mix_seed(self.seed, 13, p)))
                for p in range(offset, offset + count)
            ]
        )

    def random_rows(self, count: int, generator: torch.Generator) -> tuple[list[str], list[str | None] | None]:
        return self._take([self._pick(generator) for _ in range(count)])


@dataclass
class BalanceOptions:
    """The options of class-balanced OOD draws, shared by ``ood`` and ``zskd`` (their Options inherit them)."""

    balance: int = opt(
        0, "draw OOD rows class-balanced by the teacher's label from the first N rows of the stream (0: off; ours)"
    )
    balance_cache: str | None = opt(
        "auto",
        "folder for the teacher's labels of OOD rows (balance): auto ($FASTKD_CACHE or ~/.cache/fastkd), a path, "
        "or none",
    )

    def check_balance(self, method: str) -> None:
        if self.balance < 0:
            raise ValueError(f"{method} balance must be >= 0 (rows to label; 0: off), got {self.balance}")


def hash_weights(h: Any, model: nn.Module) -> None:
    """Feed a model's weights (names and float32 values, in name order) into the hash ``h``."""
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())


class LabelCache:
    """The teacher's labels (argmax) of text rows, kept in one JSON file per teacher (ours; ``balance``).

    The file is named by a hash of the teacher's weights, its tokenizer's fingerprint, the maximum
    length and the number of labels, so another teacher (or the same one fine-tuned again) never
    reads it; a row is keyed by a hash of its text and pair. Rows missing from the file are labelled
    shortest first in chunks (less padding: about 3x faster than stream order on WordNet glosses)
    and added; the file is rewritten atomically, merged with what other runs added meanwhile. A
    label is the teacher's argmax; a row's padding inside its chunk moves the logits by ~1e-6, so a
    label could differ between chunkings only at an exact tie.
    """

    VERSION = 1

    def __init__(self, folder: str | os.PathLike, ctx: MethodContext) -> None:
        from fastkd.logits import tokenizer_fingerprint

        h = hashlib.sha256()
        hash_weights(h, ctx.teacher)
        h.update(tokenizer_fingerprint(ctx.tokenizer).encode())
        h.update(json.dumps([ctx.max_length, ctx.num_labels, self.VERSION]).encode())
        self.path = Path(folder) / "labels" / f"teacher-{h.hexdigest()[:16]}.json"
        self.ctx = ctx

    @staticmethod
    def row_key(text: str, pair: str | None) -> str:
        blob = text if pair is None else f"{text}\x1f{pair}"
        return hashlib.sha1(blob.encode("utf-8", "replace")).hexdigest()[:20]

    def _read(self) -> dict[str, int]:
        try:
            got = json.loads(self.path.read_text())
            return {str(k): int(v) for k, v in got["labels"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # no file yet, or a broken one: label again

    def labels(self, texts: list[str], pairs: list | None) -> Tensor:
        keys = [self.row_key(t, pairs[i] if pairs is not None else None) for i, t in enumerate(texts)]
        known = self._read()
        todo = sorted({i for i, k in enumerate(keys) if k not in known}, key=lambda i: (len(texts[i]), i))
        todo_keys: dict[str, int] = {}
        for i in todo:  # one forward per distinct row
            todo_keys.setdefault(keys[i], i)
        rows = list(todo_keys.values())
        if rows:
            from tqdm.auto import tqdm

            got: list[int] = []
            chunk = 64
            with tqdm(total=len(rows), desc="label OOD rows", leave=False, disable=not self.ctx.progress) as bar:
                for s in range(0, len(rows), chunk):
                    part = rows[s : s + chunk]
                    logits = self.ctx.teacher_logits_on(
                        [texts[i] for i in part], [pairs[i] for i in part] if pairs is not None else None, chunk=chunk
                    )
                    got.extend(logits.argmax(-1).tolist())
                    bar.update(len(part))
            new = {keys[i]: int(y) for i, y in zip(rows, got)}
            known.update(new)
            self._write(new)
        return torch.tensor([known[k] for k in keys], dtype=torch.long)

    def _write(self, new: dict[str, int]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = self._read()
            merged.update(new)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": self.VERSION, "labels": merged}, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError:
            pass  # caching is an optimisation


def ood_sampler(
    ctx: MethodContext, balance: int, cache: str | None = None, buckets: bool = True
) -> TextSampler | BalancedSampler:  # fmt: skip
    """The OOD rows of ``ood`` and ``zskd``: the seeded stream (length-bucketed unless ``buckets`` is
    False), or with ``balance > 0`` the first ``balance`` rows of it drawn class-balanced by the
    teacher's label (not bucketed). ``cache``: a folder for the teacher's labels (:class:`LabelCache`;
    ``auto`` = the fastkd cache), or None / ``none``."""
    assert ctx.ood_texts is not None
    bucket = (ctx.batch_size or ctx.micro_batch_size) if buckets else 0
    base = TextSampler(ctx.ood_texts, ctx.seed, ctx.pair_task, bucket=bucket)
    if balance <= 0:
        return base
    if cache == "auto":
        from fastkd.assets import cache_dir

        cache = str(cache_dir())
    if cache is not None and cache.lower() != "none":
        return BalancedSampler(base, balance, LabelCache(cache, ctx).labels)
    return BalancedSampler(base, balance, lambda texts, pairs: ctx.teacher_logits_on(texts, pairs).argmax(-1))
