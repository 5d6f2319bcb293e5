"""Length-bucketed sampling of OOD text (less padding, same texts, still positional)."""

from __future__ import annotations

import random

from fastkd.methods.base import TextSampler


def _corpus(n=4000, seed=0):
    rng = random.Random(seed)
    return [" ".join(["w"] * rng.randrange(1, 60)) for _ in range(n)]


def test_buckets_hold_the_same_texts_as_the_plain_stream():
    texts = _corpus()
    plain = TextSampler(texts, 3, False)
    bucketed = TextSampler(texts, 3, False, bucket=32)
    chunk = 32 * TextSampler.BUCKET_CHUNKS
    for c in range(3):
        a, _ = plain.rows(c * chunk, chunk)
        b, _ = bucketed.rows(c * chunk, chunk)
        assert sorted(a) == sorted(b) and a != b


def test_buckets_cut_padding():
    texts = _corpus()
    plain = TextSampler(texts, 3, False)
    bucketed = TextSampler(texts, 3, False, bucket=32)

    def padded_tokens(s):
        total = 0
        for step in range(64):
            rows, _ = s.rows(step * 32, 32)
            total += 32 * max(len(r.split()) for r in rows)
        return total

    assert padded_tokens(bucketed) < 0.7 * padded_tokens(plain)


def test_bucketed_rows_are_a_function_of_position():
    texts = _corpus()
    a = TextSampler(texts, 5, False, bucket=16)
    b = TextSampler(texts, 5, False, bucket=16)
    whole, _ = a.rows(0, 16 * 40)
    parts = [r for start in range(0, 16 * 40, 8) for r in b.rows(start, 8)[0]]  # micro-batches, any order of calls
    assert whole == parts
    later, _ = TextSampler(texts, 5, False, bucket=16).rows(16 * 33, 16)  # a resumed run at step 33
    assert later == whole[16 * 33 : 16 * 34]
