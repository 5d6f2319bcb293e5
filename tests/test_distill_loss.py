"""fastkd.distill_loss on every backend against a float64 reference (loss and both gradients).

Every backend runs through ``backend_params(OP)``: ``torch`` (the reference itself, in float32),
``cpu`` (C++), ``triton`` (under TRITON_INTERPRET=1 on CPU, so its shapes stay small) and ``cuda``
(skipped with its reason without a GPU). The oracle is ``reference_distill_loss`` evaluated in
float64 with autograd; ``test_reference_matches_torch_kl_div`` ties that oracle to PyTorch's own
``kl_div``.
"""

from __future__ import annotations

import ctypes
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRETED, backend_params, fused_op_params, op_devices
from conftest import LOGITS_TOL as TOL

import fastkd
from fastkd.ops import distill_loss as dl
from fastkd.ops.distill_loss import OP, reference_distill_loss
from fastkd.ops.scale_grad import OP as SCALE_OP
from fastkd.ops.scale_grad import scale_grad_
from tests import cuda_emu

# The Triton interpreter evaluates masked-out lanes with numpy too (log(0), inf - inf), which warns.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:triton"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning:triton"),
]

BACKENDS = backend_params(OP)
FUSED = [p for p in BACKENDS if p.values[0] != "torch"]

# (divergence, beta) pairs: beta 0 and 1 are the two KLs written as a JSD.
DIVERGENCES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


def _keep(labels, mask, ignore_index=-100):
    keep = None if labels is None else labels != ignore_index
    if mask is not None:
        keep = mask if keep is None else keep & mask
    return keep


def _reference(s, t, *, grad_out=None, labels=None, mask=None, ignore_index=-100, **kw):
    """(loss, d loss/d s, d loss/d t) of the float64 reference, with upstream gradient grad_out."""
    s64 = s.detach().to(torch.float64).requires_grad_(True)
    t64 = t.detach().to(torch.float64).requires_grad_(True)
    loss = reference_distill_loss(s64, t64, keep=_keep(labels, mask, ignore_index), **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(torch.float64)
    gs, gt = torch.autograd.grad(loss, (s64, t64), go)
    return loss.detach(), gs, gt


def _run(backend, s, t, *, grad_teacher=True, grad_out=None, **kw):
    """(loss, s.grad, t.grad) of fastkd.distill_loss on ``backend``; t.grad is None without grad_teacher."""
    s_ = s.detach().clone().requires_grad_(True)
    t_ = t.detach().clone().requires_grad_(grad_teacher)
    loss = fastkd.distill_loss(s_, t_, backend=backend, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), s_.grad, t_.grad


def _err(actual, expected) -> float:
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    if a.numel() == 0:
        return 0.0
    scale = e.abs().max().clamp_min(1e-300)
    return ((a - e).abs().max() / scale).item()


def _check(got, ref, dtype, what=""):
    loss, gs, gt = got
    rloss, rgs, rgt = ref
    tol = TOL[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all(), what
    assert _err(loss, rloss) <= tol["loss"], f"{what} loss {loss} vs {rloss}"
    assert gs.dtype == dtype
    assert _err(gs, rgs) <= tol["grad"], f"{what} student grad error {_err(gs, rgs)}"
    if gt is not None:
        assert gt.dtype == dtype and torch.isfinite(gt).all()
        assert _err(gt, rgt) <= tol["grad"], f"{what} teacher grad error {_err(gt, rgt)}"


def _logits(*shape, dtype=torch.float32, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g) * scale
    t = torch.randn(*shape, generator=g) * scale
    return s.to(DEVICE, dtype), t.to(DEVICE, dtype)


# --------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_reference_matches_torch_kl_div():
    s, t = _logits(4, 6, 33, dtype=torch.float64)
    T = 2.5
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    rows = 4 * 6
    kl = F.kl_div(ls, lt, log_target=True, reduction="sum") / rows * T * T
    rkl = F.kl_div(lt, ls, log_target=True, reduction="sum") / rows * T * T
    kw = {"temperature": T, "reduction": "batchmean"}
    torch.testing.assert_close(reference_distill_loss(s, t, divergence="kl", **kw), kl)
    torch.testing.assert_close(reference_distill_loss(s, t, divergence="reverse_kl", **kw), rkl)
    # generalised JSD from its definition, with beta 0 and 1 the two KLs
    b = 0.3
    p, q = lt.exp(), ls.exp()
    m = b * p + (1 - b) * q
    jsd = (b * (p * (lt - m.log())).sum() + (1 - b) * (q * (ls - m.log())).sum()) / rows * T * T
    torch.testing.assert_close(reference_distill_loss(s, t, divergence="jsd", beta=b, **kw), jsd)
    torch.testing.assert_close(reference_distill_loss(s, t, divergence="jsd", beta=0.0, **kw), kl)
    torch.testing.assert_close(reference_distill_loss(s, t, divergence="jsd", beta=1.0, **kw), rkl)
    # "mean" is kl_div's elementwise mean; scale_by_t2=False drops T**2
    torch.testing.assert_close(
        reference_distill_loss(s, t, temperature=T, reduction="mean", scale_by_t2=False),
        F.kl_div(ls, lt, log_target=True, reduction="mean"),
    )


# --------------------------------------------------------------------------------------------
# Values and gradients against float64
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_divergences_and_temperatures(backend, divergence, beta, temperature):
    s, t = _logits(2, 3, 33)
    labels = torch.randint(0, 33, (2, 3), device=DEVICE)
    labels[1, 0] = -100
    kw = {"temperature": temperature, "divergence": divergence, "beta": beta, "labels": labels}
    go = torch.tensor(0.7, device=DEVICE)  # the loss is not the last op
    _check(_run(backend, s, t, grad_out=go, **kw), _reference(s, t, grad_out=go, **kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["all", "labels", "mask", "labels+mask"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_reductions_and_ignored_rows(backend, reduction, keep):
    s, t = _logits(2, 3, 33, seed=1)
    labels = mask = None
    if "labels" in keep:
        labels = torch.tensor([[5, -1, 7], [-1, 2, 3]], device=DEVICE)  # custom ignore_index -1
    if "mask" in keep:
        mask = torch.tensor([[True, True, False], [True, True, True]], device=DEVICE)
    kw = {"temperature": 2.0, "reduction": reduction, "labels": labels, "mask": mask, "ignore_index": -1}
    # a non-trivial upstream gradient: a random one per row for "none", a scalar otherwise
    go = torch.randn(2, 3, device=DEVICE) if reduction == "none" else torch.tensor(-1.5, device=DEVICE)
    got = _run(backend, s, t, grad_out=go, **kw)
    _check(got, _reference(s, t, grad_out=go, **kw), torch.float32, f"{reduction}/{keep}")
    keep_rows = _keep(labels, mask, -1)
    if keep_rows is not None:  # excluded rows: no loss, exactly zero gradients
        assert (got[1][~keep_rows] == 0).all() and (got[2][~keep_rows] == 0).all()
        if reduction == "none":
            assert (got[0][~keep_rows] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtypes(backend, dtype, divergence, beta):
    # V = 257 is odd: the vectorised kernels meet misaligned rows, partial vectors and a scalar tail.
    s, t = _logits(5, 257, dtype=dtype, seed=2)
    kw = {"temperature": 2.0, "divergence": divergence, "beta": beta}
    _check(_run(backend, s, t, **kw), _reference(s, t, **kw), dtype, str(dtype))


def _eager_in_dtype(s, t, T):
    """The usual eager KD loss computed entirely in the logits' dtype (the flash-attention yardstick)."""
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_within_twice_pytorch(backend, dtype):
    # flash-attention's rule: the error against float64 is at most ~2x PyTorch's own at that dtype.
    s, t = _logits(4, 1000, dtype=dtype, seed=3)
    T = 2.0
    ref = _reference(s, t, temperature=T)
    s_ = s.detach().clone().requires_grad_(True)
    eager = _eager_in_dtype(s_, t, T)
    eager.backward()
    got = _run(backend, s, t, temperature=T, grad_teacher=False)
    assert _err(got[0], ref[0]) <= 2 * _err(eager, ref[0]) + 1e-6
    assert _err(got[1], ref[1]) <= 2 * _err(s_.grad, ref[1]) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("grad_teacher", [False, True])
def test_teacher_gradient_on_off(backend, grad_teacher, reduction):
    s, t = _logits(3, 4, 50, seed=4)
    go = torch.randn(3, 4, device=DEVICE) if reduction == "none" else torch.tensor(3.0, device=DEVICE)
    kw = {"temperature": 2.0, "divergence": "jsd", "beta": 0.3, "reduction": reduction}
    got = _run(backend, s, t, grad_teacher=grad_teacher, grad_out=go, **kw)
    ref = _reference(s, t, grad_out=go, **kw)
    assert (got[2] is not None) == grad_teacher
    _check(got, ref, torch.float32)
    # the loss value does not depend on whether the teacher needs a gradient
    with torch.no_grad():
        torch.testing.assert_close(fastkd.distill_loss(s, t, backend=backend, **kw), got[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_by_t2_and_mixed_teacher_dtype(backend):
    s, t = _logits(3, 40, seed=5)
    a = fastkd.distill_loss(s, t, temperature=3.0, backend=backend)
    b = fastkd.distill_loss(s, t, temperature=3.0, scale_by_t2=False, backend=backend)
    torch.testing.assert_close(a, b * 9.0)
    # a teacher of another dtype works (the fused backends cast it to the student's dtype)
    sb = s.to(torch.bfloat16)
    got = _run(backend, sb, t, temperature=3.0)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    ref = _reference(sb, t.to(torch.bfloat16), temperature=3.0)
    assert _err(got[0], ref[0]) <= 1e-3 and _err(got[1], ref[1]) <= 1e-2 and _err(got[2], ref[2]) <= 1e-2


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------
@functools.cache
def _odd_case():
    # Liger's awkward shape: 41 x 401 rows of 1271. One float64 reference shared by the backends.
    s, t = _logits(41, 401, 1271, seed=6)
    labels = torch.randint(0, 1271, (41, 401), device=DEVICE)
    labels[::3, ::7] = -100
    kw = {"temperature": 2.0, "labels": labels}
    return s, t, kw, _reference(s, t, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shape_41x401x1271(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip("16441 rows are too slow for the Triton interpreter (test_shapes covers 1271 on it)")
    s, t, kw, ref = _odd_case()
    _check(_run(backend, s, t, **kw), ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [(1, 2), (2,), (7,), (2, 3, 1271), (2, 131072), (0, 5), (3, 0, 5)],
    ids=["1x2", "V=2", "V=7", "2x3x1271", "2x131072", "no-rows", "no-rows-3d"],
)
def test_shapes(backend, shape):
    s, t = _logits(*shape, seed=7)
    for reduction in ("batchmean", "none"):
        kw = {"temperature": 1.5, "divergence": "kl", "reduction": reduction}
        got = _run(backend, s, t, **kw)
        ref = _reference(s, t, **kw)
        assert got[0].shape == ref[0].shape == (shape[:-1] if reduction == "none" else ())
        if s.numel() == 0:  # no rows: loss 0, empty gradients
            assert (got[0] == 0).all() and got[1].shape == s.shape
            continue
        _check(got, ref, torch.float32, f"{shape} {reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_offset_inputs(backend):
    base_s, base_t = _logits(6, 2 * 131, seed=8)
    cases = {
        "strided": (base_s[:, ::2], base_t[:, ::2]),  # last-dim stride 2
        "transposed": (base_s.view(6, 2, 131).transpose(0, 1), base_t.view(6, 2, 131).transpose(0, 1)),
        "offset": (base_s.view(-1)[1 : 1 + 5 * 131].view(5, 131), base_t.view(-1)[3 : 3 + 5 * 131].view(5, 131)),
    }
    for name, (s, t) in cases.items():
        kw = {"temperature": 2.0, "divergence": "jsd", "beta": 0.3}
        _check(_run(backend, s, t, **kw), _reference(s, t, **kw), torch.float32, name)


# --------------------------------------------------------------------------------------------
# inf, NaN, all rows ignored
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_masked_vocabulary_entries(backend, divergence, beta):
    # A vocabulary entry masked at -inf in both logit sets is a zero probability: it contributes
    # nothing, its gradients are exactly 0, and nothing else becomes inf or NaN.
    s, t = _logits(4, 37, seed=9)
    vocab_mask = torch.zeros(4, 37, dtype=torch.bool, device=DEVICE)
    vocab_mask[:, 30:] = True
    vocab_mask[1, ::2] = True
    s = s.masked_fill(vocab_mask, float("-inf"))
    t = t.masked_fill(vocab_mask, float("-inf"))
    kw = {"temperature": 2.0, "divergence": divergence, "beta": beta}
    got = _run(backend, s, t, **kw)
    ref = _reference(s, t, **kw)
    _check(got, ref, torch.float32)
    assert (got[1][vocab_mask] == 0).all() and (got[2][vocab_mask] == 0).all()
    # the same as dropping those entries
    keep = ~vocab_mask[0]
    torch.testing.assert_close(
        fastkd.distill_loss(s[:1, keep], t[:1, keep], backend=backend, **kw),
        fastkd.distill_loss(s[:1], t[:1], backend=backend, **kw),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("divergence", "beta"), [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_rows_over_many_blocks(backend, dtype, divergence, beta):
    # Rows longer than the CPU kernel's 1024-entry blocks, which it shifts by each block's own maximum
    # and puts together afterwards: whole blocks masked at -inf (at the row's start, where no maximum
    # has been seen yet, and in the middle), the row's maximum in the last block, blocks far below it
    # (their share underflows), and a row whose blocks differ by hundreds.
    s, t = _logits(5, 3300, seed=11)
    s, t = s.double(), t.double()
    s[0, :1024] = t[0, :1024] = float("-inf")  # a leading block of -inf in both
    s[1, 1024:2048] = float("-inf")  # a middle block of -inf, student only: the teacher's mass is in it
    t[1, 1024:2048] = -60.0
    s[2, 3200:] += 40.0  # the maxima in the last (partial) block
    t[2, 3250:] += 25.0
    s[3, :2048] -= 300.0  # two blocks far below the rest
    t[3, 1024:2048] -= 500.0
    s[4] += torch.arange(3300, device=DEVICE, dtype=s.dtype) * 0.05  # blocks differ by ~50 each
    t[4] -= torch.arange(3300, device=DEVICE, dtype=t.dtype) * 0.03
    s, t = s.to(dtype), t.to(dtype)
    kw = {"temperature": 2.0, "divergence": divergence, "beta": beta, "reduction": "none"}
    got = _run(backend, s, t, **kw)
    ref = _reference(s, t, **kw)
    if divergence == "kl":  # row 1: the teacher has mass where the student is -inf: KL is +inf
        assert torch.isinf(got[0][1]) and got[0][1] > 0
    keep = torch.ones(5, dtype=torch.bool, device=DEVICE)
    if divergence == "kl":
        keep[1] = False
    tol = TOL[dtype]
    for g_all, r_all, what in zip(got, ref, ("loss", "student grad", "teacher grad")):
        g, r = g_all[keep], r_all[keep]
        assert torch.isfinite(g).all(), what
        assert _err(g, r) <= (tol["loss"] if what == "loss" else tol["grad"]), f"{what}: {_err(g, r)}"
    assert (got[1][0, :1024] == 0).all() and (got[2][0, :1024] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_logits(backend):
    s, t = _logits(3, 20, seed=10)
    # -inf student logit where the teacher has mass: KL(teacher || student) is +inf; the student
    # gradient q - p stays finite; reverse KL and JSD stay finite.
    s1 = s.clone()
    s1[1, 4] = float("-inf")
    loss, gs, _ = _run(backend, s1, t, reduction="none", grad_teacher=False)
    assert math.isinf(loss[1].item()) and loss[1] > 0 and torch.isfinite(loss[[0, 2]]).all()
    ref = _reference(s1, t, reduction="none")
    assert torch.isfinite(gs).all() and _err(gs, ref[1]) <= TOL[torch.float32]["grad"]
    for div in ("reverse_kl", "jsd"):
        loss = fastkd.distill_loss(s1, t, divergence=div, reduction="none", backend=backend)
        assert torch.isfinite(loss).all()
        assert _err(loss, _reference(s1, t, divergence=div, reduction="none")[0]) <= 1e-5
    # +inf is not a probability: NaN in that row (student or teacher), other rows untouched
    for which in ("student", "teacher"):
        s2, t2 = s.clone(), t.clone()
        (s2 if which == "student" else t2)[2, 3] = float("inf")
        loss = fastkd.distill_loss(s2, t2, reduction="none", backend=backend)
        assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all(), which


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_nan_propagates_in_kept_rows_only(backend, divergence):
    s, t = _logits(4, 33, seed=11)
    s[1, 5] = float("nan")  # a kept row
    t[2, 0] = float("nan")  # a kept row, in the teacher
    s[3, 7] = float("nan")  # an ignored row
    t[3, 8] = float("nan")
    labels = torch.tensor([1, 2, 3, -100], device=DEVICE)
    loss, gs, gt = _run(backend, s, t, reduction="none", labels=labels, divergence=divergence)
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]), "NaN must propagate, never silently become 0"
    assert torch.isfinite(loss[0]) and loss[3] == 0
    assert torch.isnan(gs[1]).any() and torch.isnan(gt[2]).any()
    assert torch.isfinite(gs[0]).all() and (gs[3] == 0).all() and (gt[3] == 0).all()
    # reduced: NaN in; with the NaN rows ignored, a finite loss equal to the clean rows'
    assert torch.isnan(fastkd.distill_loss(s, t, labels=labels, divergence=divergence, backend=backend))
    clean = torch.tensor([1, -100, -100, -100], device=DEVICE)
    got = fastkd.distill_loss(s, t, labels=clean, divergence=divergence, reduction="sum", backend=backend)
    torch.testing.assert_close(got, loss[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_contract_every_input_and_gradient(backend, divergence, where):
    # The contract: NaN in a kept row reaches that row's loss AND both gradients (a zero gradient
    # would let an optimiser step on silently); the other rows stay finite.
    s, t = _logits(3, 17, seed=12)
    (s if where == "student" else t)[1, 4] = float("nan")
    loss, gs, gt = _run(backend, s, t, reduction="none", divergence=divergence, beta=0.3)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(gs[1]).any(), "student gradient of a NaN row must carry NaN"
    assert torch.isnan(gt[1]).any(), "teacher gradient of a NaN row must carry NaN"
    assert torch.isfinite(gs[[0, 2]]).all() and torch.isfinite(gt[[0, 2]]).all()
    reduced = fastkd.distill_loss(s, t, divergence=divergence, beta=0.3, backend=backend)
    assert torch.isnan(reduced)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_all_minus_inf_row_is_nan(backend, divergence, where):
    # A row of -inf logits is no distribution at all: its loss is NaN (never a finite number).
    s, t = _logits(3, 17, seed=13)
    (s if where == "student" else t)[1] = float("-inf")
    loss, _, _ = _run(backend, s, t, reduction="none", divergence=divergence, beta=0.3)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    s, t = _logits(2, 3, 17, seed=12)
    s[0, 0, 0] = float("nan")  # even NaN rows: ignored means not read
    labels = torch.full((2, 3), -100, device=DEVICE)
    for kw in ({"labels": labels}, {"mask": torch.zeros(2, 3, dtype=torch.bool, device=DEVICE)}):
        loss, gs, gt = _run(backend, s, t, reduction=reduction, **kw)
        assert (loss == 0).all(), f"{reduction}: {loss}"
        assert (gs == 0).all() and (gt == 0).all()


def test_torch_backend_float64_and_output_dtypes():
    s, t = _logits(3, 50, dtype=torch.float64, seed=13)
    out = fastkd.distill_loss(s, t, temperature=2.0, divergence="jsd", backend="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_distill_loss(s, t, temperature=2.0, divergence="jsd"), rtol=0, atol=0)
    assert fastkd.distill_loss(s.bfloat16(), t.bfloat16(), backend="torch").dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Autograd plumbing: in-place backward, opcheck, gradcheck, compile, module
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
def test_second_backward_through_the_same_graph_raises(backend):
    # The fused backward scales the gradient that the forward wrote, in place; a second backward
    # (retain_graph=True) would scale it twice, so autograd's version check refuses it.
    s, t = _logits(2, 9, seed=14)
    s.requires_grad_(True)
    loss = fastkd.distill_loss(s, t, backend=backend) * 2.0
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    assert not g1.requires_grad
    torch.testing.assert_close(g1, _reference(s, t, grad_out=torch.tensor(2.0))[1].float())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, s)


@pytest.mark.parametrize("get_op", fused_op_params(OP, "distill_loss", dl._triton_op))
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_opcheck_distill_loss(get_op, divergence, reduce):
    op = get_op()
    N, V = 4, 9
    s, t = _logits(N, V, seed=15)
    rs = torch.tensor([0.5, 0.0, 0.25, 0.25], device=DEVICE)
    args = (s, t, rs, 2.0, divergence, 0.3, 4.0, reduce)
    torch.library.opcheck(op, (*args, False, False))
    # With gradients: all four checks, AOT dispatch included (backward scales out of place while
    # AOTAutograd traces it, in place when it runs eagerly).
    s.requires_grad_(True)
    t.requires_grad_(True)
    torch.library.opcheck(op, (*args, True, True))


@pytest.mark.parametrize("backend", backend_params(SCALE_OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_scale_grad(backend, dtype):
    g = torch.randn(5, 3, 37, device=DEVICE).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    one = torch.tensor(1.0, device=DEVICE, dtype=acc)
    # Exact, except that the Triton interpreter rounds float32 -> bfloat16 toward zero (compiled
    # Triton rounds to nearest even): then one bfloat16 ulp.
    rtol = 2**-7 if INTERPRETED and dtype == torch.bfloat16 and backend == "triton" else 0.0
    x = g.clone()
    v = x._version
    assert scale_grad_(x, one, backend=backend) is x  # upstream gradient 1: unchanged
    assert torch.equal(x, g)
    scale_grad_(x, torch.tensor(-2.5, device=DEVICE, dtype=acc), backend=backend)
    assert x._version > v  # the custom op declares the mutation: autograd sees it
    torch.testing.assert_close(x, (g.to(acc) * -2.5).to(dtype), rtol=rtol, atol=0)
    per_row = torch.tensor([1.0, 0.0, 3.0, -1.0, 0.5], device=DEVICE, dtype=acc)
    x = g.clone()
    scale_grad_(x, per_row, backend=backend)
    torch.testing.assert_close(x, (g.to(acc) * per_row[:, None, None]).to(dtype), rtol=rtol, atol=0)
    op = torch.ops.fastkd.scale_grad_.default
    torch.library.opcheck(op, (g.clone(), per_row, backend))
    torch.library.opcheck(op, (g.clone(), torch.tensor(3.0, device=DEVICE, dtype=acc), backend))


@pytest.mark.parametrize(
    ("grad", "scale", "match"),
    [
        (torch.randn(4, 3).t(), torch.tensor(2.0), "grad must be contiguous"),
        (torch.randn(4, 3), torch.ones(3), r"scale must be 0-d or \[N\] = \[4\]"),
        (torch.randn(4, 3), 2.0, "scale must be a floating-point tensor"),
        (torch.ones(4, dtype=torch.int64), torch.tensor(2.0), "grad must be a floating-point tensor"),
    ],
    ids=["strided", "wrong-rows", "python-number", "integer-grad"],
)
def test_scale_grad_rejects_bad_input(grad, scale, match):
    with pytest.raises((TypeError, ValueError), match=match):
        scale_grad_(grad, scale)


def test_scale_grad_kernel_grid_is_1d_within_cuda_limits():
    # A 2-D (row, chunk) grid put the chunks in y, limited to 65,535 by CUDA: a row of more than
    # 65,535 * 4096 elements (~2.7e8) could not launch. The grid is 1-D now, int64 offsets inside.
    tk = pytest.importorskip("fastkd.kernels.scale_grad")
    programs, chunks = tk.launch_grid(1, 3 * 10**8, tk.MAX_BLOCK)  # one row of 3e8 elements (0-d scale)
    assert chunks == -(-3 * 10**8 // tk.MAX_BLOCK) > 65_535 and programs == chunks
    programs, chunks = tk.launch_grid(70_000, 5000, tk.MAX_BLOCK)  # per-row scale, 3.5e8 elements
    assert (programs, chunks) == (140_000, 2)
    assert tk.launch_grid(3, 1, 16) == (3, 1)
    with pytest.raises(ValueError, match="more than CUDA's"):
        tk.launch_grid(2**20, 2**23, tk.MAX_BLOCK)


@pytest.mark.skipif(not INTERPRETED, reason="checks the program-to-element mapping under the interpreter")
def test_triton_scale_grad_mapping_rows_and_chunks():
    # Rows longer than one block (several chunks per row) and a partial last chunk, per-row and 0-d
    # scales: every element scaled by its own row's value exactly once.
    tk = pytest.importorskip("fastkd.kernels.scale_grad")
    g = torch.randn(3, 2 * tk.MAX_BLOCK + 5)
    sc = torch.tensor([2.0, -1.0, 0.5])
    x = g.clone()
    tk.scale_grad_(x, sc)
    assert torch.equal(x, g * sc[:, None])
    x = g.clone()
    tk.scale_grad_(x, torch.tensor(3.0))
    assert torch.equal(x, g * 3.0)


class _Recompute(torch.autograd.Function):
    """fastkd.distill_loss whose backward reruns the fused forward (a fresh graph every time).

    gradcheck calls backward twice on one graph to test re-entrancy, which the fused op refuses
    on purpose (test_second_backward_through_the_same_graph_raises); rerunning it per backward
    lets gradcheck compare the op's own gradients with finite differences of its own values.
    """

    @staticmethod
    def forward(ctx, s, t, kw):
        ctx.save_for_backward(s, t)
        ctx.kw = kw
        return fastkd.distill_loss(s, t, **kw)

    @staticmethod
    def backward(ctx, go):
        s, t = ctx.saved_tensors
        with torch.enable_grad():
            s_, t_ = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
            out = fastkd.distill_loss(s_, t_, **ctx.kw)
            gs, gt = torch.autograd.grad(out, (s_, t_), go)
        return gs, gt, None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize(("divergence", "beta"), [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_gradcheck_float64(backend, divergence, beta, reduction):
    s, t = _logits(2, 5, dtype=torch.float64, scale=1.0, seed=16)
    s.requires_grad_(True)
    t.requires_grad_(True)
    labels = torch.tensor([0, -100], device=DEVICE) if reduction == "none" else None
    kw = {"temperature": 1.7, "divergence": divergence, "beta": beta, "reduction": reduction, "labels": labels}
    kw["backend"] = backend
    if backend == "torch":
        fn = lambda a, b: fastkd.distill_loss(a, b, **kw)
    else:
        fn = lambda a, b: _Recompute.apply(a, b, kw)
    assert torch.autograd.gradcheck(fn, (s, t), fast_mode=backend == "triton" and INTERPRETED)


def _compile_case(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 50)).to(DEVICE)
    x = torch.randn(3, 4, 16, device=DEVICE)
    teacher = torch.randn(3, 4, 50, device=DEVICE)
    labels = torch.randint(0, 50, (3, 4), device=DEVICE)
    labels[0, :2] = -100

    def step(x, teacher, labels):
        return fastkd.distill_loss(model(x), teacher, temperature=2.0, labels=labels, backend=backend)

    return model, step, (x, teacher, labels)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "cuda", "triton")])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    model, step, args = _compile_case(backend)
    eager = step(*args)
    eager.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # fullgraph=True: a graph break anywhere (backend choice, validation, the op) fails the test
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    for _ in range(2):  # the second call runs the cached graph
        model.zero_grad()
        loss = compiled(*args)
        loss.backward()
        torch.testing.assert_close(loss, eager)
        for p, g in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module(backend):
    s, t = _logits(2, 3, 21, seed=17)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]], device=DEVICE)
    kw = {"temperature": 2.0, "divergence": "jsd", "beta": 0.3, "reduction": "sum", "ignore_index": -100}
    mod = fastkd.nn.DistillationLoss(**kw, backend=backend)
    assert "jsd" in repr(mod) and "temperature=2.0" in repr(mod)
    got = mod(s, t, labels=labels)
    torch.testing.assert_close(got, fastkd.distill_loss(s, t, labels=labels, backend=backend, **kw))
    ref = _reference(s, t, labels=labels, **kw)[0]
    assert _err(got, ref) <= 1e-5
    mask = labels != -100
    torch.testing.assert_close(mod(s, t, mask=mask), got)
    assert isinstance(mod, torch.nn.Module) and list(mod.parameters()) == []


# --------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError that names the argument
# --------------------------------------------------------------------------------------------
def _bad_cases():
    x = torch.randn(2, 3, 5)
    lab = torch.zeros(2, 3, dtype=torch.long)
    m = torch.ones(2, 3, dtype=torch.bool)
    meta = torch.empty(2, 3, 5, device="meta")
    C = [
        ("shape", (x, torch.randn(2, 4, 5)), {}, ValueError, "same shape"),
        ("V", (x, torch.randn(2, 3, 6)), {}, ValueError, "vocabulary size V"),
        ("V=0", (torch.randn(2, 0), torch.randn(2, 0)), {}, ValueError, "student_logits"),
        ("0-d", (torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, "student_logits"),
        ("int student", (lab.unsqueeze(-1).expand(2, 3, 5), x), {}, TypeError, "student_logits"),
        ("int teacher", (x, torch.ones(2, 3, 5, dtype=torch.int32)), {}, TypeError, "teacher_logits"),
        ("not a tensor", (x.tolist(), x), {}, TypeError, "student_logits"),
        ("device", (x, meta), {}, ValueError, "device"),
        ("temperature 0", (x, x), {"temperature": 0.0}, ValueError, "temperature"),
        ("temperature <0", (x, x), {"temperature": -1.0}, ValueError, "temperature"),
        ("temperature inf", (x, x), {"temperature": math.inf}, ValueError, "temperature"),
        ("temperature nan", (x, x), {"temperature": math.nan}, ValueError, "temperature"),
        ("temperature str", (x, x), {"temperature": "2"}, TypeError, "temperature"),
        ("temperature tensor", (x, x), {"temperature": torch.tensor(2.0)}, TypeError, "temperature"),
        ("beta <0", (x, x), {"divergence": "jsd", "beta": -0.1}, ValueError, "beta"),
        ("beta >1", (x, x), {"divergence": "jsd", "beta": 1.5}, ValueError, "beta"),
        ("beta nan", (x, x), {"divergence": "jsd", "beta": math.nan}, ValueError, "beta"),
        ("divergence", (x, x), {"divergence": "kld"}, ValueError, "divergence"),
        ("reduction", (x, x), {"reduction": "avg"}, ValueError, "reduction"),
        ("labels shape", (x, x), {"labels": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "labels"),
        ("labels float", (x, x), {"labels": torch.zeros(2, 3)}, TypeError, "labels"),
        ("labels bool", (x, x), {"labels": m}, TypeError, "labels"),
        ("labels device", (x, x), {"labels": torch.zeros(2, 3, dtype=torch.long, device="meta")}, ValueError, "labels"),
        ("mask shape", (x, x), {"mask": torch.ones(2, dtype=torch.bool)}, ValueError, "mask"),
        ("mask dtype", (x, x), {"mask": torch.ones(2, 3)}, TypeError, "mask"),
        ("mask device", (x, x), {"mask": torch.ones(2, 3, dtype=torch.bool, device="meta")}, ValueError, "mask"),
        ("backend", (x, x), {"backend": "tpu"}, ValueError, "backend"),
        ("ignore_index str", (x, x), {"labels": lab, "ignore_index": "a"}, TypeError, "ignore_index"),
        ("ignore_index float", (x, x), {"ignore_index": -100.0}, TypeError, "ignore_index"),
        ("temperature 1e30", (x, x), {"temperature": 1e30}, ValueError, "temperature"),
        ("temperature 1e-30", (x, x), {"temperature": 1e-30}, ValueError, "temperature"),
    ]
    return [pytest.param(a, kw, exc, match, id=name) for name, a, kw, exc, match in C]


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), _bad_cases())
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastkd.distill_loss(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": 0}, "temperature"), ({"divergence": "x"}, "divergence"), ({"beta": 2}, "beta"),
     ({"reduction": "x"}, "reduction"), ({"ignore_index": "a"}, "ignore_index"), ({"temperature": 1e30}, "temperature")],
)  # fmt: skip
def test_module_rejects_bad_options_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastkd.nn.DistillationLoss(**kwargs)


# --------------------------------------------------------------------------------------------
# The CUDA kernels, run on the host by a small emulation of the CUDA execution model
# --------------------------------------------------------------------------------------------
# tests/cuda_emu/ compiles csrc/distill_loss.cuh and csrc/scale_grad.cuh with g++ (each CUDA thread a
# fiber; __syncthreads, warp shuffles and the dynamic shared memory emulated), so that machines
# without a GPU test the kernels' logic: row splitting and alignment, the warp-per-row and
# block-per-row kernels, full / partial / no shared-memory cache, the grid-stride row loop, the
# reductions, -inf / NaN handling and ignored rows. On a GPU the cuda backend runs the real thing in
# every test above.
_DTYPE_CODE = cuda_emu.DTYPE_CODE


@functools.cache
def _emu_lib():
    lib = cuda_emu.load("emu_kernels.cpp")
    vp, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.fastkd_emu_distill_loss.restype = i64
    lib.fastkd_emu_distill_loss.argtypes = [i32, i32, vp, vp, vp, vp, vp, vp, i64, i64, f64, f64, f64, i64, i64]
    lib.fastkd_emu_scale_grad.restype = None
    lib.fastkd_emu_scale_grad.argtypes = [i32, i32, vp, vp, i64, i64, i32, i64]
    return lib


def _emu_distill(s, t, row_scale, *, temperature, div, beta, loss_scale, smem, max_grid, grads=(True, True)):
    """The op's outputs (per-row loss, grad_student, grad_teacher) and the number of cached vectors."""
    N, V = s.shape
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    rows = torch.full((N,), float("nan"), dtype=acc)
    gs = torch.full_like(s, float("nan")) if grads[0] else None
    gt = torch.full_like(t, float("nan")) if grads[1] else None
    rs = row_scale.to(acc).contiguous()  # kept alive through the call
    ptr = lambda x: None if x is None else x.data_ptr()
    cached = _emu_lib().fastkd_emu_distill_loss(
        _DTYPE_CODE[s.dtype], div, ptr(s), ptr(t), ptr(rs), ptr(rows), ptr(gs), ptr(gt),
        N, V, temperature, beta, loss_scale, smem, max_grid,
    )  # fmt: skip
    return rows, gs, gt, cached


def _op_reference(s, t, row_scale, *, temperature, div, beta, loss_scale):
    """float64 (per-row loss, grad_student, grad_teacher) with the op's semantics (c = loss_scale * row_scale)."""
    keep = (row_scale != 0)[:, None]
    s64 = torch.where(keep, s.double(), 0.0).requires_grad_(True)
    t64 = torch.where(keep, t.double(), 0.0).requires_grad_(True)
    d = dl.divergence_rows(s64, t64, temperature, ("kl", "reverse_kl", "jsd")[div], beta)
    rows = loss_scale * row_scale.double() * d
    gs, gt = torch.autograd.grad(rows.sum(), (s64, t64))
    return rows.detach(), gs, gt


@pytest.mark.parametrize("div", [0, 1, 2], ids=["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize(
    ("dtype", "V", "smem", "cached"),
    [
        (torch.float32, 37, 0, -1),  # short rows: one warp per row
        (torch.float32, 2053, 1 << 20, 513),  # one block per row, the whole row in shared memory
        (torch.float32, 2053, 32 * 100, 100),  # part of the row cached, the rest re-read
        (torch.float32, 2053, 0, 0),  # nothing cached
        (torch.bfloat16, 37, 0, -1),
        (torch.bfloat16, 4099, 32 * 200, 200),
        (torch.float16, 2053, 1 << 20, 256),
        (torch.float64, 515, 32 * 100, 100),
    ],
    ids=["f32-warp", "f32-cache-all", "f32-cache-part", "f32-cache-none", "bf16-warp", "bf16-cache-part",
         "f16-cache-all", "f64-cache-part"],
)  # fmt: skip
def test_cuda_kernel_emulated(dtype, V, smem, cached, div):
    # rows: plain, ignored (holding NaN: must not be read), masked vocabulary entries, plain x2 weight;
    # 5 rows on at most 2 blocks so that blocks loop over rows.
    s, t = (x.cpu() for x in _logits(5, V, dtype=dtype, seed=20 + div))
    s[1, 3] = t[1, 5] = float("nan")
    s[2, ::3] = t[2, ::3] = float("-inf")
    rs = torch.tensor([0.5, 0.0, 0.25, 2.0, 1.0])
    kw = {"temperature": 1.7, "div": div, "beta": 0.3, "loss_scale": 1.7**2}
    rows, gs, gt, n_cached = _emu_distill(s, t, rs, smem=smem, max_grid=2, **kw)
    assert n_cached == cached
    ref = _op_reference(s, t, rs, **kw)
    tol = TOL[dtype]
    assert torch.isfinite(rows).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert _err(rows, ref[0]) <= tol["loss"], _err(rows, ref[0])
    assert _err(gs, ref[1]) <= tol["grad"] and _err(gt, ref[2]) <= tol["grad"], (_err(gs, ref[1]), _err(gt, ref[2]))
    assert rows[1] == 0 and (gs[1] == 0).all() and (gt[1] == 0).all()
    assert (gs[2, ::3] == 0).all() and (gt[2, ::3] == 0).all()
    # without gradients: the same loss, nothing else written
    rows2, _, _, _ = _emu_distill(s, t, rs, smem=smem, max_grid=2, grads=(False, False), **kw)
    assert torch.equal(rows2, rows)


@pytest.mark.parametrize("V", [37, 2053], ids=["warp", "block"])
def test_cuda_kernel_emulated_special_values(V):
    s, t = (x.cpu() for x in _logits(4, V, seed=30))
    s_off = torch.empty(4 * V + 1)[1:].view(4, V)  # misaligned student: the element-wise path
    s_off.copy_(s)
    s_off[0, 2] = float("-inf")  # -inf student where the teacher has mass
    s_off[1, 3] = float("nan")
    t[2, 4] = float("inf")
    rs = torch.ones(4)
    kw = {"temperature": 1.0, "beta": 0.3, "loss_scale": 1.0, "smem": 1 << 20, "max_grid": 4}
    for div in (0, 1, 2):
        rows, gs, gt, cached = _emu_distill(s_off, t, rs, div=div, **kw)
        assert cached in (-1, 0)  # no vectors: nothing cached
        assert torch.isnan(rows[1]) and torch.isnan(rows[2]) and torch.isfinite(rows[3])
        assert math.isinf(rows[0].item()) if div == 0 else torch.isfinite(rows[0])
        ref = _op_reference(s_off, t, rs, temperature=1.0, div=div, beta=0.3, loss_scale=1.0)
        assert _err(rows[3], ref[0][3]) <= TOL[torch.float32]["loss"]
        assert _err(gs[[0, 3]], ref[1][[0, 3]]) <= TOL[torch.float32]["grad"]
        assert torch.isnan(gs[1]).any() and torch.isnan(gt[2]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per-row"])
def test_cuda_scale_grad_emulated(dtype, per_row):
    rows, cols = 5, 37
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    base = torch.randn(rows * cols + 3).to(dtype)
    for offset in (0, 1, 3):  # misaligned starts: scalar heads and tails around the 16-byte vectors
        g = base[offset : offset + rows * cols].view(rows, cols)
        for scale in ([1.0] * rows, [-2.5] * rows, [1.0, 0.0, 3.0, -1.0, 0.5]):
            if not per_row and len(set(scale)) > 1:
                continue
            sc = torch.tensor(scale if per_row else scale[0], dtype=acc)
            x = g.clone() if offset == 0 else g.clone().view(-1)
            if offset:
                buf = torch.empty(rows * cols + offset, dtype=dtype)  # keep the misalignment in the copy
                x = buf[offset:].view(rows, cols)
                x.copy_(g)
            _emu_lib().fastkd_emu_scale_grad(
                _DTYPE_CODE[dtype], int(acc == torch.float64), x.data_ptr(), sc.data_ptr(), rows, cols, int(per_row), 3
            )
            expected = (g.to(acc) * (sc[:, None] if per_row else sc)).to(dtype)
            assert torch.equal(x, expected), (offset, scale)


# --------------------------------------------------------------------------------------------
# More than 2**31 elements (int64 offsets)
# --------------------------------------------------------------------------------------------
def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 0


@pytest.mark.slow
def test_more_than_2_pow_31_elements_cpu_bf16():
    if not OP.usable("cpu", torch.device("cpu"))[0]:
        pytest.skip("the compiled cpu backend is unavailable")
    V = 131072
    N = 2**31 // V + 2  # the last two rows start past element 2**31
    need = 3 * N * V * 2 + (2 << 30)  # student, teacher, student gradient (bf16) + headroom
    if _available_memory_bytes() < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free memory")
    g = torch.Generator().manual_seed(18)
    s = torch.empty(N, V, dtype=torch.bfloat16)
    t = torch.empty(N, V, dtype=torch.bfloat16)
    for i in range(0, N, 1024):  # fill in chunks: no float32 copy of the whole tensor
        s[i : i + 1024] = torch.randn(min(1024, N - i), V, generator=g)
        t[i : i + 1024] = torch.randn(min(1024, N - i), V, generator=g) * 2
    s.requires_grad_(True)
    loss = fastkd.distill_loss(s, t, temperature=2.0, reduction="none", backend="cpu")
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    for rows in (slice(0, 2), slice(N - 2, N)):  # rows before and after element 2**31
        ref = _reference(s[rows], t[rows], temperature=2.0, reduction="none")
        assert _err(loss[rows], ref[0]) <= 1e-5
        assert _err(s.grad[rows], ref[1]) <= TOL[torch.bfloat16]["grad"]


# --------------------------------------------------------------------------------------------
# The CPU eager fast path: the kernel's twin without an autograd registration (issue 15 item 4)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not fastkd._ext.available(), reason="needs the compiled library")
def test_cpu_eager_path_calls_the_twin_op_and_matches_the_registered_op():
    g = torch.Generator().manual_seed(21)
    s = torch.randn(64, 3, generator=g, requires_grad=True)
    t = torch.randn(64, 3, generator=g)
    args = (dl._row_scale_cached(None, 64, 3, "batchmean", s.device, torch.float32), 2.0, 0, 0.5, 4.0, True, True,
            False)  # fmt: skip
    with torch.no_grad():
        a = torch.ops.fastkd.distill_loss(s, t, *args)
        b = torch.ops.fastkd._distill_loss_eager(s, t, *args)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with torch.autograd.profiler.profile() as prof:
        loss = fastkd.distill_loss(s, t, temperature=2.0, backend="cpu")
        loss.backward()
    names = {e.name for e in prof.function_events}
    assert "fastkd::_distill_loss_eager" in names and "fastkd::distill_loss" not in names
    s64 = s.detach().double().requires_grad_(True)
    ref = reference_distill_loss(s64, t.double(), temperature=2.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    # under torch.compile the registered op (with its autograd) is what gets traced
    compiled = torch.compile(lambda x, y: fastkd.distill_loss(x, y, temperature=2.0, backend="cpu"), fullgraph=True)
    s2 = s.detach().clone().requires_grad_(True)
    compiled(s2, t).backward()
    torch.testing.assert_close(s2.grad, s.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not fastkd._ext.available(), reason="needs the compiled library")
@pytest.mark.parametrize("device", op_devices())
def test_direct_op_call_errors_name_the_argument(device):
    """A failed C++ check of a direct torch.ops call is a RuntimeError naming the argument, on the CPU
    and in the CUDA entry point (whose checks nvcc's host pass compiles), never a crash."""
    op = torch.ops.fastkd.distill_loss
    s, t = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    rs = torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match="must have the same shape"):
        op(s, t[:, :4].contiguous(), rs, 1.0, 0, 0.5, 1.0, True, True, False)
    with pytest.raises(RuntimeError, match="row_scale must be"):
        op(s, t, rs[:3], 1.0, 0, 0.5, 1.0, True, True, False)
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        op(s, t, rs, -1.0, 0, 0.5, 1.0, True, True, False)
    with pytest.raises(RuntimeError, match="beta must be in"):
        op(s, t, rs, 1.0, 2, 1.5, 1.0, True, True, False)
