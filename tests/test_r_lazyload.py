"""fastkd.r_lazyload: R's XDR serialisation and lazy-load databases, on bytes R wrote and on bytes built here
from the format description (an independent little writer), plus the Austen sentence parser of fastkd.assets."""

from __future__ import annotations

import base64
import gzip
import itertools

import pytest
from _rxdr import _database, _i, _Writer

from fastkd import assets as A
from fastkd.r_lazyload import read_lazyload, unserialize

# data/Rdata.rdx of Debian r-cran-janeaustenr 1.0.0-1 as R wrote it (gzip, 262 bytes): the index of six novels.
AUSTEN_RDX = base64.b64decode(
    "H4sIAAAAAAAAA1WQ0UrDMBSG/6apsEJnxT3BLhXvBYeXPoGCFxNJ2zMXbdKSbMIewjfxAQTxKXwcQU3TkLGLk/z/d8LJn9znAFJwliDN"
    "nER2d3tzcQmwU98Y9yNXhSsGf+TxPPpBZ8u36PPPD7D3ZfTFegb2fRZ9eXUNPv+KfvbwA36ygEvgfAKOyXCDFoqsE6W/fISclBJBF0po"
    "u5LUNr0wLwEe685s1kI/kRFVRbuA856M3QorOx3ItDeyod7Q87aRNQVaWtKWhkVWspWbnWO/4QMwBkz+QiaMPeQ+tK+DfhpmTl6FkaJq"
    "3WNCGEMrMqTrPak75aJYS80w9B/7URx+kQEAAA=="
)


def test_reads_the_index_r_wrote():
    raw = gzip.decompress(AUSTEN_RDX)
    index = unserialize(raw)
    assert list(index["variables"]) == [
        "emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility",
    ]  # fmt: skip
    offsets = list(index["variables"].values())
    assert offsets[0] == [0, 352043] and offsets[-1] == [1334779, 266556]
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(offsets))  # records are contiguous
    assert index["compressed"] == [1] and index["references"] == {}


def test_strings_na_latin1_refs_and_nesting_round_trip():
    w = _Writer()
    value = {"lines": ["It is a truth", "", None, "caf\u00e9"], "inner": {"n": [1, -2, 3]}}
    got = unserialize(w.serialize(value))
    assert got == value  # the second "names" symbol was written as a reference
    assert w.symbols == ["names"]
    latin = b"X\n" + _i(2, 0x040201, 0x020300) + _i(16, 1) + _Writer().char("d\u00e9j\u00e0", latin1=True)
    assert unserialize(latin) == ["d\u00e9j\u00e0"]  # format version 2, a latin-1 string


def test_read_lazyload_by_name_and_all():
    rdx, rdb = _database({"emma": ["EMMA", "", "CHAPTER I"], "persuasion": ["Persuasion"]})
    assert read_lazyload(rdx, rdb) == {"emma": ["EMMA", "", "CHAPTER I"], "persuasion": ["Persuasion"]}
    assert read_lazyload(rdx, rdb, ["persuasion"]) == {"persuasion": ["Persuasion"]}
    with pytest.raises(KeyError, match=r"no object\(s\) \['lady_susan'\].*'emma'"):
        read_lazyload(rdx, rdb, ["emma", "lady_susan"])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"A\n" + _i(3), r"not R XDR serialisation: starts with b'A\\n'"),
        (b"X\n" + _i(4, 0, 0), "format version 4 is not supported"),
        (b"X\n" + _i(2, 0, 0) + _i(3), "R object of type 3 at byte 14 is not supported"),  # a closure
        (b"X\n" + _i(2, 0, 0) + _i(13, 5, 1), "vector of 5 items at byte 22 runs past the end"),
        (b"X\n" + _i(2, 0, 0) + _i(16), "ends early at byte 18"),
    ],
)
def test_malformed_or_unsupported_input_is_a_clear_error(data, match):
    with pytest.raises(ValueError, match=match):
        unserialize(data)


def test_bad_database_records_are_named():
    rdx, rdb = _database({"emma": ["EMMA"]})
    with pytest.raises(ValueError, match=r"record 'emma' \(bytes 0\.\.\d+\) lies outside"):
        read_lazyload(rdx, rdb[:10])
    with pytest.raises(ValueError, match="bzip2/xz"):
        read_lazyload(rdx, rdb[:4] + b"Z" + rdb[5:])
    with pytest.raises(ValueError, match="no named 'variables' list"):
        read_lazyload(gzip.compress(_Writer().serialize(["not", "an", "index"])), rdb)


def test_split_sentences_keeps_quotes_and_titles():
    text = '"Certainly," said Mr. Darcy. "He seems -- very agreeable!" She smiled? yes. And then'
    assert A.split_sentences(text) == [
        '"Certainly," said Mr. Darcy.', '"He seems -- very agreeable!"', "She smiled? yes.", "And then",
    ]  # fmt: skip


def test_parse_austen_skips_headings_joins_lines_and_bounds_lengths():
    long = "; ".join(["the rain fell on the wide grey fields"] * 6) + "."  # 48 words: cut at the semicolons
    lines = [
        "PRIDE AND PREJUDICE", "", "Chapter 1", "", "VOLUME I", "",
        "It is a truth universally acknowledged, that a single man in possession",
        "of a good fortune, must be in want of a wife. Oh!", "",
        "She was _very_ much--too much--pleased.", "", long,
    ]  # fmt: skip
    out = list(A.parse_austen(lines))
    assert out[0] == (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife."
    )
    assert "Oh!" not in out  # under AUSTEN_MIN_WORDS
    assert out[1] == "She was very much -- too much -- pleased."
    assert out[2:] == ["the rain fell on the wide grey fields;"] * 5 + ["the rain fell on the wide grey fields."]
