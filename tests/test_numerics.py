"""Kernel numerics: fastkd's fast exp / log, the shifted form of the fused distillation loss at large
logit offsets, the NaN contract of an all -inf row, and the int32-overflow guards (issues 14 and 15).

* ``_fast_exp`` / ``_fast_log`` (csrc/fast_math.h) at every CPU instruction-set level the host
  supports, against float64 over their whole float32 range, in ulp; ``_fast_exp_nonpos`` (the
  kernels' exp of shifted logits) bit for bit against ``_fast_exp`` on x <= 0.
* ``distill_loss`` at logit offsets up to 1e6 (T = 1) and at +-1e30, every divergence, the loss
  and both gradients, on the C++ CPU kernel (every level), the Triton kernel (interpreter) and the
  CUDA kernel (host emulation of tests/cuda_emu), against the float64 reference: relative error
  <= 1e-5, and JSD <= ln 2.
* A kept row of all -inf has an undefined softmax: NaN loss and NaN gradients on every fused backend.
* The Triton hidden_match kernel's tile offsets stay exact past 2**31; the C++ nearest_tokens int8
  path is not used where its int32 accumulator could overflow.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import backend_params

import fastkd
from fastkd import _ext
from fastkd.ops.distill_loss import OP as DL_OP

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

LEVELS = ["default", "avx2", "avx512"]
HAVE_C = _ext.available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _level_params():
    if not HAVE_C:
        return [pytest.param(lv, marks=pytest.mark.skip(reason=_ext.unavailable_reason()), id=lv) for lv in LEVELS]
    lib = _ext.library()
    if not hasattr(lib, "cpu_built_capabilities"):
        reason = "fastkd._C predates run-time dispatch: rebuild it"
        return [pytest.param(lv, marks=pytest.mark.skip(reason=reason), id=lv) for lv in LEVELS]
    built, best = lib.cpu_built_capabilities(), lib.cpu_best_capability()
    out = []
    for lv in LEVELS:
        marks = []
        if lv not in built:
            marks = [pytest.mark.skip(reason=f"level {lv} not compiled into fastkd._C")]
        elif LEVELS.index(lv) > LEVELS.index(best):
            marks = [pytest.mark.skip(reason=f"this CPU supports up to {best}, not {lv}")]
        out.append(pytest.param(lv, marks=marks, id=lv))
    return out


@pytest.fixture(params=_level_params())
def level(request):
    lib = _ext.library()
    old = lib.set_cpu_capability(request.param)
    try:
        yield request.param
    finally:
        lib.set_cpu_capability(old)


# --------------------------------------------------------------------------------------------
# fast exp / log
# --------------------------------------------------------------------------------------------
def _ulp_error(got: torch.Tensor, ref64: torch.Tensor) -> torch.Tensor:
    """|got - ref| in units of the float32 spacing at ref (float64 arithmetic)."""
    r32 = ref64.float()
    spacing = torch.from_numpy(np.spacing(np.abs(r32.numpy()))).double()
    return (got.double() - ref64).abs() / spacing


def test_fast_exp_accuracy(level):
    # every float32 in [-87.3, 88.7] at a fine grid (plus the reduction boundaries n ln2 +- ln2/2)
    x = torch.linspace(-87.3, 88.7, 2_000_003, dtype=torch.float32)
    k = torch.arange(-125, 128, dtype=torch.float64)
    edges = torch.cat([k * math.log(2) + d for d in (-0.5 * math.log(2), 0.0, 0.5 * math.log(2))]).float()
    x = torch.cat([x, edges[(edges > -87.3) & (edges < 88.7)]])
    got = torch.ops.fastkd._fast_exp(x)
    err = _ulp_error(got, x.double().exp())
    assert err.max().item() <= 2.0, f"max {err.max().item():.2f} ulp at x = {x[err.argmax()].item()}"
    assert err.mean().item() <= 0.5


def test_fast_exp_special_values(level):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([-inf, -1e30, -104.0, -88.0, 0.0, -0.0, 89.0, 1e30, inf, nan, 1.0, -1.0] * 3)
    got = torch.ops.fastkd._fast_exp(x)
    expect = torch.tensor([0.0, 0.0, 0.0, math.exp(-88.0), 1.0, 1.0, inf, inf, inf, nan, math.e, 1 / math.e] * 3)
    # exp(-88) is denormal in float32; fastkd flushes results below FLT_MIN to 0
    expect[3::12] = got[3::12].clamp(max=float(np.finfo(np.float32).tiny))
    assert torch.equal(got.isnan(), expect.isnan())
    ok = ~expect.isnan()
    torch.testing.assert_close(got[ok], expect[ok], rtol=3e-7, atol=0.0)


def test_fast_exp_nonpos_matches_fast_exp(level):
    # the kernels' exp of shifted logits (x <= 0): the same bits as _fast_exp on its whole domain,
    # the NaN / -inf / underflow cases included; odd lengths exercise the scalar tail.
    inf, nan = float("inf"), float("nan")
    grid = torch.linspace(-110.0, 0.0, 1_000_003, dtype=torch.float32)
    special = torch.tensor([-inf, -1e30, -104.0, -87.34, -87.33, -1e-30, -0.0, 0.0, nan] * 3)
    x = torch.cat([grid, special, -torch.rand(1001, generator=torch.Generator().manual_seed(0)) * 100])
    got = torch.ops.fastkd._fast_exp_nonpos(x)
    ref = torch.ops.fastkd._fast_exp(x)
    assert torch.equal(got.isnan(), x.isnan()), "NaN in, NaN out; nothing else NaN"
    ok = ~x.isnan()
    assert torch.equal(got[ok], ref[ok]), f"differs at x = {x[ok][got[ok] != ref[ok]][:5].tolist()}"
    assert got[ok][x[ok] == -inf].eq(0).all() and got[ok][x[ok] == 0].eq(1).all()


def test_fast_log_accuracy(level):
    # log spaced over every binade, denormals included, plus values near 1 (where log is small)
    e = torch.linspace(-149.0, 127.99, 2_000_003, dtype=torch.float64)
    x = torch.cat([torch.exp2(e), 1 + torch.linspace(-0.3, 0.42, 100_001, dtype=torch.float64)]).float()
    x = x[(x > 0) & torch.isfinite(x)]
    got = torch.ops.fastkd._fast_log(x)
    err = _ulp_error(got, x.double().log())
    assert err.max().item() <= 2.0, f"max {err.max().item():.2f} ulp at x = {x[err.argmax()].item()}"
    assert err.mean().item() <= 0.5


def test_fast_log_special_values(level):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, -1.0, -inf, inf, nan, 1.0, 2.0, 1e-45, 3.4e38] * 2)
    got = torch.ops.fastkd._fast_log(x)
    expect = torch.tensor([-inf, -inf, nan, nan, inf, nan, 0.0, math.log(2), math.log(1.401298464324817e-45),
                           math.log(3.4e38)] * 2)  # fmt: skip
    assert torch.equal(got.isnan(), expect.isnan())
    ok = ~expect.isnan()
    torch.testing.assert_close(got[ok], expect[ok], rtol=3e-7, atol=0.0)


# --------------------------------------------------------------------------------------------
# Shifted form at large offsets
# --------------------------------------------------------------------------------------------
def _reference64(s, t, divergence, beta, temperature):
    s64 = s.double().requires_grad_(True)
    t64 = t.double().requires_grad_(True)
    loss = fastkd.reference_distill_loss(s64, t64, temperature=temperature, divergence=divergence, beta=beta,
                                         reduction="sum")  # fmt: skip
    gs, gt = torch.autograd.grad(loss, (s64, t64))
    return loss.detach(), gs, gt


def _gpu_backend(backend: str) -> bool:
    """Whether ``backend`` runs on CUDA tensors here (Triton compiled on a GPU, or the CUDA kernels)."""
    return backend == "cuda" or (backend == "triton" and not INTERPRETED and torch.cuda.is_available())


def _run(backend, s, t, divergence, beta, temperature):
    dev = "cuda" if _gpu_backend(backend) else s.device
    s1 = s.to(dev).requires_grad_(True)
    t1 = t.to(dev).requires_grad_(True)
    loss = fastkd.distill_loss(s1, t1, temperature=temperature, divergence=divergence, beta=beta, reduction="sum",
                               backend=backend)  # fmt: skip
    loss.backward()
    return loss.detach().cpu(), s1.grad.cpu(), t1.grad.cpu()


def _emu(s, t, divergence, beta, temperature):
    """The CUDA kernel under the host emulation (tests/cuda_emu), with the op's reduction weights 1."""
    from test_distill_loss import _emu_distill

    div = {"kl": 0, "reverse_kl": 1, "jsd": 2}[divergence]
    if divergence == "jsd" and beta in (0.0, 1.0):
        div, beta = (0 if beta == 0.0 else 1), 0.5
    rows, gs, gt, _ = _emu_distill(s, t, torch.ones(s.shape[0]), temperature=temperature, div=div, beta=beta,
                                   loss_scale=temperature**2, smem=32 * 64, max_grid=2)  # fmt: skip
    return rows.sum(), gs, gt


def _check(got, ref, what, rtol=1e-5, log_grad=None, rows=1):
    """Loss: relative error. Gradients: max-normalised error. ``log_grad`` names the gradient of the
    form p (log p - log q - D) (the teacher's for KL, the student's for reverse KL): its terms are of
    the size of D, so where D ~ 1e30 and the exact gradient is ~0 (a one-hot p) float rounding of D
    itself is the scale (float64's reference is no better); it is normalised by max(|ref|, D)."""
    (loss, gs, gt), (rloss, rgs, rgt) = got, ref
    assert math.isfinite(rloss.item()), what
    rel = abs(loss.double().item() - rloss.item()) / max(abs(rloss.item()), 1.0 if rloss.item() == 0 else 1e-30)
    assert rel <= rtol, f"{what}: loss {loss.item()} vs {rloss.item()} (relative error {rel:.2e})"
    for name, g, r in (("grad_student", gs, rgs), ("grad_teacher", gt, rgt)):
        assert torch.isfinite(g).all(), f"{what}: {name} not finite"
        scale = r.abs().max().item()
        if name == log_grad:
            scale = max(scale, abs(rloss.item()) / rows)
        # (a floor of 1e-6: where the exact gradient is 0, float64's own rounding noise is no scale)
        err = (g.double() - r).abs().max().item() / max(scale, 1e-6)
        assert err <= rtol, f"{what}: {name} max-normalised error {err:.2e}"


OFFSETS = [(0.0, 0.0), (1e3, -1e3), (1e4, 1e4), (-3e5, 2e5), (1e6, -1e6), (1e6, 1e6), (-1e6, 1e6)]
DIVS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


def _offset_inputs(os_, ot, V=1031, N=6):
    g = torch.Generator().manual_seed(11)
    s = (2 * torch.randn(N, V, generator=g) + os_).float()
    t = (2 * torch.randn(N, V, generator=g) + ot).float()
    return s, t


def _backends():
    out = [pytest.param("cpu", id="cpu", marks=[] if HAVE_C else [pytest.mark.skip(reason="no fastkd._C")])]
    out.append(pytest.param("triton", id="triton"))
    out.append(pytest.param("cuda-emu", id="cuda-emu"))
    # the compiled CUDA kernels on a GPU: conftest's param, skipped with the reason elsewhere
    out += [p for p in backend_params(DL_OP) if p.id == "cuda"]
    return out


def _dispatch(backend, s, t, divergence, beta, temperature):
    if backend == "cuda-emu":
        return _emu(s, t, divergence, beta, temperature)
    if backend == "triton" and not (INTERPRETED or torch.cuda.is_available()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    return _run(backend, s, t, divergence, beta, temperature)


@pytest.mark.parametrize(("divergence", "beta"), DIVS)
@pytest.mark.parametrize(("off_s", "off_t"), OFFSETS, ids=[f"{a:g},{b:g}" for a, b in OFFSETS])
def test_large_offsets_cpu_every_level(level, divergence, beta, off_s, off_t):
    s, t = _offset_inputs(off_s, off_t)
    _check(_run("cpu", s, t, divergence, beta, 1.0), _reference64(s, t, divergence, beta, 1.0),
           f"cpu/{level} {divergence} offsets {off_s:g}/{off_t:g}")  # fmt: skip


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(("divergence", "beta"), DIVS)
@pytest.mark.parametrize(("off_s", "off_t"), [(1e4, -1e4), (1e6, -1e6), (-1e6, 1e6)], ids=["1e4", "1e6", "-1e6"])
def test_large_offsets_triton_and_cuda(backend, divergence, beta, off_s, off_t):
    s, t = _offset_inputs(off_s, off_t, V=517, N=4)
    _check(_dispatch(backend, s, t, divergence, beta, 1.0), _reference64(s, t, divergence, beta, 1.0),
           f"{backend} {divergence} offsets {off_s:g}/{off_t:g}")  # fmt: skip


@pytest.mark.parametrize("temperature", [0.7, 3.0])
@pytest.mark.parametrize("backend", _backends())
def test_large_offsets_other_temperatures(backend, temperature):
    # (x - max) / T: the shift is exact, so a non-power-of-two T costs one rounding, not the offset's
    s, t = _offset_inputs(5e5, -5e5, V=517, N=4)
    _check(_dispatch(backend, s, t, "kl", 0.5, temperature), _reference64(s, t, "kl", 0.5, temperature),
           f"{backend} T={temperature}")  # fmt: skip


def _huge_inputs(kind: str):
    g = torch.Generator().manual_seed(12)
    N, V = 6, 300
    if kind == "sign":  # entries +-1e30 at random: p, q uniform over their +1e30 entries
        return (torch.randn(N, V, generator=g).sign() * 1e30, torch.randn(N, V, generator=g).sign() * 1e30)
    if kind == "offset":  # 2 randn +- 1e30: in float32 every entry of a row is the same number
        return 2 * torch.randn(N, V, generator=g) + 1e30, 2 * torch.randn(N, V, generator=g) - 1e30
    if kind == "spread":  # differences of 1e29: one-hot softmaxes, KL ~ 1e30
        return torch.randn(N, V, generator=g) * 1e30, torch.randn(N, V, generator=g) * 1e30
    # "mixed": a random half of the student's entries at +-1e30, plus ordinary logits
    half = torch.rand(N, V, generator=g) < 0.5
    s = torch.where(half, 1e30, -1e30) + torch.randn(N, V, generator=g)
    return s, 2 * torch.randn(N, V, generator=g)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(("divergence", "beta"), DIVS)
@pytest.mark.parametrize("kind", ["sign", "offset", "spread", "mixed"])
def test_plus_minus_1e30(backend, divergence, beta, kind):
    s, t = _huge_inputs(kind)
    got = _dispatch(backend, s, t, divergence, beta, 1.0)
    ref = _reference64(s, t, divergence, beta, 1.0)
    log_grad = {"kl": "grad_teacher", "reverse_kl": "grad_student"}.get(divergence)
    _check(got, ref, f"{backend} {divergence} {kind} 1e30", log_grad=log_grad, rows=s.shape[0])
    if divergence == "jsd":
        assert got[0].item() <= s.shape[0] * math.log(2) * (1 + 1e-6)


def _inf_row_inputs():
    g = torch.Generator().manual_seed(13)
    s = torch.randn(3, 67, generator=g)
    t = torch.randn(3, 67, generator=g)
    s[1] = float("-inf")
    return s, t


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(("divergence", "beta"), DIVS)
def test_all_minus_inf_row_is_nan(backend, divergence, beta):
    """A kept row whose logits are all -inf has no softmax: NaN loss and NaN gradient rows (the NaN
    contract), never a finite number such as the 0.25 JSD the cpu kernel used to give."""
    for which in ("student", "teacher"):
        s, t = _inf_row_inputs()
        if which == "teacher":
            s, t = t, s
        if backend == "cuda-emu":
            from test_distill_loss import _emu_distill

            div = {"kl": 0, "reverse_kl": 1, "jsd": 2}[divergence]
            rows, gs, gt, _ = _emu_distill(s, t, torch.ones(3), temperature=1.0, div=div, beta=beta, loss_scale=1.0,
                                           smem=0, max_grid=2)  # fmt: skip
        else:
            if backend == "triton" and not (INTERPRETED or torch.cuda.is_available()):
                pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
            dev = "cuda" if _gpu_backend(backend) else "cpu"
            s1, t1 = s.to(dev).requires_grad_(True), t.to(dev).requires_grad_(True)
            rows = fastkd.distill_loss(s1, t1, divergence=divergence, beta=beta, reduction="none", backend=backend)
            rows.sum().backward()
            rows, gs, gt = rows.detach().cpu(), s1.grad.cpu(), t1.grad.cpu()
        assert torch.isnan(rows[1]), f"{which}: loss of the -inf row is {rows[1].item()}"
        assert torch.isfinite(rows[[0, 2]]).all()
        assert torch.isnan(gs[1]).all() and torch.isnan(gt[1]).all(), f"{which}: gradient rows not NaN"
        assert torch.isfinite(gs[[0, 2]]).all() and torch.isfinite(gt[[0, 2]]).all()


# --------------------------------------------------------------------------------------------
# int32 overflow guards
# --------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    from fastkd.kernels.hidden_match import _tile_offsets

    @triton.jit
    def _offsets_probe(out_ptr, wrapped_ptr, r0, s_r, s_c, R: tl.constexpr, C: tl.constexpr):
        r = r0 + tl.arange(0, R)  # int32, as k0 + tl.arange in the kernel
        c = tl.arange(0, C)
        idx = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        tl.store(out_ptr + idx, _tile_offsets(r, c, s_r, s_c))
        tl.store(wrapped_ptr + idx, (r[:, None] * s_r + c[None, :] * s_c).to(tl.int64))  # the old int32 form

except ImportError:  # no Triton: the test skips
    _offsets_probe = None


def test_hidden_match_tile_offsets_are_int64():
    """kernels/hidden_match.py's _tile_offsets (the bmm kernel's addresses, K index x row stride):
    with int32 indices and an int32 stride whose products pass 2**31 the offsets must be exact."""
    if _offsets_probe is None or not (INTERPRETED or torch.cuda.is_available()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    R, C = 4, 8
    s_r, s_c = 2**31 // 3 + 7, 1  # int32 arguments; r * s_r passes 2**31 from r = 3 on
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(R * C, dtype=torch.int64, device=dev)
    wrapped = torch.zeros_like(out)
    _offsets_probe[(1,)](out, wrapped, 2, s_r, s_c, R=R, C=C)
    r = torch.arange(2, 2 + R, dtype=torch.int64)[:, None]
    c = torch.arange(C, dtype=torch.int64)[None, :]
    expect = (r * s_r + c * s_c).flatten()
    assert torch.equal(out.cpu(), expect)
    # the int32 product really wraps here, so the check above can fail
    assert not torch.equal(wrapped.cpu(), expect)


@pytest.mark.skipif(not HAVE_C, reason="needs fastkd._C")
def test_nearest_tokens_int8_path_bounded_hidden_size(monkeypatch):
    """At H = 140,000 the int8 GEMM's int32 sums (up to 127 * 127 * H) would wrap; the ids must still
    be the exact top-k. Rows constant per column: every quantised entry is 127, so every int32 dot
    product is 127 * 127 * H > 2**31 and only the scales rank the columns."""
    monkeypatch.setenv("FASTKD_NEAREST_INT8", "1")  # the int8 path is a candidate on any CPU
    H, N, V = 140_000, 32, 512
    E = torch.ones(N, H)
    W = torch.linspace(0.5, 1.5, V)[:, None].expand(V, H).contiguous()
    W[7] = -2.0  # a negative column: the reference top-k is not just the last ids
    ids, scores = fastkd.nearest_tokens(E, W, k=3, metric="dot", backend="cpu")
    expect = torch.tensor([V - 1, V - 2, V - 3])
    assert torch.equal(ids, expect.expand(N, 3)), ids[0]
    torch.testing.assert_close(scores[:, 0], torch.full((N,), 1.5 * H), rtol=1e-5, atol=0.0)
