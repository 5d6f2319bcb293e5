"""fastkd.nearest_tokens: every backend against the top-k of the full score matrix (a stable sort, so
ties go to the lowest id), dtypes, shapes, ties, NaN, memory, opcheck, torch.compile and bad input."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd.ops.nearest_tokens import OP, reference_nearest_tokens
from tests.conftest import DEVICE, backend_params, op_devices

BACKENDS = backend_params(OP)
METRICS = ["cosine", "dot", "l2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vocab_size(backend: str, big: int) -> int:
    # the Triton interpreter is slow: a smaller vocabulary (still several tiles) for it
    return 300 if backend == "triton" and DEVICE == "cpu" else big


def _data(N, V, H, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (0.5 + torch.rand(V, 1, generator=g, dtype=torch.float64))
    return e.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)


def _check_against_reference(ids, scores, e, w, k, metric, atol):
    """ids must be a valid top-k: the reference scores at our ids equal the reference top-k scores,
    and our scores equal the reference scores at our ids."""
    rids, rsc = reference_nearest_tokens(e, w, k, metric)
    H = e.shape[-1]
    e2 = e.reshape(-1, H).double()
    w2 = w.double()
    if metric == "cosine":
        s = torch.nn.functional.normalize(e2, dim=-1, eps=1e-8) @ torch.nn.functional.normalize(w2, dim=-1, eps=1e-8).T
    elif metric == "dot":
        s = e2 @ w2.T
    else:
        s = torch.cdist(e2, w2, compute_mode="donot_use_mm_for_euclid_dist")
    at_ours = s.gather(1, ids.reshape(-1, k))
    torch.testing.assert_close(at_ours, rsc.reshape(-1, k).double(), atol=atol, rtol=0)
    torch.testing.assert_close(scores.reshape(-1, k).double(), at_ours, atol=atol, rtol=0)
    assert ids.dtype == torch.int64 and ids.shape == rids.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("shape", "k"), [((1, 19), 1), ((37, 19), 5), ((2, 3, 64), 3), ((5, 8), 40)], ids=str)
def test_matches_full_topk_float64(backend, metric, shape, k):
    V = _vocab_size(backend, 2500)
    N = 1
    for s in shape[:-1]:
        N *= s
    e, w = _data(N, V, shape[-1], seed=N + k)
    e = e.reshape(shape)
    ids, scores = fastkd.nearest_tokens(e, w, k=k, metric=metric, backend=backend)
    rids, rsc = reference_nearest_tokens(e, w, k, metric)
    assert ids.shape == (*shape[:-1], k) and scores.shape == (*shape[:-1], k)
    assert scores.dtype == torch.float64
    assert torch.equal(ids, rids)
    torch.testing.assert_close(scores, rsc, atol=1e-12, rtol=1e-12)
    # best first
    d = scores[..., 1:] - scores[..., :-1]
    assert (d >= 0).all() if metric == "l2" else (d <= 0).all()


DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("dtype", "atol"), DTYPES, ids=[str(d[0]).split(".")[-1] for d in DTYPES])
def test_low_precision(backend, metric, dtype, atol):
    # 16-bit inputs are scored in float32, so the answer is the float64 top-k of the rounded inputs
    V = _vocab_size(backend, 3000)
    e, w = _data(29, V, 48, dtype=dtype, seed=3)
    ids, scores = fastkd.nearest_tokens(e, w, k=4, metric=metric, backend=backend)
    assert scores.dtype == torch.float32
    scale = 48.0 if metric != "cosine" else 1.0  # dot products of 48 terms of size ~1
    _check_against_reference(ids, scores, e.double(), w.double(), 4, metric, atol=atol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_lowest_id_first(backend, metric, dtype):
    # Duplicated vocabulary rows, at the start, the middle and the very end (the last, partial
    # tile), score identically: the lowest id comes first, as a stable sort of the full row gives.
    V = _vocab_size(backend, 2100)
    g = torch.Generator().manual_seed(11)
    w = torch.randint(-3, 4, (V, 12), generator=g).to(dtype)
    e = torch.randint(-3, 4, (40, 12), generator=g).to(dtype)
    dup = [5, V // 2, V - 1]
    for j in dup:
        w[j] = w[2]
    e[:10] = w[2]  # these rows tie between ids 2, 5, V/2, V-1
    e[10:20] = 2 * w[2]
    e, w = e.to(DEVICE), w.to(DEVICE)
    k = 6
    ids, scores = fastkd.nearest_tokens(e, w, k=k, metric=metric, backend=backend)
    rids, _ = reference_nearest_tokens(e, w, k, metric)
    if metric == "cosine":
        # cosines of distinct integer vectors round differently in each computation; the
        # duplicates tie exactly everywhere
        assert torch.equal(ids[:20], rids[:20])
        _check_against_reference(ids, scores, e, w, k, metric, atol=1e-6)
    else:
        # dot products and squared distances of small integers are exact: every tie (there are
        # many between distinct vectors too) must go to the lower id
        assert torch.equal(ids, rids)
    if metric != "dot":
        assert ids[:10, :4].tolist() == [[2, 5, V // 2, V - 1]] * 10
    # deterministic: the same answer again
    ids2, _ = fastkd.nearest_tokens(e, w, k=k, metric=metric, backend=backend)
    assert torch.equal(ids, ids2)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id in ("cuda", "triton")])
def test_named_fused_backend_refuses_k_above_its_limit(backend):
    # The cuda and Triton kernels hold at most MAX_K_FUSED entries per row: named for a larger k
    # they say so (they used to run the reference quietly); the automatic choice takes the next one.
    from fastkd.ops.nearest_tokens import MAX_K_FUSED

    k = MAX_K_FUSED + 1
    e, w = _data(3, k + 7, 6, seed=5)
    with pytest.raises(fastkd.BackendUnavailableError, match=rf"backend '{backend}' cannot run these inputs: k = {k}"):
        fastkd.nearest_tokens(e, w, k=k, backend=backend)
    ids, _ = fastkd.nearest_tokens(e, w, k=MAX_K_FUSED, backend=backend)  # at the limit: runs
    assert torch.equal(ids, reference_nearest_tokens(e, w, MAX_K_FUSED, "cosine")[0])
    ids, _ = fastkd.nearest_tokens(e, w, k=k)  # automatic: another backend
    assert torch.equal(ids, reference_nearest_tokens(e, w, k, "cosine")[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equals_vocabulary_is_a_full_sort(backend):
    e, w = _data(6, 50, 10, seed=4)
    ids, scores = fastkd.nearest_tokens(e, w, k=50, metric="dot", backend=backend)
    rids, rsc = reference_nearest_tokens(e, w, 50, "dot")
    assert torch.equal(ids, rids)
    assert torch.equal(ids.sort(-1).values, torch.arange(50, device=DEVICE).expand(6, 50))
    torch.testing.assert_close(scores, rsc, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_nan_ranks_last(backend, metric):
    e, w = _data(4, 40, 8, seed=5)
    e[1, 3] = float("nan")  # every score of row 1 is NaN: ids 0..k-1, scores NaN
    w[7, 0] = float("nan")  # vocabulary entry 7 is never chosen while real scores remain
    ids, scores = fastkd.nearest_tokens(e, w, k=3, metric=metric, backend=backend)
    rids, _ = reference_nearest_tokens(e, w, 3, metric)
    assert torch.equal(ids, rids)
    assert ids[1].tolist() == [0, 1, 2] and torch.isnan(scores[1]).all()
    assert (ids[[0, 2, 3]] != 7).all() and torch.isfinite(scores[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vectors_cosine(backend):
    e, w = _data(3, 20, 8, seed=6)
    e[0] = 0.0
    w[4] = 0.0
    ids, scores = fastkd.nearest_tokens(e, w, k=20, metric="cosine", backend=backend)
    rids, rsc = reference_nearest_tokens(e, w, 20, "cosine")
    assert torch.equal(ids, rids)
    assert (scores[0] == 0).all() and ids[0].tolist() == list(range(20))  # all tie at 0
    torch.testing.assert_close(scores, rsc, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_mixed_dtype_inputs(backend):
    e, w = _data(8, 64, 20, seed=7)
    e_view = torch.stack([e, e], dim=-1)[..., 0]  # non-contiguous, same values
    w_view = w.T.contiguous().T  # column-major
    ids, scores = fastkd.nearest_tokens(e_view, w_view.float(), k=3, backend=backend)  # float64 x float32
    rids, rsc = reference_nearest_tokens(e, w.float().double(), 3, "cosine")
    assert torch.equal(ids, rids) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, rsc, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    e, w = _data(1, 10, 4)
    ids, scores = fastkd.nearest_tokens(e[:0].reshape(0, 3, 4), w, k=2, backend=backend)
    assert ids.shape == (0, 3, 2) and scores.shape == (0, 3, 2)


def test_snap_perturbed_embeddings_back_to_their_tokens():
    # the use case: adversarial embeddings near real tokens decode to those tokens
    torch.manual_seed(0)
    w = torch.randn(1000, 32, device=DEVICE)
    tokens = torch.randint(0, 1000, (4, 16), device=DEVICE)
    x = w[tokens] + 0.01 * torch.randn(4, 16, 32, device=DEVICE)
    for metric in ("cosine", "l2"):
        ids, _ = fastkd.nearest_tokens(x, w, metric=metric)
        assert torch.equal(ids[..., 0], tokens), metric


# ---------------------------------------------------------------------------------------------
# The CPU kernel's int8 path (N >= 32, V >= 512, k <= 48): candidates from an int8 GEMM with a
# proven error bound, then exact scores. Hard inputs for the bound and for the candidate lists.
# ---------------------------------------------------------------------------------------------
def _cpu_only():
    if DEVICE != "cpu" or not hasattr(torch.ops.fastkd, "nearest_tokens"):
        pytest.skip("the CPU kernel")


@pytest.fixture
def int8_path(monkeypatch):
    """Force the int8 path (by default only CPUs with VNNI take it: elsewhere torch's int8 GEMM is slow)."""
    monkeypatch.setenv("FASTKD_NEAREST_INT8", "1")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("N", "V", "H", "k"), [(32, 512, 8, 1), (300, 5000, 97, 7), (64, 1500, 384, 48)], ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "spiky", "near-duplicates"])
def test_cpu_int8_path_exact(int8_path, metric, N, V, H, k, kind):
    _cpu_only()
    g = torch.Generator().manual_seed(N + V + k)
    e = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (
        0.2 + 2 * torch.rand(V, 1, generator=g, dtype=torch.float64)
    )
    if kind == "spiky":
        # one huge coordinate per row: coarse int8 steps for every other coordinate
        e[torch.arange(N), torch.randint(0, H, (N,), generator=g)] = 300.0
        w[torch.arange(V), torch.randint(0, H, (V,), generator=g)] = -200.0
    elif kind == "near-duplicates":
        # many vocabulary rows within 1e-6 of each other and of the embeddings
        base = torch.randn(H, generator=g, dtype=torch.float64)
        w[: V // 2] = base + 1e-6 * torch.randn(V // 2, H, generator=g, dtype=torch.float64)
        e[: N // 2] = base + 1e-6 * torch.randn(N // 2, H, generator=g, dtype=torch.float64)
    ids, scores = fastkd.nearest_tokens(e, w, k=k, metric=metric, backend="cpu")
    rids, rsc = reference_nearest_tokens(e, w, k, metric)
    if kind == "near-duplicates" and metric == "cosine":
        # cosines within 1e-16 of each other: the order is decided by rounding, in both
        _check_against_reference(ids, scores, e, w, k, metric, atol=1e-12)
    else:
        assert torch.equal(ids, rids)
        torch.testing.assert_close(scores, rsc, atol=1e-9, rtol=1e-12)
    # float32: a valid top-k of the float64 scores of the rounded inputs
    ids32, sc32 = fastkd.nearest_tokens(e.float(), w.float(), k=k, metric=metric, backend="cpu")
    scale = 1.0 if metric == "cosine" else float(w.abs().max() * e.abs().max() * H)
    _check_against_reference(ids32, sc32, e.float().double(), w.float().double(), k, metric, atol=1e-5 * scale)


@pytest.mark.parametrize("metric", METRICS)
def test_cpu_int8_path_hands_back_rows_with_thousands_of_ties(int8_path, metric):
    # 3000 identical vocabulary rows and zero embeddings: far too many candidates to keep, so those
    # rows go to the float path; the answer is still the lowest ids first.
    _cpu_only()
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-3, 4, (12000, 16), generator=g).float()
    w[1000:4000] = w[999]
    e = torch.randint(-3, 4, (64, 16), generator=g).float()
    e[:8] = w[999]
    e[8:12] = 0.0
    ids, scores = fastkd.nearest_tokens(e, w, k=5, metric=metric, backend="cpu")
    rids, _ = reference_nearest_tokens(e, w, 5, metric)
    if metric == "cosine":
        assert torch.equal(ids[:12], rids[:12])
        _check_against_reference(ids, scores, e, w, 5, metric, atol=1e-6)
    else:
        assert torch.equal(ids, rids)
    if metric != "dot":
        assert ids[:8].tolist() == [[999, 1000, 1001, 1002, 1003]] * 8
    if metric == "cosine":
        assert ids[8:12].tolist() == [[0, 1, 2, 3, 4]] * 4 and (scores[8:12] == 0).all()


@pytest.mark.skipif(DEVICE != "cpu" or not os.path.exists("/proc/self/clear_refs"), reason="Linux CPU memory check")
def test_cpu_memory_is_not_n_by_v():
    # Peak resident memory of one call, measured in a fresh process (VmHWM after resetting it),
    # against the [N, V] float32 score matrix that matmul + topk needs.
    code = r"""
import re, torch, fastkd
torch.set_num_threads(2)
def st(k):
    return int(re.search(k + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
e = torch.randn(4096, 64); w = torch.randn(30522, 64)
fastkd.nearest_tokens(e[:8], w, k=5)  # warm up (library loading, thread pools)
open("/proc/self/clear_refs", "w").write("5")
base = st("VmRSS")
fastkd.nearest_tokens(e, w, k=5, backend="cpu")
print(st("VmHWM") - base)
"""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.strip().splitlines()[-1])
    full = 4096 * 30522 * 4
    assert peak < full / 10, (peak, full)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(torch.ops.fastkd, "nearest_tokens"), reason="fastkd._C not built")
def test_opcheck_compiled():
    e, w = _data(5, 70, 12, dtype=torch.float32)
    for metric in range(3):
        torch.library.opcheck(torch.ops.fastkd.nearest_tokens.default, (e, w, 3, metric))


def test_opcheck_triton():
    pytest.importorskip("triton")
    if "triton" not in [p.values[0] for p in BACKENDS if not p.marks]:
        pytest.skip("triton backend unavailable")
    from fastkd.ops.nearest_tokens import _triton_op

    e, w = _data(5, 70, 12, dtype=torch.float32)
    torch.library.opcheck(_triton_op(), (e, w, 2, 0))


@pytest.mark.parametrize("backend", ["cpu", "torch"] if DEVICE == "cpu" else ["cuda", "triton", "torch"])
def test_torch_compile_fullgraph(backend):
    if backend == "cpu" and not hasattr(torch.ops.fastkd, "nearest_tokens"):
        pytest.skip("fastkd._C not built")

    def decode(x, w):
        ids, scores = fastkd.nearest_tokens(x * 2.0, w, k=2, metric="l2", backend=backend)
        return ids + 1, scores

    e, w = _data(6, 90, 16)
    got_ids, got_sc = torch.compile(decode, fullgraph=True, backend="aot_eager")(e, w)
    rids, rsc = reference_nearest_tokens(e * 2.0, w, 2, "l2")
    assert torch.equal(got_ids, rids + 1)
    torch.testing.assert_close(got_sc, rsc, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("e", "w", "kw", "exc", "match"),
    [
        ((4, 8), (10, 7), {}, ValueError, "embedding_matrix must be"),
        ((4, 8), (10, 8, 1), {}, ValueError, r"embedding_matrix must have shape \[V, H\]"),
        ((4, 8), (10, 8), {"k": 11}, ValueError, "k must be at most the vocabulary size V = 10"),
        ((4, 8), (10, 8), {"k": 0}, ValueError, "k must be >= 1"),
        ((4, 8), (10, 8), {"k": 2.0}, TypeError, "k must be an int"),
        ((4, 8), (10, 8), {"metric": "euclid"}, ValueError, "metric must be one of"),
        ((4, 8), (10, 8), {"backend": "tpu"}, ValueError, "backend must be one of"),
        ((), (10, 8), {}, ValueError, "embeds must have shape"),
        ((4, 0), (10, 0), {}, ValueError, "embeds must have a non-empty last dimension H"),
    ],
)
def test_bad_input(e, w, kw, exc, match):
    with pytest.raises(exc, match=match):
        fastkd.nearest_tokens(torch.randn(e), torch.randn(w), **kw)


def test_bad_dtypes():
    with pytest.raises(TypeError, match="embeds must be a floating-point tensor"):
        fastkd.nearest_tokens(torch.ones(3, 4, dtype=torch.long), torch.randn(5, 4))
    with pytest.raises(TypeError, match="embedding_matrix must be a floating-point tensor"):
        fastkd.nearest_tokens(torch.randn(3, 4), torch.ones(5, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"embedding_matrix must be a torch\.Tensor"):
        fastkd.nearest_tokens(torch.randn(3, 4), [[1.0] * 4])


@pytest.mark.skipif(not hasattr(torch.ops.fastkd, "nearest_tokens"), reason="fastkd._C not built")
@pytest.mark.parametrize("device", op_devices())
def test_direct_op_call_errors_name_the_argument(device):
    op = torch.ops.fastkd.nearest_tokens
    r = functools.partial(torch.randn, device=device)
    with pytest.raises(RuntimeError, match="k must be in"):
        op(r(3, 4), r(5, 4), 6, 0)
    with pytest.raises(RuntimeError, match="embedding_matrix must be"):
        op(r(3, 4), r(5, 3), 1, 0)
    with pytest.raises(RuntimeError, match="metric code must be"):
        op(r(3, 4), r(5, 4), 1, 5)
    with pytest.raises(RuntimeError, match="embedding_matrix must have the dtype of embeds"):
        op(r(3, 4), r(5, 4, dtype=torch.float64), 1, 0)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels, run on the host by the emulation of tests/cuda_emu/ (tests/emu_embed.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_cuda_kernels_emulated(metric, k, dtype):
    from tests import emu_embed

    # integer data: exact scores, so the many ties (duplicated rows at the start, the middle and in the
    # last, padded tile; equal distances between distinct rows) must all go to the lower id
    g = torch.Generator().manual_seed(k)
    w = torch.randint(-3, 4, (300, 12), generator=g).to(dtype)
    e = torch.randint(-3, 4, (9, 12), generator=g).to(dtype)
    for j in (5, 150, 299):
        w[j] = w[2]
    e[0] = w[2]
    e[1] = 0.0
    ids, scores = emu_embed.nearest_tokens(e, w, k, metric)
    rids, rsc = reference_nearest_tokens(e, w, k, metric)
    if metric == "cosine":
        assert torch.equal(ids[:2], rids[:2])
        _check_against_reference(ids, scores, e.double(), w.double(), k, metric, atol=1e-6)
    else:
        assert torch.equal(ids, rids)
        torch.testing.assert_close(scores, rsc, atol=1e-5, rtol=1e-6)
    if metric != "dot":
        assert ids[0, : min(k, 4)].tolist() == [2, 5, 150, 299][: min(k, 4)]


def test_cuda_kernels_emulated_nan():
    from tests import emu_embed

    e, w = (x.cpu() for x in _data(4, 200, 8, seed=9))  # the emulation runs on the host
    e[1, 3] = float("nan")
    w[7, 0] = float("nan")
    for metric in METRICS:
        ids, scores = emu_embed.nearest_tokens(e, w, 3, metric)
        rids, _ = reference_nearest_tokens(e, w, 3, metric)
        assert torch.equal(ids, rids), metric
        assert ids[1].tolist() == [0, 1, 2] and torch.isnan(scores[1]).all()


def test_int8_switch_same_answer_and_bad_value(monkeypatch):
    """FASTKD_NEAREST_INT8: 0 (float path), 1 (int8 path) and auto give the same ids; a bad value is
    an error naming the variable."""
    _cpu_only()
    g = torch.Generator().manual_seed(5)
    e, w = torch.randn(64, 24, generator=g), torch.randn(2000, 24, generator=g)
    got = {}
    for mode in ("0", "1", "auto"):
        monkeypatch.setenv("FASTKD_NEAREST_INT8", mode)
        got[mode] = fastkd.nearest_tokens(e, w, k=4, metric="cosine", backend="cpu")[0]
    assert torch.equal(got["0"], got["1"]) and torch.equal(got["0"], got["auto"])
    monkeypatch.setenv("FASTKD_NEAREST_INT8", "yes")
    with pytest.raises(RuntimeError, match="FASTKD_NEAREST_INT8 must be auto, 0 or 1"):
        fastkd.nearest_tokens(e, w, k=4, metric="cosine", backend="cpu")
