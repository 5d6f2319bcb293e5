"""Data for distillation: labeled task rows, unlabeled out-of-domain (OOD) text, named sources.

* Labeled rows are dicts ``{"text": str, "text_pair": str | None, "label": int}``, read by
  :func:`load_labeled` from CSV / TSV / JSONL files (columns ``text``, optional ``text_pair``,
  ``label``; the GLUE names ``sentence``/``sentence1``/``sentence2``/``question``/``premise``/
  ``hypothesis`` are accepted too), from a ``datasets`` dataset (a hub name or a local folder
  saved with ``save_to_disk``), or from a named source.
* OOD text is a list of strings, read by :func:`load_text` from a text file (one sentence per
  line), a folder of such files, a CSV / TSV / JSONL file (its ``text`` column, e.g. the output of
  ``fastkd generate``), a ``datasets`` text dataset, or a named source.
* Labels may be integers or names (``positive``, ``sports``, ...). :func:`load_labeled_splits`
  reads several splits of one task and maps names to ids in sorted order (stable); a teacher keeps
  that mapping as ``config.label2id`` and every later read maps names through it.
* Named sources: :func:`register_source` maps a name to a loader; ``"name:split"`` passes the
  split to the loader. fastkd's offline corpora (``wordnet``, ``austen``, ``movie_reviews``, ...) are
  registered by :func:`fastkd.assets.register_sources` (the command line and :func:`fastkd.distill`
  call it); this module imports nothing else of fastkd's but :mod:`fastkd.errors`.

Sampling is deterministic and resumable: :class:`ShuffledStream` gives the index at any position
of an endless sequence of seeded per-epoch permutations, so a run resumed at step k reads exactly
what the uninterrupted run would have read.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastkd.errors import DataError

__all__ = [
    "DataError",
    "LabeledRow",
    "ShuffledStream",
    "encode",
    "get_source",
    "infer_label2id",
    "load_labeled",
    "load_labeled_splits",
    "load_text",
    "mix_seed",
    "register_source",
    "registered_sources",
    "write_jsonl",
]

LabeledRow = dict[str, Any]
Loader = Callable[[str | None], Sequence[Any]]

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "premise", "question1")
PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis", "question2")
LABEL_COLUMNS = ("label", "labels")
TEXT_SUFFIXES = (".txt", ".text")

_SOURCES: dict[str, Loader] = {}


# --------------------------------------------------------------------------------------------
# Named sources
# --------------------------------------------------------------------------------------------
def register_source(name: str, loader: Loader) -> None:
    """Register a named data source.

    ``loader(split)`` is called with the part after ``:`` in ``"name:split"`` (or None) and returns
    a list of strings (a text corpus) or of labeled row dicts. Registering a name again replaces it.
    """
    if not isinstance(name, str) or not name or ":" in name or os.sep in name:
        raise ValueError(f"source name must be a non-empty string without ':' or {os.sep!r}, got {name!r}")
    if not callable(loader):
        raise TypeError(f"loader must be callable, got {type(loader).__name__}")
    _SOURCES[name] = loader


def registered_sources() -> list[str]:
    """The names of the registered sources."""
    return sorted(_SOURCES)


def get_source(name: str) -> Loader | None:
    return _SOURCES.get(name)


def _split_name(source: str) -> tuple[str, str | None]:
    name, sep, split = source.partition(":")
    return name, (split or None) if sep else None


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _read_table(path: str) -> list[dict[str, Any]]:
    """Rows of a CSV / TSV / JSONL file as dicts."""
    lower = path.lower()
    try:
        if lower.endswith((".jsonl", ".json", ".ndjson")):
            rows = []
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if lower.endswith(".json") and text.lstrip().startswith("["):
                data = json.loads(text)
                if not isinstance(data, list):
                    raise DataError(f"{path}: a .json file must hold a list of objects")
                return data
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            return rows
        if lower.endswith((".csv", ".tsv")):
            delim = "\t" if lower.endswith(".tsv") else ","
            with open(path, encoding="utf-8", newline="") as f:
                quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
                return list(csv.DictReader(f, delimiter=delim, quoting=quoting))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    raise DataError(f"{path}: unsupported file type (use .csv, .tsv, .jsonl or .json; .txt for unlabeled text)")


def _pick(row: dict[str, Any], names: Sequence[str]) -> str | None:
    for n in names:
        if n in row:
            return n
    return None


def _to_label(value: Any, label2id: dict[str, int] | None, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        v = value.strip()
        if v.lstrip("-").isdigit():
            return int(v)
        try:
            float(v)
            numeric = True
        except ValueError:
            numeric = False
        if numeric:
            raise DataError(f"{where}: label {value!r} is not an integer class id")
        if label2id:
            for k, i in label2id.items():
                if k.lower() == v.lower():
                    return int(i)
            raise DataError(f"{where}: label {value!r} is not one of the label names {sorted(label2id)}")
        raise DataError(
            f"{where}: label {value!r} is a name, but no label names are known here (a teacher fine-tuned by "
            "`fastkd teacher` on named labels carries them; otherwise use integer ids)"
        )
    raise DataError(f"{where}: label {value!r} is not an integer class id")


def _rows_to_labeled(rows: Sequence[Any], where: str, label2id: dict[str, int] | None) -> list[LabeledRow]:
    out: list[LabeledRow] = []
    if not rows:
        return out
    if isinstance(rows[0], str):
        raise DataError(f"{where}: plain text has no labels; labeled data must be .csv, .tsv, .jsonl or .json")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{where}: row {i} is a {type(r).__name__}, not a mapping")
        tcol, pcol, lcol = _pick(r, TEXT_COLUMNS), _pick(r, PAIR_COLUMNS), _pick(r, LABEL_COLUMNS)
        if tcol is None or lcol is None or r.get(tcol) is None:
            raise DataError(
                f"{where}: row {i} needs a text column ({' / '.join(TEXT_COLUMNS)}) and a label column "
                f"({' / '.join(LABEL_COLUMNS)}); found columns {sorted(r)}"
            )
        pair = r.get(pcol) if pcol else None
        out.append(
            {
                "text": str(r[tcol]),
                "text_pair": None if pair in (None, "") else str(pair),
                "label": _to_label(r.get(lcol), label2id, f"{where}: row {i}"),
            }
        )
    return out


def _texts_from_rows(rows: Sequence[Any], where: str) -> list[str]:
    if not rows:
        return []
    if isinstance(rows[0], str):
        return [s.strip() for s in rows if isinstance(s, str) and s.strip()]
    if isinstance(rows[0], dict):
        col = _pick(rows[0], TEXT_COLUMNS)
        if col is None:
            raise DataError(f"{where}: needs a text column ({' / '.join(TEXT_COLUMNS)}); found {sorted(rows[0])}")
        return [str(r[col]).strip() for r in rows if r.get(col) is not None and str(r[col]).strip()]
    raise DataError(f"{where}: expected strings or dicts, got {type(rows[0]).__name__}")


def _read_text_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_info.json"))
        or os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or os.path.isfile(os.path.join(path, "state.json"))
    )


def _load_datasets(source: str, split: str | None, what: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{what} source {source!r} is not a file or folder, not a registered source "
            f"({', '.join(registered_sources()) or 'none registered'}), and the `datasets` package is not "
            "installed to load it as a dataset (pip install datasets)"
        ) from None
    try:
        if os.path.isdir(source):
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split or "train")
    except Exception as e:
        raise DataError(f"cannot load {what} dataset {source!r}: {e.__class__.__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        key = split or ("train" if "train" in ds else next(iter(ds)))
        if key not in ds:
            raise DataError(f"dataset {source!r} has no split {key!r} (splits: {list(ds)})")
        ds = ds[key]
    return [dict(r) for r in ds]


def _resolve(source: Any, what: str) -> tuple[list[Any], str]:
    """Raw rows of a source and a description of where they came from."""
    if isinstance(source, (list, tuple)):
        return list(source), f"<{what} list>"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} source must be a path, a source name or a list, got {type(source).__name__}")
    source = os.fspath(source)
    if not source:
        raise DataError(f"{what} source is empty")
    if os.path.isfile(source):
        lower = source.lower()
        if lower.endswith((".csv", ".tsv", ".jsonl", ".json", ".ndjson")):
            return _read_table(source), source
        return _read_text_file(source), source
    if os.path.isdir(source):
        if _is_saved_dataset(source):
            return _load_datasets(source, None, what), source
        rows: list[Any] = []
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for fn in sorted(files):
                if fn.startswith("."):
                    continue
                p = os.path.join(root, fn)
                if fn.lower().endswith((".csv", ".tsv", ".jsonl", ".json", ".ndjson")):
                    rows.extend(_read_table(p))
                else:
                    rows.extend(_read_text_file(p))
        return rows, source
    name, split = _split_name(source)
    loader = get_source(name)
    if loader is not None:
        try:
            rows = list(loader(split))
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"source {source!r} failed to load: {e.__class__.__name__}: {e}") from e
        return rows, source
    looks_like_path = (
        source.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or name.lower().endswith((".txt", ".text", ".csv", ".tsv", ".jsonl", ".json", ".ndjson"))
    )
    if looks_like_path:  # hub dataset ids are "name" or "org/name"
        raise DataError(f"{what} source {source!r}: no such file or folder")
    return _load_datasets(name, split, what), source


def load_labeled(source: Any, *, label2id: dict[str, int] | None = None) -> list[LabeledRow]:
    """Labeled rows ``{"text", "text_pair", "label"}`` from a file, folder, dataset or named source.

    ``label2id`` maps label names (e.g. a teacher's ``config.label2id``) to ids for files whose
    label column holds names instead of integers; a name it lacks is an error naming the name.
    Without it, names are an error: read the splits of a new task with :func:`load_labeled_splits`.
    Raises :class:`DataError` when the source is missing, unreadable, malformed or empty.
    """
    rows, where = _resolve(source, "labeled")
    out = _rows_to_labeled(rows, where, label2id)
    if not out:
        raise DataError(f"labeled source {where!r} is empty")
    return out


def _is_int_label(value: Any) -> bool:
    if isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def infer_label2id(labels: Sequence[Any], where: str = "labels") -> dict[str, int] | None:
    """``None`` when every label is an integer id; ``{name: id}`` in sorted name order when every label
    is a name (``"negative" -> 0, "neutral" -> 1, "positive" -> 2``). A mix is a :class:`DataError`."""
    names = {str(v).strip() for v in labels if not _is_int_label(v)}
    if not names:
        return None
    if any(_is_int_label(v) for v in labels):
        ints = sorted({str(v) for v in labels if _is_int_label(v)})[:5]
        raise DataError(f"{where}: the label column mixes names ({sorted(names)[:5]}) and integers ({ints})")
    return {name: i for i, name in enumerate(sorted(names))}


def load_labeled_splits(
    sources: Sequence[Any], *, label2id: dict[str, int] | None = None
) -> tuple[list[list[LabeledRow]], dict[str, int] | None]:
    """Read several splits of one task (train, dev, ...) with one label mapping.

    With ``label2id`` (a teacher's) every split maps names through it. Without it, the mapping is
    inferred over all splits together by :func:`infer_label2id`: ``None`` for integer labels, else
    the sorted names. Returns ``(rows per source, label2id)``.
    """
    raw = [_resolve(s, "labeled") for s in sources]
    if label2id is None:
        values: list[Any] = []
        for rows, _ in raw:
            for r in rows:
                if isinstance(r, dict):
                    col = _pick(r, LABEL_COLUMNS)
                    if col is not None and r.get(col) is not None:
                        values.append(r[col])
        label2id = infer_label2id(values, ", ".join(w for _, w in raw))
    out = []
    for rows, where in raw:
        got = _rows_to_labeled(rows, where, label2id)
        if not got:
            raise DataError(f"labeled source {where!r} is empty")
        out.append(got)
    return out, label2id


def load_text(source: Any) -> list[str]:
    """Unlabeled sentences (non-empty, stripped) from a file, folder, dataset or named source."""
    rows, where = _resolve(source, "text")
    out = _texts_from_rows(rows, where)
    if not out:
        raise DataError(f"text source {where!r} is empty (no non-blank lines)")
    return out


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows as JSON lines (UTF-8), creating the parent folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Sampling and tokenisation
# --------------------------------------------------------------------------------------------
def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions; no hash())."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class ShuffledStream:
    """Indices into ``n`` items as an endless sequence of seeded permutations (one per epoch).

    ``indices(start, count)`` is a pure function of ``(n, seed, start, count)``: positions, not
    iterator state, are what a checkpoint needs to store.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError(f"ShuffledStream needs n > 0, got {n}")
        self.n = n
        self.seed = seed
        self._cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        perm = self._cache.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
            if len(self._cache) > 2:
                self._cache.clear()
            self._cache[epoch] = perm
        return perm

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, self.n)
            out.append(self._perm(epoch)[i])
        return out


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str | None] | None = None,
    *,
    max_length: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Tokenise a batch (padded to its longest row, truncated to ``max_length``) as tensors."""
    use_pairs = pairs is not None and any(p is not None for p in pairs)
    if use_pairs:
        assert pairs is not None
        enc = tokenizer(
            list(texts), [p if p is not None else "" for p in pairs], truncation=True, max_length=max_length,
            padding=True, return_tensors="pt",
        )  # fmt: skip
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
