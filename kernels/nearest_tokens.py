"""Triton kernel of ``fastkd.nearest_tokens``: top-k vocabulary entries per embedding, one pass over
the vocabulary with the running top-k in registers.

Scores (e an embedding row, w a vocabulary row) and the key each is ranked by:

    METRIC 0 cosine   s = e.w / (max(|e|, eps) max(|w|, eps))    key = (e.w) * colterm[w],  colterm = 1 / max(|w|, eps)
    METRIC 1 dot      s = e.w                                     key = e.w
    METRIC 2 l2       s = |e - w|   (smallest first)              key = 2 e.w - colterm[w],  colterm = |w|^2

(the row factors 1 / max(|e|, eps) and |e|^2 do not change a row's order, so they are applied to the
winners only; l2 distances of the winners are recomputed exactly as |e - w|).
Order: larger key first; equal keys: lower vocabulary id first; a NaN key ranks as -inf and its score
is reported as NaN.

One program owns BLOCK_M rows. For each vocabulary tile of BLOCK_N entries it computes the
[BLOCK_M, BLOCK_N] dot products with ``tl.dot`` (K loop over H in BLOCK_K steps; IEEE float32 for
float32 inputs, so the ranking is exact, not TF32), turns them into keys, and merges the tile into the
running list ([BLOCK_M, KP] values, raw values and ids; KP = next power of two >= K, the slots >= K
are inert) by rounds: each round takes every row's best remaining candidate of the tile (max key, then
min id) and lets it replace the row's worst list entry if it ranks before it; the rounds stop as soon
as no row improves (after at most K rounds), which after the first tiles is usually the first round.
At the end the list is emitted best first. Memory: the outputs only; the score matrix exists one
register tile at a time. Row and vocabulary offsets are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

COSINE = 0
DOT = 1
L2 = 2
EPS = 1e-8
_NO_ID = 2**62  # "no entry" id: ranks after every real id


@triton.jit
def nearest_tokens_kernel(
    e_ptr,  # embeds [N, H], row stride se, unit column stride
    w_ptr,  # vocabulary [V, H], row stride sw, unit column stride
    colterm_ptr,  # [V] compute type: 1 / max(|w|, eps) (cosine) or |w|^2 (l2); unused for dot
    rowf_ptr,  # [N] compute type: 1 / max(|e|, eps) (cosine); unused otherwise
    ids_ptr,  # out: [N, K] int64, best first
    sc_ptr,  # out: [N, K] compute type, best first
    N,
    V,
    H,
    se,
    sw,
    METRIC: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,  # compute type: tl.float32, tl.float64 for float64 inputs
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 / float64 (never TF32), None for 16-bit
    UPCAST: tl.constexpr,  # multiply in float32 (the interpreter's bfloat16 tl.dot is wrong: triton issue #11584)
):
    NEG = float("-inf")
    NO_ID = 4611686018427387904  # 2**62
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < N
    slot = tl.arange(0, KP)
    real = (slot < K)[None, :] & (rows >= 0)[:, None]  # [BLOCK_M, KP]
    best_v = tl.where(real, NEG, float("inf")).to(ACC)  # rank values (NaN mapped to -inf)
    best_raw = tl.zeros([BLOCK_M, KP], ACC)  # the keys as computed (NaN kept), for the scores
    best_i = tl.where(real, NO_ID, -1).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)

    for n0 in range(0, V, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < V
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for k0 in range(0, H, BLOCK_K):
            hk = k0 + kk
            a = tl.load(e_ptr + rows[:, None] * se + hk[None, :], mask=rmask[:, None] & (hk < H)[None, :], other=0.0)
            b = tl.load(w_ptr + cols[:, None] * sw + hk[None, :], mask=cmask[:, None] & (hk < H)[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
        if METRIC == 0:
            raw = acc * tl.load(colterm_ptr + cols, mask=cmask, other=0.0)[None, :]
        elif METRIC == 2:
            raw = 2.0 * acc - tl.load(colterm_ptr + cols, mask=cmask, other=0.0)[None, :]
        else:
            raw = acc
        rk = tl.where(cmask[None, :] & (raw == raw), raw, NEG)  # noqa: PLR0124 (raw != raw only for NaN)
        cid = tl.where(cmask[None, :] & (rows >= 0)[:, None], cols[None, :], NO_ID)

        # Merge rounds: at most K, stopping when no row improves.
        r = 0
        improved = 1
        while improved * (K - r) > 0:
            m = tl.max(rk, axis=1)
            cand = tl.min(tl.where(rk == m[:, None], cid, NO_ID), axis=1)
            is_c = cid == cand[:, None]
            raw_c = tl.sum(tl.where(is_c, raw, 0.0), axis=1)
            wv = tl.min(tl.where(real, best_v, float("inf")), axis=1)
            wi = tl.max(tl.where(real & (best_v == wv[:, None]), best_i, -1), axis=1)
            better = (cand != NO_ID) & ((m > wv) | ((m == wv) & (cand < wi)))
            # one slot holding the worst entry (the unfilled slots all hold the same (-inf, NO_ID))
            ws = tl.max(tl.where(real & (best_v == wv[:, None]) & (best_i == wi[:, None]), slot[None, :], -1), axis=1)
            repl = (slot[None, :] == ws[:, None]) & better[:, None]
            best_v = tl.where(repl, m[:, None], best_v)
            best_i = tl.where(repl, cand[:, None], best_i)
            best_raw = tl.where(repl, raw_c[:, None], best_raw)
            rk = tl.where(is_c, NEG, rk)
            cid = tl.where(is_c, NO_ID, cid)
            improved = tl.max(better.to(tl.int32), axis=0)
            r += 1

    # Emit the list best first.
    if METRIC == 0:
        rowf = tl.load(rowf_ptr + rows, mask=rmask, other=1.0)
    for q in range(K):
        avail = real & (best_i >= 0)
        mv = tl.max(tl.where(avail, best_v, NEG), axis=1)
        mi = tl.min(tl.where(avail & (best_v == mv[:, None]), best_i, NO_ID), axis=1)
        sel = avail & (best_i == mi[:, None])
        raw_q = tl.sum(tl.where(sel, best_raw, 0.0), axis=1)
        best_i = tl.where(sel, -1, best_i)
        if METRIC == 0:
            score = raw_q * rowf
        elif METRIC == 2:
            dist = tl.zeros([BLOCK_M], ACC)
            for k0 in range(0, H, BLOCK_K):
                hk = k0 + kk
                hm = rmask[:, None] & (hk < H)[None, :]
                ev = tl.load(e_ptr + rows[:, None] * se + hk[None, :], mask=hm, other=0.0).to(ACC)
                wv_ = tl.load(w_ptr + mi[:, None] * sw + hk[None, :], mask=hm, other=0.0).to(ACC)
                dist += tl.sum((ev - wv_) * (ev - wv_), axis=1)
            score = tl.sqrt(dist)
        else:
            score = raw_q
        tl.store(ids_ptr + rows * K + q, mi, mask=rmask)
        tl.store(sc_ptr + rows * K + q, score.to(sc_ptr.dtype.element_ty), mask=rmask)


def row_sq_norms(x: torch.Tensor, acc: torch.dtype, chunk: int = 4096) -> torch.Tensor:
    """Sum of squares of each row of x in the compute type, as a plain sum (|w|^2 through a norm and a
    square would round, and two vocabulary rows at equal distance would no longer tie), in chunks so
    that 16-bit inputs never get a full-size float32 copy."""
    out = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for i in range(0, x.shape[0], chunk):
        out[i : i + chunk] = x[i : i + chunk].to(acc).square().sum(1)
    return out


def _blocks(N: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    bm = min(64, max(16, triton.next_power_of_2(N)))
    if dtype in (torch.bfloat16, torch.float16):
        return bm, 128, 64, 4
    return bm, 64, 32, 4


def nearest_tokens(
    embeds: torch.Tensor, matrix: torch.Tensor, k: int, metric: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host launcher: embeds [N, H], matrix [V, H] of the same dtype -> (ids [N, k] int64, scores [N, k])."""
    N, H = embeds.shape
    V = matrix.shape[0]
    acc = torch.float64 if embeds.dtype == torch.float64 else torch.float32
    ids = torch.empty((N, k), dtype=torch.int64, device=embeds.device)
    scores = torch.empty((N, k), dtype=acc, device=embeds.device)
    if N == 0:
        return ids, scores
    e = embeds if (embeds.stride(-1) == 1 or H <= 1) else embeds.contiguous()
    w = matrix if (matrix.stride(-1) == 1 or H <= 1) else matrix.contiguous()
    if metric == COSINE:
        colterm = 1.0 / row_sq_norms(w, acc).sqrt().clamp_min(EPS)
        rowf = 1.0 / row_sq_norms(e, acc).sqrt().clamp_min(EPS)
    elif metric == L2:
        colterm = row_sq_norms(w, acc)
        rowf = colterm
    else:
        colterm = rowf = scores
    bm, bn, bk, warps = _blocks(N, embeds.dtype)
    # bfloat16 products are exact in float32, so upcasting changes nothing but the interpreter bug.
    upcast = embeds.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    nearest_tokens_kernel[(triton.cdiv(N, bm),)](
        e, w, colterm, rowf, ids, scores, N, V, H, e.stride(0) if N > 1 else H, w.stride(0) if V > 1 else H,
        METRIC=metric, K=k, KP=triton.next_power_of_2(k), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        PRECISION="ieee" if (embeds.dtype in (torch.float32, torch.float64) or upcast) else None, UPCAST=upcast,
        num_warps=warps,
    )  # fmt: skip
    return ids, scores
