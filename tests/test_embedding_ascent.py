"""fastkd.embedding_ascent_ / embedding_ascent_multi_: every backend against the float64 reference,
in-place semantics, strided inputs, opcheck, torch.compile and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastkd
from fastkd.ops.embedding_ascent import MULTI_OP, OP, reference_embedding_ascent_
from tests.conftest import DEVICE, backend_params, op_devices

BACKENDS = backend_params(OP)
MULTI_BACKENDS = backend_params(MULTI_OP)


def _inputs(shape, *, seed=0, masked=False, buf=False, buf_dtype=None):
    """float64 inputs; origin is a small perturbation of embeds (so radius projections bite)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    if len(shape) >= 2 and shape[-2] > 1:
        grad.reshape(-1, shape[-1])[1] = 0.0  # a zero-gradient row
    origin = e + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(shape[:-1], generator=g) > 0.3) if masked else None
    b = 0.01 * torch.randn(shape, generator=g, dtype=torch.float64) if buf else None
    return (
        e.to(DEVICE),
        grad.to(DEVICE),
        origin.to(DEVICE),
        None if mask is None else mask.to(DEVICE),
        (None if b is None else b.to(DEVICE)),
    )


def _options(norm, mom, rad, mx):
    return {
        "step_size": 0.1,
        "norm": norm,
        "radius": 0.07 if rad else None,
        "max_norm": 5.0 if mx else None,
        "momentum": 0.9 if mom else 0.0,
    }


def _apply(fn, e, grad, origin, mask, buf, opts, dtype=None, buf_dtype=None, **kw):
    dtype = dtype or e.dtype
    ee = e.to(dtype).clone()
    bb = None if buf is None else buf.to(buf_dtype or dtype).clone()
    fn(
        ee,
        grad.to(dtype),
        origin=origin.to(dtype) if opts["radius"] else None,
        mask=mask,
        momentum_buffer=bb,
        **opts,
        **kw,
    )
    return ee, bb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("norm", "mom", "rad", "mx", "masked"),
    list(itertools.product(("l2", "sign", "none"), (False, True), (False, True), (False, True), (False, True))),
)
def test_matches_reference_float64(backend, norm, mom, rad, mx, masked):
    e, grad, origin, mask, buf = _inputs((3, 5, 37), masked=masked, buf=mom)
    opts = _options(norm, mom, rad, mx)
    want_e, want_b = _apply(reference_embedding_ascent_, e, grad, origin, mask, buf, opts)
    got_e, got_b = _apply(fastkd.embedding_ascent_, e, grad, origin, mask, buf, opts, backend=backend)
    torch.testing.assert_close(got_e, want_e, atol=1e-12, rtol=1e-12)
    if mom:
        torch.testing.assert_close(got_b, want_b, atol=1e-12, rtol=1e-12)
    assert not torch.equal(got_e, e), "the update must move something"
    kept = mask.reshape(-1) if masked else torch.ones(15, dtype=torch.bool, device=DEVICE)
    if rad and not mx:  # the updated rows lie in the ball / box around origin (max_norm acts last)
        delta = (got_e - origin).reshape(-1, 37)
        size = delta.abs().amax(-1) if norm == "sign" else delta.norm(dim=-1)
        moved = kept & (grad.reshape(-1, 37).abs().sum(-1) > 0)
        assert (size[moved] <= 0.07 * (1 + 1e-12)).all()
    if mx:
        assert (got_e.reshape(-1, 37)[kept].norm(dim=-1) <= 5.0 * (1 + 1e-12)).all()


# dtype, error floor: the kernel's error against float64 must be at most ~2x the reference's own
# error at that dtype (flash-attention's rule), or below the floor (a few units of rounding).
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "floor"), DTYPES, ids=[str(d[0]).split(".")[-1] for d in DTYPES])
@pytest.mark.parametrize("norm", ["l2", "sign", "none"])
@pytest.mark.parametrize("buf_acc", [False, True], ids=["buf-same-dtype", "buf-fp32"])
def test_low_precision_error_bound(backend, dtype, floor, norm, buf_acc):
    e, grad, origin, mask, buf = _inputs((4, 9, 48), masked=True, buf=True, seed=1)
    opts = _options(norm, True, True, True)
    bdt = torch.float32 if buf_acc else dtype
    exact_e, exact_b = _apply(reference_embedding_ascent_, e, grad, origin, mask, buf, opts)
    # the reference run at this dtype: its error is the yardstick
    ref_e, ref_b = _apply(reference_embedding_ascent_, e, grad, origin, mask, buf, opts, dtype=dtype, buf_dtype=bdt)
    got_e, got_b = _apply(
        fastkd.embedding_ascent_, e, grad, origin, mask, buf, opts, dtype=dtype, buf_dtype=bdt, backend=backend
    )
    assert got_e.dtype == dtype and got_b.dtype == bdt
    for got, ref, exact in ((got_e, ref_e, exact_e), (got_b, ref_b, exact_b)):
        ref_err = (ref.double() - exact).abs().max().item()
        err = (got.double() - exact).abs().max().item()
        assert err <= max(2 * ref_err, floor), (err, ref_err)
    keep = mask
    assert torch.equal(got_e[~keep], e.to(dtype)[~keep])  # masked rows keep their bits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37,), (1, 1), (1, 7), (2, 3, 1), (3, 769), (2, 4100)], ids=str)
def test_shapes(backend, shape):
    e, grad, origin, _, buf = _inputs(shape, buf=True, seed=2)
    opts = _options("l2", True, True, True)
    want_e, want_b = _apply(reference_embedding_ascent_, e, grad, origin, None, buf, opts)
    got_e, got_b = _apply(fastkd.embedding_ascent_, e, grad, origin, None, buf, opts, backend=backend)
    torch.testing.assert_close(got_e, want_e, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_b, want_b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    e = torch.empty(0, 5, 8, device=DEVICE)
    out = fastkd.embedding_ascent_(e, torch.empty_like(e), step_size=0.1, backend=backend)
    assert out is e and out.shape == (0, 5, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_semantics(backend):
    e, grad, origin, mask, buf = _inputs((4, 6, 33), masked=True, buf=True, seed=3)
    e, buf = e.float(), buf.float()
    e_before, b_before = e.clone(), buf.clone()
    ptr, bptr, version = e.data_ptr(), buf.data_ptr(), e._version
    out = fastkd.embedding_ascent_(
        e, grad.float(), step_size=0.2, norm="sign", radius=0.1, origin=origin.float(), mask=mask,
        momentum=0.5, momentum_buffer=buf, backend=backend,
    )  # fmt: skip
    assert out is e and e.data_ptr() == ptr and buf.data_ptr() == bptr
    assert e._version > version
    # masked-out rows (embeds and buffer) are bit-identical; kept rows moved
    assert torch.equal(e[~mask], e_before[~mask]) and torch.equal(buf[~mask], b_before[~mask])
    assert not torch.equal(e[mask], e_before[mask]) and not torch.equal(buf[mask], b_before[mask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_row_stays_put(backend):
    e = torch.randn(3, 16, device=DEVICE)
    e[1] = e[1] / e[1].norm()  # inside max_norm
    grad = torch.randn(3, 16, device=DEVICE)
    grad[1] = 0.0
    before = e.clone()
    for norm in ("l2", "sign", "none"):
        fastkd.embedding_ascent_(e, grad, step_size=0.5, norm=norm, max_norm=2.0, backend=backend)
        assert torch.equal(e[1], before[1]), norm
        assert torch.isfinite(e).all()
    buf = torch.zeros_like(e)
    fastkd.embedding_ascent_(e, grad, step_size=0.5, momentum=0.9, momentum_buffer=buf, backend=backend)
    assert torch.equal(e[1], before[1]) and torch.equal(buf[1], torch.zeros(16, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_gradient_propagates(backend):
    for norm in ("l2", "sign", "none"):
        e = torch.randn(3, 8, device=DEVICE)
        grad = torch.randn(3, 8, device=DEVICE)
        grad[2, 3] = float("nan")
        fastkd.embedding_ascent_(e, grad, step_size=0.1, norm=norm, backend=backend)
        assert torch.isnan(e[2]).any(), norm
        assert torch.isfinite(e[:2]).all(), norm


@pytest.mark.parametrize("backend", BACKENDS)
def test_descend_is_ascend_of_negated_gradient(backend):
    e, grad, _, _, _ = _inputs((5, 24), seed=4)
    a = e.clone()
    b = e.clone()
    fastkd.embedding_ascent_(a, grad, step_size=0.3, norm="l2", maximize=False, backend=backend)
    fastkd.embedding_ascent_(b, -grad, step_size=0.3, norm="l2", maximize=True, backend=backend)
    torch.testing.assert_close(a, b, atol=1e-14, rtol=0)
    # a descent step lowers the linear objective <grad, e>
    moved = grad.abs().sum(-1) > 0
    assert ((a - e) * grad).sum(-1)[moved].lt(0).all() and moved.sum() == 4


def test_momentum_two_steps_by_hand():
    # MI-FGSM with the per-token L1 normalisation, written out.
    e, grad, g2 = torch.randn(3, 2, 6, dtype=torch.float64, device=DEVICE).unbind(0)
    buf = torch.zeros_like(e)
    x = e.clone()
    fastkd.embedding_ascent_(x, grad, step_size=0.1, norm="sign", momentum=0.8, momentum_buffer=buf)
    fastkd.embedding_ascent_(x, g2, step_size=0.1, norm="sign", momentum=0.8, momentum_buffer=buf)
    l1 = lambda g: g / g.abs().sum(-1, keepdim=True)
    b1 = l1(grad)
    b2 = 0.8 * b1 + l1(g2)
    torch.testing.assert_close(buf, b2, atol=1e-14, rtol=0)
    torch.testing.assert_close(x, e + 0.1 * b1.sign() + 0.1 * b2.sign(), atol=1e-14, rtol=0)


# ---------------------------------------------------------------------------------------------
# Strided inputs: updated in the caller's storage, never elsewhere.
# ---------------------------------------------------------------------------------------------
VIEWS = [
    # (name, base shape, the view of the base that is passed as embeds)
    ("rows-slice", (7, 3, 20), lambda t: t[1:5]),
    ("every-other-token", (3, 8, 20), lambda t: t[:, ::2]),
    ("column-slice", (3, 5, 30), lambda t: t[:, :, 4:24]),
    ("transposed", (4, 6, 20), lambda t: t.transpose(0, 1)),
    ("last-dim-strided", (3, 4, 40), lambda t: t[..., ::2]),
    ("hidden-not-last-in-memory", (3, 20, 5), lambda t: t.permute(0, 2, 1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "shape", "view_of"), VIEWS, ids=[v[0] for v in VIEWS])
def test_strided_embeds_updated_in_own_storage(backend, name, shape, view_of):
    base = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    view = view_of(base)
    grad = torch.randn(view.shape, dtype=torch.float64, device=DEVICE).transpose(0, -1).contiguous().transpose(0, -1)
    mask = torch.rand(view.shape[:-1], device=DEVICE) > 0.3
    buf = torch.zeros(view.shape[-1], *view.shape[:-1], dtype=torch.float64, device=DEVICE).movedim(0, -1)
    assert not buf.is_contiguous() and not grad.is_contiguous()
    before_base = base.clone()
    want, want_buf = view.clone(), buf.clone()
    opts = {"step_size": 0.1, "norm": "l2", "max_norm": 3.0, "mask": mask, "momentum": 0.5}
    reference_embedding_ascent_(want, grad, momentum_buffer=want_buf, **opts)
    fastkd.embedding_ascent_(view, grad, momentum_buffer=buf, backend=backend, **opts)
    torch.testing.assert_close(view, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(buf, want_buf, atol=1e-12, rtol=1e-12)
    assert not torch.equal(view, view_of(before_base))
    # nothing outside the view changed
    outside = torch.ones(shape, dtype=torch.bool, device=DEVICE)
    view_of(outside).fill_(False)
    assert torch.equal(base[outside], before_base[outside])


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_grad_and_origin(backend):
    # read-only operands may be expanded (stride 0): e.g. one origin for every sequence
    e = torch.randn(4, 6, 16, dtype=torch.float64, device=DEVICE)
    origin = torch.randn(6, 16, dtype=torch.float64, device=DEVICE).expand(4, 6, 16)
    grad = torch.randn(1, 6, 16, dtype=torch.float64, device=DEVICE).expand(4, 6, 16)
    want = e.clone()
    reference_embedding_ascent_(want, grad, step_size=0.5, radius=0.3, origin=origin)
    fastkd.embedding_ascent_(e, grad, step_size=0.5, radius=0.3, origin=origin, backend=backend)
    torch.testing.assert_close(e, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_embeds_refused(backend):
    e = torch.randn(1, 5, 8, device=DEVICE).expand(3, 5, 8)
    with pytest.raises(ValueError, match="embeds has elements that share memory"):
        fastkd.embedding_ascent_(e, torch.randn(3, 5, 8, device=DEVICE), step_size=0.1, backend=backend)
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="momentum_buffer must not share memory with embeds"):
        fastkd.embedding_ascent_(x, torch.randn_like(x), step_size=0.1, momentum_buffer=x, backend=backend)


def test_compiled_op_refuses_overlap_directly():
    e = torch.randn(1, 8).expand(3, 8)
    with pytest.raises(RuntimeError, match="embeds has elements that share memory"):
        torch.ops.fastkd.embedding_ascent_(e, torch.randn(3, 8), None, None, None, 0.1, 0, None, None, 0.0, True)


# ---------------------------------------------------------------------------------------------
# Multi-tensor form
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize(("norm", "mom", "rad"), [("l2", True, True), ("sign", False, True), ("none", True, False)])
def test_multi_matches_single(backend, norm, mom, rad):
    shapes = [(2, 5, 24), (7, 40), (3, 2, 2, 9), (1, 33)]
    ins = [_inputs(s, seed=10 + i, masked=i != 1, buf=mom) for i, s in enumerate(shapes)]
    opts = _options(norm, mom, rad, True)
    want = [_apply(reference_embedding_ascent_, *x, opts) for x in ins]
    es = [x[0].clone() for x in ins]
    bufs = [x[4].clone() for x in ins] if mom else None
    out = fastkd.embedding_ascent_multi_(
        es, [x[1] for x in ins], origins=[x[2] for x in ins] if rad else None, masks=[x[3] for x in ins],
        momentum_buffers=bufs, backend=backend, **opts,
    )  # fmt: skip
    assert all(o is e for o, e in zip(out, es))
    for i in range(len(shapes)):
        torch.testing.assert_close(es[i], want[i][0], atol=1e-12, rtol=1e-12)
        if mom:
            torch.testing.assert_close(bufs[i], want[i][1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
def test_multi_many_tensors_and_strided(backend):
    # more tensors than one CUDA launch takes (16), one of them a non-contiguous view
    base = torch.randn(6, 4, 12, dtype=torch.float64, device=DEVICE)
    es = [torch.randn(3, 12, dtype=torch.float64, device=DEVICE) for _ in range(19)] + [base[:, ::2]]
    gs = [torch.randn_like(e) for e in es]
    want = [e.clone() for e in es]
    for w, g in zip(want, gs):
        reference_embedding_ascent_(w, g, step_size=0.2, norm="sign", max_norm=1.5)
    fastkd.embedding_ascent_multi_(es, gs, step_size=0.2, norm="sign", max_norm=1.5, backend=backend)
    for e, w in zip(es, want):
        torch.testing.assert_close(e, w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(base[:, ::2], want[-1], atol=1e-12, rtol=1e-12)


def test_multi_empty_list():
    assert fastkd.embedding_ascent_multi_([], [], step_size=0.1) == []


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def _op_samples():
    e, grad, origin, mask, buf = _inputs((2, 3, 16), masked=True, buf=True, seed=7)
    e, grad, origin, buf = e.float(), grad.float(), origin.float(), buf.float()
    return [
        (e.clone(), grad, None, None, None, 0.1, 0, None, None, 0.0, True),
        (e.clone(), grad, origin, mask, buf.clone(), 0.1, 1, 0.05, 3.0, 0.9, False),
        (e.clone(), grad, origin, None, buf.clone(), 0.1, 2, 0.05, None, 0.5, True),
    ]


@pytest.mark.skipif(not hasattr(torch.ops.fastkd, "embedding_ascent_"), reason="fastkd._C not built")
def test_opcheck_compiled():
    for args in _op_samples():
        torch.library.opcheck(torch.ops.fastkd.embedding_ascent_.default, args)
    e1, g1 = torch.randn(3, 8), torch.randn(3, 8)
    e2, g2 = torch.randn(2, 2, 5), torch.randn(2, 2, 5)
    m2 = torch.tensor([[True, False], [True, True]])
    torch.library.opcheck(
        torch.ops.fastkd.embedding_ascent_multi_.default,
        ([e1, e2], [g1, g2], [], [None, m2], [torch.zeros(3, 8), torch.zeros(2, 2, 5)], 0.1, 0, None, 2.0, 0.9, True),
    )


def test_opcheck_triton():
    pytest.importorskip("triton")
    if "triton" not in [p.values[0] for p in BACKENDS if not p.marks]:
        pytest.skip("triton backend unavailable")
    from fastkd.ops.embedding_ascent import _triton_op

    single, multi = _triton_op("single"), _triton_op("multi")
    for args in _op_samples()[:2]:
        torch.library.opcheck(single, args)
    e1, g1 = torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    torch.library.opcheck(multi, ([e1], [g1], [], [None], [], 0.1, 1, None, None, 0.0, True))


@pytest.mark.parametrize("backend", ["cpu", "torch"] if DEVICE == "cpu" else ["cuda", "triton", "torch"])
def test_torch_compile_fullgraph(backend):
    if backend == "cpu" and not hasattr(torch.ops.fastkd, "embedding_ascent_"):
        pytest.skip("fastkd._C not built")

    def step(e, g, o, m, b):
        fastkd.embedding_ascent_(
            e, g, step_size=0.1, norm="l2", radius=0.2, origin=o, max_norm=4.0, mask=m, momentum=0.9,
            momentum_buffer=b, backend=backend,
        )  # fmt: skip
        return e * 1.0

    e, grad, origin, mask, buf = _inputs((2, 4, 16), masked=True, buf=True, seed=8)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ea, ba = e.clone(), buf.clone()
    out = compiled(ea, grad, origin, mask, ba)
    eb, bb = e.clone(), buf.clone()
    reference_embedding_ascent_(
        eb, grad, step_size=0.1, norm="l2", radius=0.2, origin=origin, max_norm=4.0, mask=mask, momentum=0.9,
        momentum_buffer=bb,
    )  # fmt: skip
    torch.testing.assert_close(ea, eb, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, eb, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ba, bb, atol=1e-12, rtol=1e-12)


def test_requires_grad_leaf_is_fine():
    # pseudo embeddings are usually a leaf parameter with requires_grad=True
    e = torch.randn(2, 3, 8, requires_grad=True)
    (e.square().sum()).backward()
    before = e.detach().clone()
    fastkd.embedding_ascent_(e, e.grad, step_size=0.1, maximize=False)
    assert e.requires_grad and not torch.equal(e.detach(), before)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _bad(**over):
    e = torch.randn(2, 3, 8)
    kw = {"embeds": e, "grad": torch.randn(2, 3, 8), "step_size": 0.1}
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [
        ({"grad": torch.randn(2, 3, 7)}, ValueError, "grad must have the shape of embeds"),
        ({"grad": torch.randn(3, 2, 8)}, ValueError, "grad must have the shape of embeds"),
        ({"origin": torch.randn(2, 3, 9), "radius": 1.0}, ValueError, "origin must have the shape of embeds"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "mask must have the leading shape"),
        ({"mask": torch.ones(2, 3)}, TypeError, "mask must be a boolean tensor"),
        ({"momentum_buffer": torch.zeros(2, 3, 4), "momentum": 0.5}, ValueError, "momentum_buffer must have the shape"),
        (
            {"momentum_buffer": torch.zeros(2, 3, 8, dtype=torch.float64)},
            TypeError,
            "momentum_buffer must have the dtype",
        ),
        ({"momentum_buffer": torch.zeros(2, 3, 8, dtype=torch.int32)}, TypeError, "momentum_buffer must be a floating"),
        ({"momentum": 0.9}, ValueError, "momentum_buffer is required when momentum > 0"),
        ({"momentum": -0.1, "momentum_buffer": torch.zeros(2, 3, 8)}, ValueError, "momentum must be finite and >= 0"),
        ({"momentum": math.nan, "momentum_buffer": torch.zeros(2, 3, 8)}, ValueError, "momentum must be finite"),
        ({"step_size": 0.0}, ValueError, "step_size must be positive and finite"),
        ({"step_size": -1.0}, ValueError, "step_size must be positive and finite"),
        ({"step_size": math.inf}, ValueError, "step_size must be positive and finite"),
        ({"step_size": math.nan}, ValueError, "step_size must be positive and finite"),
        ({"step_size": "0.1"}, TypeError, "step_size must be a positive finite number"),
        ({"radius": 0.0, "origin": torch.randn(2, 3, 8)}, ValueError, "radius must be positive and finite"),
        ({"radius": math.inf, "origin": torch.randn(2, 3, 8)}, ValueError, "radius must be positive and finite"),
        ({"max_norm": -2.0}, ValueError, "max_norm must be positive and finite"),
        ({"max_norm": math.nan}, ValueError, "max_norm must be positive and finite"),
        ({"norm": "l1"}, ValueError, "norm must be one of"),
        ({"radius": 1.0}, ValueError, "origin is required when radius is given"),
        ({"origin": torch.randn(2, 3, 8)}, ValueError, "origin is given but radius is None"),
        ({"embeds": torch.randint(0, 5, (2, 3, 8))}, TypeError, "embeds must be a floating-point tensor"),
        ({"grad": torch.randint(0, 5, (2, 3, 8))}, TypeError, "grad must be a floating-point tensor"),
        ({"embeds": torch.tensor(1.0), "grad": torch.tensor(1.0)}, ValueError, "embeds must have shape"),
        ({"grad": None}, TypeError, "grad must be a torch.Tensor"),
        ({"maximize": 1}, TypeError, "maximize must be a bool"),
        ({"backend": "tpu"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input(over, exc, match):
    kw = _bad(**over)
    with pytest.raises(exc, match=match):
        fastkd.embedding_ascent_(kw.pop("embeds"), kw.pop("grad"), **kw)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"grads": [torch.randn(3, 8)]}, ValueError, "grads must have one entry per embeds tensor"),
        ({"origins": [torch.randn(3, 8)], "radius": 1.0}, ValueError, "origins must have one entry per embeds"),
        ({"masks": [None]}, ValueError, "masks must have one entry per embeds tensor"),
        ({"momentum": 0.5}, ValueError, "momentum_buffers is required"),
        (
            {"grads": [torch.randn(3, 8), torch.randn(2, 5)]},
            ValueError,
            r"grads\[1\] must have the shape of embeds\[1\]",
        ),
        ({"embeds": torch.randn(3, 8)}, TypeError, "embeds must be a list or tuple"),
        ({"radius": 1.0}, ValueError, "origins is required when radius is given"),
    ],
)
def test_multi_bad_input(kw, exc, match):
    args = {"embeds": [torch.randn(3, 8), torch.randn(2, 4)], "grads": [torch.randn(3, 8), torch.randn(2, 4)]}
    args.update(kw)
    with pytest.raises(exc, match=match):
        fastkd.embedding_ascent_multi_(args.pop("embeds"), args.pop("grads"), step_size=0.1, **args)


def test_multi_mixed_dtypes_refused():
    with pytest.raises(TypeError, match=r"embeds\[1\] must have the dtype of embeds\[0\]"):
        fastkd.embedding_ascent_multi_(
            [torch.randn(3, 8), torch.randn(2, 4, dtype=torch.float64)],
            [torch.randn(3, 8), torch.randn(2, 4)],
            step_size=0.1,
        )
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="share memory"):
        fastkd.embedding_ascent_multi_([x, x[1:]], [torch.randn(3, 8), torch.randn(2, 8)], step_size=0.1)


@pytest.mark.skipif(not hasattr(torch.ops.fastkd, "embedding_ascent_"), reason="fastkd._C not built")
@pytest.mark.parametrize("device", op_devices())
def test_direct_op_call_errors_name_the_argument(device):
    torch.set_default_device(device)  # every tensor of the calls below (reset by the finally)
    try:
        _direct_op_calls()
    finally:
        torch.set_default_device(None)


def _direct_op_calls():
    e = torch.randn(2, 8)
    op = torch.ops.fastkd.embedding_ascent_
    with pytest.raises(RuntimeError, match="grad must have the shape of embeds"):
        op(e, torch.randn(2, 7), None, None, None, 0.1, 0, None, None, 0.0, True)
    with pytest.raises(RuntimeError, match="origin is required when radius is given"):
        op(e, torch.randn(2, 8), None, None, None, 0.1, 0, 1.0, None, 0.0, True)
    with pytest.raises(RuntimeError, match="step_size must be positive"):
        op(e, torch.randn(2, 8), None, None, None, -0.1, 0, None, None, 0.0, True)
    with pytest.raises(RuntimeError, match="norm code must be"):
        op(e, torch.randn(2, 8), None, None, None, 0.1, 7, None, None, 0.0, True)
    with pytest.raises(RuntimeError, match="mask must be a boolean tensor"):
        op(e, torch.randn(2, 8), None, torch.ones(2), None, 0.1, 0, None, None, 0.0, True)


# ---------------------------------------------------------------------------------------------
# The CUDA kernel, run on the host by the emulation of tests/cuda_emu/ (tests/emu_embed.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("norm", "mom", "rad", "mx"),
    [("l2", False, False, False), ("l2", True, True, True), ("sign", True, True, False), ("none", False, True, True),
     ("sign", False, False, True)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_cuda_kernel_emulated(norm, mom, rad, mx, dtype):
    from tests import emu_embed

    # several tensors in one launch (the multi-tensor row search), masks on some, H from 1 to 700
    # (1 to 8 elements per thread, blocks of 32 to 256 threads), a zero-gradient row, a NaN row
    shapes = [(3, 5, 37), (4, 700), (2, 1), (6, 64)]
    cpu = lambda xs: tuple(None if x is None else x.cpu() for x in xs)  # the emulation runs on the host
    ins = [cpu(_inputs(s, seed=30 + i, masked=i != 1, buf=mom)) for i, s in enumerate(shapes)]
    ins[3][1][2, 5] = float("nan")
    opts = _options(norm, mom, rad, mx)
    bdt = torch.float32 if dtype == torch.bfloat16 else dtype
    want = [_apply(reference_embedding_ascent_, *x, opts, dtype=dtype, buf_dtype=bdt) for x in ins]
    es = [x[0].to(dtype) for x in ins]
    before = [e.clone() for e in es]
    bufs = [x[4].to(bdt) for x in ins] if mom else None
    threads = emu_embed.embedding_ascent_(
        es, [x[1].to(dtype) for x in ins], origins=[x[2].to(dtype) for x in ins] if rad else None,
        masks=[x[3] for x in ins], bufs=bufs, **opts,
    )  # fmt: skip
    assert threads == 256  # the widest row (700) took 256 threads x 4
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    for i in range(len(shapes)):
        torch.testing.assert_close(es[i], want[i][0], atol=tol, rtol=tol, equal_nan=True)
        if mom:
            torch.testing.assert_close(bufs[i], want[i][1], atol=tol, rtol=tol, equal_nan=True)
        if ins[i][3] is not None:
            assert torch.equal(es[i][~ins[i][3]], before[i][~ins[i][3]])  # masked rows keep their bits
    kept_nan_row = ins[3][3][2]
    assert torch.isnan(es[3][2]).any() == bool(kept_nan_row)
