"""A minimal writer of R's XDR serialisation and lazy-load databases, from the format description ("R
Internals", 1.8): test input for fastkd.r_lazyload (an independent writer, so a reader bug cannot cancel out)."""

from __future__ import annotations

import gzip
import struct
import zlib

UTF8, LATIN1 = 1 << 15, 1 << 14  # CHARSXP encoding flags (levels bits 3 and 2)


def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


class _Writer:
    """A minimal R XDR writer (version 3): strings, integer vectors, named lists; symbols become references
    the second time they appear, as R writes them."""

    def __init__(self) -> None:
        self.symbols: list[str] = []

    def char(self, s: str | None, latin1: bool = False) -> bytes:
        if s is None:
            return _i(9, -1)
        raw = s.encode("latin-1" if latin1 else "utf-8")
        return _i(9 | (LATIN1 if latin1 else UTF8), len(raw)) + raw

    def sym(self, name: str) -> bytes:
        if name in self.symbols:
            return _i(((self.symbols.index(name) + 1) << 8) | 255)
        self.symbols.append(name)
        return _i(1) + self.char(name)

    def obj(self, x) -> bytes:
        if isinstance(x, dict):
            body = _i(19 | 1 << 9, len(x)) + b"".join(self.obj(v) for v in x.values())
            names = _i(16, len(x)) + b"".join(self.char(k) for k in x)
            return body + _i(2 | 1 << 10) + self.sym("names") + names + _i(254)
        if isinstance(x, list) and all(isinstance(v, int) for v in x) and x:
            return _i(13, len(x), *x)
        if isinstance(x, list):
            return _i(16, len(x)) + b"".join(self.char(v) for v in x)
        raise TypeError(type(x))

    def serialize(self, x) -> bytes:
        return b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8" + self.obj(x)


def _database(objects: dict) -> tuple[bytes, bytes]:
    """(rdx, rdb) of a lazy-load database holding ``objects``, laid out as R's makeLazyLoadDB does."""
    rdb, where = b"", {}
    for name, value in objects.items():
        body = _Writer().serialize(value)
        record = struct.pack(">I", len(body)) + zlib.compress(body)
        where[name] = [len(rdb), len(record)]
        rdb += record
    index = {"variables": where, "references": {}, "compressed": [1]}
    return gzip.compress(_Writer().serialize(index)), rdb
