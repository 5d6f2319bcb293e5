"""The CUDA kernels of embedding_ascent_ and nearest_tokens, run on the host by the CUDA emulation of
tests/cuda_emu/ (tests/cuda_emu/emu_embed.cpp, built by tests/cuda_emu/__init__.py): machines without a GPU test the
kernels' logic (block reductions, masks, the multi-tensor row search, the per-thread top-k lists and
their block-wide merge, ties, NaN). The host code of csrc/*.cu is mirrored in Python below; on a GPU
the cuda backend runs the real thing in every other test."""

from __future__ import annotations

import ctypes
import functools

import torch

from tests import cuda_emu

DTYPE_CODE = cuda_emu.DTYPE_CODE
NO_ID = 2**63 - 1


@functools.cache
def lib():
    so = cuda_emu.load("emu_embed.cpp")
    vp, pp, i64, i64p, f64, i32 = (
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
        ctypes.c_double, ctypes.c_int,
    )  # fmt: skip
    so.fastkd_emu_embedding_ascent.restype = i32
    so.fastkd_emu_embedding_ascent.argtypes = [
        i32, i32, i32, pp, pp, pp, pp, pp, i64p, i64p, i64p, f64, i32, i32, f64, i32, f64, i32, f64, i32,
    ]  # fmt: skip
    so.fastkd_emu_nearest_merge.restype = None
    so.fastkd_emu_nearest_merge.argtypes = [i32, vp, i64, i64, i64, i64, vp, i32, vp, vp, vp, i64]
    so.fastkd_emu_nearest_finalize.restype = None
    so.fastkd_emu_nearest_finalize.argtypes = [i32, vp, vp, i64, i64, vp, vp, vp, i64, i32]
    return so


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The kernel's view of an operand: rows with unit column stride (a copy when needed)."""
    from fastkd.kernels.embedding_ascent import as_rows

    x, stride, _ = as_rows(t, False)
    return x, stride


def embedding_ascent_(embeds, grads, *, origins=None, masks=None, bufs=None, step_size, norm, radius=None,
                      max_norm=None, momentum=0.0, maximize=True) -> int:  # fmt: skip
    """One emulated launch of ascent_kernel over a list of tensors (<= 16, each contiguous enough to be
    addressed as rows in place); returns the block size used."""
    from fastkd.ops.embedding_ascent import NORMS

    n = len(embeds)
    keep: list[torch.Tensor] = []
    ptrs = {k: (ctypes.c_void_p * n)() for k in "egomb"}
    strides = (ctypes.c_int64 * (4 * n))()
    rows = (ctypes.c_int64 * n)()
    hs = (ctypes.c_int64 * n)()
    for i, e in enumerate(embeds):
        H = e.shape[-1]
        ops = [("e", e), ("g", grads[i]), ("o", origins[i] if origins else None), ("b", bufs[i] if bufs else None)]
        for j, (name, t) in enumerate(ops):
            if t is None:
                continue
            x, st = _rows(t)
            assert name not in "eb" or x.data_ptr() == t.data_ptr(), "mutated operands must be addressable in place"
            keep.append(x)
            ptrs[name][i] = x.data_ptr()
            strides[4 * i + j] = st
        if masks and masks[i] is not None:
            mk = masks[i].reshape(-1).contiguous()
            keep.append(mk)
            ptrs["m"][i] = mk.data_ptr()
        rows[i] = e.numel() // H
        hs[i] = H
    buf_same = int(not bufs or bufs[0].dtype == embeds[0].dtype)
    return lib().fastkd_emu_embedding_ascent(
        DTYPE_CODE[embeds[0].dtype], buf_same, n, ptrs["e"], ptrs["g"], ptrs["o"], ptrs["m"], ptrs["b"], strides,
        rows, hs, float(step_size), NORMS[norm], int(radius is not None), float(radius or 0.0),
        int(max_norm is not None), float(max_norm or 0.0), int(bufs is not None), float(momentum), int(maximize),
    )  # fmt: skip


def nearest_tokens(e: torch.Tensor, w: torch.Tensor, k: int, metric: str, tile_v: int = 64, max_tile: int = 256):
    """csrc/nearest_tokens_cuda.cu's host loop in Python (tiles, padding, GEMMs with torch) around the
    emulated merge_kernel and finalize_kernel. Smaller tiles than on the GPU, so that a small
    vocabulary spans several tiles."""
    from fastkd.ops.nearest_tokens import EPS, METRICS

    m = METRICS[metric]
    N, H = e.shape
    V = w.shape[0]
    acc = torch.float64 if e.dtype == torch.float64 else torch.float32
    E = e.to(acc).contiguous()
    W = w.contiguous()
    colterm = None
    if metric != "dot":
        colterm = W.to(acc).square().sum(1)
        if metric == "cosine":
            colterm = colterm.sqrt().clamp_min(EPS).reciprocal()
        colterm = colterm.contiguous()
    bv = torch.full((N, k), float("-inf"), dtype=acc)
    braw = torch.zeros((N, k), dtype=acc)
    bi = torch.full((N, k), NO_ID, dtype=torch.int64)
    ldv = min(V, tile_v)
    tile_n = max(2, min(N, max_tile // ldv))
    so = lib()
    for c0 in range(0, V, ldv):
        cn = min(ldv, V - c0)
        wt = W[c0 : c0 + cn].to(acc)
        if cn < ldv:
            wt = torch.cat([wt, wt.new_zeros(ldv - cn, H)])
        for r0 in range(0, N, tile_n):
            rn = min(tile_n, N - r0)
            et = E[r0 : r0 + rn]
            if rn < 2:
                et = torch.cat([et, et.new_zeros(2 - rn, H)])
            S = (et @ wt.T).contiguous()
            so.fastkd_emu_nearest_merge(
                int(acc == torch.float64), S.data_ptr(), ldv, rn, cn, c0,
                None if colterm is None else colterm.data_ptr(), m,
                bv[r0:].data_ptr(), braw[r0:].data_ptr(), bi[r0:].data_ptr(), k,
            )  # fmt: skip
    scores = torch.empty((N, k), dtype=acc)
    so.fastkd_emu_nearest_finalize(
        DTYPE_CODE[W.dtype], E.data_ptr(), W.data_ptr(), N, H, braw.data_ptr(), bi.data_ptr(), scores.data_ptr(), k, m
    )
    return bi, scores
