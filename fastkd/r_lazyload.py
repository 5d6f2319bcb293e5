"""A reader of R's lazy-load databases (``data/Rdata.rdx`` + ``Rdata.rdb``), for one offline corpus.

The Jane Austen novels of the Debian package ``r-cran-janeaustenr`` (an OOD corpus of
:mod:`fastkd.assets`) are stored the way R stores a package's data: an index (``.rdx``, gzip) that
maps each object's name to ``(offset, length)`` in the record file (``.rdb``), where each record is
a 4-byte big-endian length followed by a zlib stream. Both hold objects in R's XDR serialisation
(format versions 2 and 3; "R Internals", section 1.8). This module reads the subset that data
files use: ``NULL``, symbols, pairlists, character, logical, integer, double and generic vectors,
attributes and references; a named list becomes a ``dict``. Anything else (closures, environments,
bytecode) raises ``ValueError`` naming the type and the byte offset. It is written from the format
description so that no R-reading package (and its pandas/xarray stack) becomes a dependency.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import Any

__all__ = ["read_lazyload", "unserialize"]

# SEXP type codes (R Internals, "Serialization formats")
_SYM, _LIST, _LANG, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _EXPR = 1, 2, 6, 9, 10, 13, 14, 16, 19, 20
_NIL, _REF = 254, 255
_NO_PAYLOAD = {242, 241, 247, 251, 253, 254}  # empty/base env, base namespace, missing arg, global env, NULL
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_LATIN1 = 1 << 14  # a CHARSXP's LATIN1_MASK (levels bit 2); UTF-8, ASCII and native strings decode as UTF-8


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ValueError(f"R serialisation ends early at byte {self.pos} of {len(self.data)}")
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def header(self) -> None:
        if self.data[:2] != b"X\n":
            raise ValueError(f"not R XDR serialisation: starts with {self.data[:2]!r}, expected b'X\\n'")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # the writer's R version, the oldest R that reads it
        if version == 3:
            n = self.int()  # the native encoding's name, skipped
            self.pos += n
        elif version != 2:
            raise ValueError(f"R serialisation format version {version} is not supported (2 or 3)")

    def numbers(self, code: str, size: int) -> list:
        n = self.int()
        end = self.pos + size * n
        if n < 0 or end > len(self.data):
            raise ValueError(f"R vector of {n} items at byte {self.pos} runs past the end of the data")
        out = list(struct.unpack_from(f">{n}{code}", self.data, self.pos))
        self.pos = end
        return out

    def item(self) -> Any:
        at = self.pos
        flags = self.int()
        kind = flags & 0xFF
        if kind in _NO_PAYLOAD:
            return None
        if kind == _REF:
            index = (flags >> 8) or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            text = self.data[self.pos : self.pos + n]
            self.pos += n
            return text.decode("latin-1") if flags & _LATIN1 else text.decode("utf-8", "replace")
        if kind in (_LIST, _LANG):
            pairs = []
            while True:  # a pairlist is a chain of (attributes, tag, car, cdr) cells; walk the cdrs
                if flags & _HAS_ATTR:
                    self.item()
                tag = self.item() if flags & _HAS_TAG else None
                pairs.append((tag, self.item()))
                at, flags = self.pos, self.int()
                if flags & 0xFF == _NIL:
                    return pairs
                if flags & 0xFF not in (_LIST, _LANG):
                    raise ValueError(f"R pairlist cell at byte {at} has type {flags & 0xFF}, expected a pairlist")
        if kind in (_STR, _VEC, _EXPR):
            n = self.int()
            value: Any = [self.item() for _ in range(n)]
        elif kind in (_LGL, _INT):
            value = self.numbers("i", 4)
        elif kind == _REAL:
            value = self.numbers("d", 8)
        else:
            raise ValueError(f"R object of type {kind} at byte {at} is not supported (only data vectors and lists)")
        if flags & _HAS_ATTR:
            attrs = dict(self.item() or [])
            names = attrs.get("names")
            if kind == _VEC and isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value))
        return value


def unserialize(data: bytes) -> Any:
    """One R object from its XDR serialisation (as ``serialize(x, NULL)`` writes it)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_lazyload(rdx: bytes, rdb: bytes, names: list[str] | None = None) -> dict[str, Any]:
    """The objects of a lazy-load database, by name (all of them, or ``names``), in index order.

    ``rdx`` is the index file's bytes (gzip or zlib with a length prefix), ``rdb`` the records'.
    """
    raw = gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])
    index = unserialize(raw)
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise ValueError("not an R lazy-load index: it has no named 'variables' list")
    out: dict[str, Any] = {}
    for name, where in index["variables"].items():
        if names is not None and name not in names:
            continue
        offset, length = where
        record = rdb[offset : offset + length]
        if len(record) != length or length < 5:
            raise ValueError(f"record {name!r} (bytes {offset}..{offset + length}) lies outside the .rdb file")
        if record[4:5] in (b"2", b"3", b"Z"):
            raise ValueError(f"record {name!r} is bzip2/xz compressed; only zlib records are supported")
        out[name] = unserialize(zlib.decompress(record[4:]))
    missing = sorted(set(names or []) - set(out))
    if missing:
        raise KeyError(f"the lazy-load database has no object(s) {missing}; it has {sorted(index['variables'])}")
    return out
