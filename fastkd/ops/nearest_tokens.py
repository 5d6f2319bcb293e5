"""``fastkd.nearest_tokens``: top-k vocabulary entries for each embedding, streaming over the vocabulary.

Decodes pseudo embeddings into text and snaps adversarial embeddings to real tokens, without the
``[N, V]`` score matrix that ``embeds @ embedding_matrix.T`` followed by ``topk`` materialises
(1 GB in float32 for 8192 tokens against BERT's 30522-entry vocabulary).

Layers (one file each): ``kernels/nearest_tokens.py`` (Triton: one fused kernel, GEMM tiles with a
running top-k in registers), ``csrc/nearest_tokens.cpp`` (C++ CPU: an exact int8 GEMM with a proven
error bound selects a few candidates per row, which are then scored exactly; float GEMM tiles with a
vectorised running top-k for the other cases), ``csrc/nearest_tokens_cuda.cu`` (CUDA: cuBLAS tiles and a
top-k merge kernel), and this module: the pure-PyTorch reference, input validation,
``torch.library`` registration and backend dispatch.

Op schema::

    nearest_tokens(Tensor embeds, Tensor embedding_matrix, int k, int metric) -> (Tensor ids, Tensor scores)

on ``[N, H]`` embeddings and a ``[V, H]`` matrix of the same dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastkd.backends import Op
from fastkd.ops._common import acc_dtype, lazy_triton_op, register_compiled

METRICS: dict[str, int] = {"cosine": 0, "dot": 1, "l2": 2}
EPS = 1e-8  # norms below this count as EPS in the cosine similarity (a zero vector scores 0)
# The CUDA and Triton kernels keep the running top-k in registers / local memory: up to this k.
MAX_K_FUSED = 128

# On a GPU the Triton kernel goes first: measured on an H200 (bfloat16, 2026-12-04,
# benchmarks/results/nvidia-h200/) it ran 2.52 ms / 11.5 ms at 8192x30522x384 / 65536x30522x768, the
# CUDA kernel 5.67 ms / 71.2 ms (eager 3.05 / 27.5 ms): the CUDA kernel does not use the tensor cores.
OP = Op("nearest_tokens", auto_order={"cuda": ("triton", "cuda", "torch")})


# --------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the fallback backend and the test oracle.
# --------------------------------------------------------------------------------------------
def reference_nearest_tokens(
    embeds: Tensor, embedding_matrix: Tensor, k: int = 1, metric: str = "cosine"
) -> tuple[Tensor, Tensor]:
    """Top-k through the full ``[N, V]`` score matrix and a stable sort (same contract as
    :func:`nearest_tokens`, no validation). Memory O(N V): this is the oracle, not the fast path."""
    with torch.no_grad():
        H = embeds.shape[-1]
        lead = embeds.shape[:-1]
        acc = torch.float64 if torch.float64 in (embeds.dtype, embedding_matrix.dtype) else torch.float32
        e = embeds.reshape(-1, H).to(acc)
        w = embedding_matrix.to(acc)
        if metric == "cosine":
            en = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(EPS)
            wn = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(EPS)
            s = en @ wn.T
            key = s
        elif metric == "dot":
            s = e @ w.T
            key = s
        else:
            s = torch.cdist(e, w, compute_mode="donot_use_mm_for_euclid_dist")
            key = -s
        key = torch.where(key.isnan(), float("-inf"), key)
        ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
        scores = s.gather(1, ids)
    return ids.reshape(*lead, k), scores.reshape(*lead, k)


# --------------------------------------------------------------------------------------------
# Validation: clear errors that name the argument.
# --------------------------------------------------------------------------------------------
def _check_inputs(embeds: Tensor, embedding_matrix: Tensor, k: int, metric: str) -> None:
    if not isinstance(embeds, Tensor):
        raise TypeError(f"embeds must be a torch.Tensor, got {type(embeds).__name__}")
    if not embeds.is_floating_point():
        raise TypeError(
            f"embeds must be a floating-point tensor (float32, bfloat16, float16, float64), got {embeds.dtype}"
        )
    if embeds.dim() < 1:
        raise ValueError("embeds must have shape [..., H] with at least one dimension, got a 0-d tensor")
    if embeds.shape[-1] == 0:
        raise ValueError(f"embeds must have a non-empty last dimension H, got shape {tuple(embeds.shape)}")
    if not isinstance(embedding_matrix, Tensor):
        raise TypeError(f"embedding_matrix must be a torch.Tensor, got {type(embedding_matrix).__name__}")
    if not embedding_matrix.is_floating_point():
        raise TypeError(f"embedding_matrix must be a floating-point tensor, got {embedding_matrix.dtype}")
    if embedding_matrix.dim() != 2:
        raise ValueError(f"embedding_matrix must have shape [V, H], got {tuple(embedding_matrix.shape)}")
    if embedding_matrix.shape[1] != embeds.shape[-1]:
        raise ValueError(
            f"embedding_matrix must be [V, H] with H = {embeds.shape[-1]} (embeds' last dimension), got "
            f"{tuple(embedding_matrix.shape)}"
        )
    if embedding_matrix.device != embeds.device:
        raise ValueError(f"embedding_matrix must be on embeds' device {embeds.device}, got {embedding_matrix.device}")
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    V = embedding_matrix.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > V:
        raise ValueError(f"k must be at most the vocabulary size V = {V} (embedding_matrix rows), got {k}")


# --------------------------------------------------------------------------------------------
# Registration of the fused ops: fake tensors (torch.compile). No autograd: ids are integers and
# the scores are returned without a gradient (nearest_tokens runs under no_grad).
# --------------------------------------------------------------------------------------------
def _fake(embeds, embedding_matrix, k, metric):
    N = embeds.shape[0]
    return embeds.new_empty((N, k), dtype=torch.int64), embeds.new_empty((N, k), dtype=acc_dtype(embeds.dtype))


register_compiled("nearest_tokens", _fake)


def _define_triton_op():
    """The Triton custom op (through :data:`_triton_op`, on first use: importing triton is not free)."""
    from fastkd.kernels import nearest_tokens as tk

    @torch.library.custom_op("fastkd::nearest_tokens_triton", mutates_args=())
    def nearest_tokens_triton(embeds: Tensor, embedding_matrix: Tensor, k: int, metric: int) -> tuple[Tensor, Tensor]:
        return tk.nearest_tokens(embeds, embedding_matrix, k, metric)

    return nearest_tokens_triton


_triton_op = lazy_triton_op(_define_triton_op, _fake)


# --------------------------------------------------------------------------------------------
# Backends and the public function. Backend arguments: (e2 [N, H], matrix [V, H] of e2's dtype,
# k, metric name); they return (ids [N, k], scores [N, k]).
# --------------------------------------------------------------------------------------------
@OP.register("torch")
def _torch_impl(e2, matrix, k, metric):
    return reference_nearest_tokens(e2, matrix, k, metric)


@OP.register("cpu")
def _cpu_impl(e2, matrix, k, metric):
    return torch.ops.fastkd.nearest_tokens(e2, matrix, k, METRICS[metric])


def _fused_supports(e2, matrix, k, metric) -> str | None:
    """The CUDA and Triton kernels keep the running top-k in registers: k <= MAX_K_FUSED."""
    if k > MAX_K_FUSED:
        return f"k = {k} is more than the {MAX_K_FUSED} its running top-k holds (the cpu and torch backends take any k)"
    return None


@OP.register("cuda", supports=_fused_supports)
def _cuda_impl(e2, matrix, k, metric):
    return torch.ops.fastkd.nearest_tokens(e2, matrix, k, METRICS[metric])


@OP.register("triton", prepare=_triton_op, supports=_fused_supports)  # defines the custom op outside traced code
def _triton_impl(e2, matrix, k, metric):
    return _triton_op()(e2, matrix, k, METRICS[metric])


def nearest_tokens(
    embeds: Tensor,
    embedding_matrix: Tensor,
    k: int = 1,
    metric: str = "cosine",
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` vocabulary entries nearest to each embedding, without the ``[N, V]`` score matrix.

    Args:
        embeds: ``[..., H]`` float32 / bfloat16 / float16 / float64 (any strides).
        embedding_matrix: ``[V, H]`` (e.g. ``model.get_input_embeddings().weight``); cast to the
            promoted dtype of the two when they differ.
        k: how many entries per embedding, ``1 <= k <= V``.
        metric: ``"cosine"`` (``e.w / (max(|e|, 1e-8) max(|w|, 1e-8))``, largest first),
            ``"dot"`` (``e.w``, largest first) or ``"l2"`` (Euclidean distance ``|e - w|``,
            smallest first).
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (automatic; also
            ``FASTKD_BACKEND``).

    Returns:
        ``(ids, scores)``: ``ids`` int64 ``[..., k]``, ``scores`` ``[..., k]`` in float32 (float64
        for float64 inputs), best first. bfloat16 / float16 inputs are scored in float32.

    Ties are broken deterministically: equal scores are ordered by increasing vocabulary id, so
    duplicated vocabulary rows always return the lowest id first (what a stable sort of the full
    score row gives). A NaN score ranks last (after -inf) and is reported as NaN. The scores carry
    no gradient.

    Memory: the ``[N, V]`` score matrix is never formed. CPU: O(N k) for the results, one score tile
    per thread, and (on its int8 path) int8 copies of the inputs, ``(N + V) H`` bytes, plus
    a few dozen candidates per row; Triton: the outputs only; CUDA: the outputs, a float32 copy of
    16-bit embeddings and one score tile of at most 2**24 entries. The ``cuda`` and ``triton``
    backends keep the running top-k in registers, for ``k <= 128``: the automatic choice runs a
    larger ``k`` on the next backend (the reference on a GPU); naming one of them for it raises
    :class:`fastkd.BackendUnavailableError`.

    On CPUs with VNNI (AVX512-VNNI or AVX-VNNI) the CPU kernel's default path (N >= 32, V >= 512,
    k <= 48, finite inputs) bounds every score with an exact int8 GEMM of quantised rows and a proven
    error bound, and scores exactly only the columns that can still reach the top-k: the same answer
    as scoring everything, about 4x faster than float32 GEMM tiles. Without VNNI torch's int8 GEMM is
    a slow reference loop, so the float path runs; ``FASTKD_NEAREST_INT8=0|1`` forces either path.
    """
    _check_inputs(embeds, embedding_matrix, k, metric)
    dtype = torch.promote_types(embeds.dtype, embedding_matrix.dtype)
    H = embeds.shape[-1]
    lead = tuple(embeds.shape[:-1])
    e2 = embeds.reshape(-1, H)
    if e2.dtype != dtype:
        e2 = e2.to(dtype)
    matrix = embedding_matrix if embedding_matrix.dtype == dtype else embedding_matrix.to(dtype)
    args = (e2, matrix, k, metric)
    name = OP.pick(embeds.device, backend, args)
    with torch.no_grad():
        ids, scores = OP(name, *args)
    return ids.reshape(*lead, k), scores.reshape(*lead, k)
