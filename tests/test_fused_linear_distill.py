"""fastkd.fused_linear_distill_loss on every backend against the float64 reference (logits
materialised), values and the gradients of every input that requires one.

Chunk sizes that do not divide N, ignored rows, V not a multiple of any block, leading shapes,
teacher_logits and teacher_topk instead of the teacher's hidden states, reduction="none" with an
upstream gradient, opcheck and torch.compile.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, INTERPRETED, TRITON_NUMPY_WARNINGS, backend_params, fused_op_params

import fastkd
from fastkd.ops import fused_linear_distill as fl
from fastkd.ops.fused_linear_distill import OP, default_chunk_size, reference_fused_linear_distill_loss

pytestmark = TRITON_NUMPY_WARNINGS

BACKENDS = backend_params(OP)
# max-normalised errors against float64; the GEMMs of the float32 paths accumulate in float32
TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.bfloat16: 3e-2}
DIVS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _err(a, e) -> float:
    a, e = a.detach().to(torch.float64), e.detach().to(torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def _inputs(N, Hs, Ht, V, *, dtype=torch.float32, bias=True, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (N,)
    t = {
        "student_hidden": torch.randn(*shape, Hs, generator=g),
        "student_weight": torch.randn(V, Hs, generator=g) / Hs**0.5 * 3,
        "teacher_hidden": torch.randn(*shape, Ht, generator=g),
        "teacher_weight": torch.randn(V, Ht, generator=g) / Ht**0.5 * 3,
    }
    if bias:
        t["student_bias"] = torch.randn(V, generator=g) * 0.5
        t["teacher_bias"] = torch.randn(V, generator=g) * 0.5
    return {k: v.to(DEVICE, dtype) for k, v in t.items()}


def _grads(fn, tensors: dict, requires: set, grad_out=None):
    leaves = {k: (v.detach().clone().requires_grad_(k in requires) if isinstance(v, torch.Tensor) else v)
              for k, v in tensors.items()}  # fmt: skip
    loss = fn(**leaves)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), {k: leaves[k].grad for k in requires}


def _compare(backend, tensors, requires, *, grad_out=None, dtype=torch.float32, **kw):
    keep = None
    if kw.get("labels") is not None:
        keep = kw["labels"] != -100
    if kw.get("mask") is not None:
        keep = kw["mask"] if keep is None else keep & kw["mask"]
    ref_kw = {k: v for k, v in kw.items() if k not in ("labels", "mask", "chunk_size")}
    t64 = {
        k: v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in tensors.items()
    }

    def ref(**a):
        return reference_fused_linear_distill_loss(**a, keep=keep, **ref_kw)

    def run(**a):
        return fastkd.fused_linear_distill_loss(**a, backend=backend, **kw)

    rl, rg = _grads(ref, t64, requires, grad_out)
    gl, gg = _grads(run, tensors, requires, grad_out)
    tol = TOL[dtype]
    assert _err(gl, rl) <= tol, f"loss {gl} vs {rl}"
    for k in requires:
        assert gg[k] is not None, k
        assert gg[k].dtype == tensors[k].dtype, k
        assert torch.isfinite(gg[k]).all(), k
        assert _err(gg[k], rg[k]) <= tol, f"{k}: error {_err(gg[k], rg[k])}"
    return gl


STUDENT = {"student_hidden", "student_weight", "student_bias"}
ALL = STUDENT | {"teacher_hidden", "teacher_weight", "teacher_bias"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVS)
@pytest.mark.parametrize("chunk", [None, 3, 1])
def test_divergences_and_chunks(backend, divergence, beta, chunk):
    N, V = 10, 97  # chunks of 3 do not divide N; V is not a multiple of any block
    t = _inputs(N, 12, 20, V, seed=1)
    labels = torch.arange(N, device=DEVICE)
    labels[[2, 7]] = -100
    _compare(backend, t, ALL, temperature=2.0, divergence=divergence, beta=beta, labels=labels, chunk_size=chunk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_reductions_leading_shape_and_mask(backend, reduction):
    t = _inputs(None, 8, 8, 61, seed=2, lead=(3, 5), bias=False)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.3
    go = torch.randn(3, 5, dtype=torch.float64).to(DEVICE) if reduction == "none" else None
    loss = _compare(backend, t, STUDENT - {"student_bias"} | {"teacher_weight"}, grad_out=go, reduction=reduction,
                    mask=mask, chunk_size=4)  # fmt: skip
    if reduction == "none":
        assert loss.shape == (3, 5) and (loss[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_shape(backend):
    V = 257 if INTERPRETED and backend == "triton" else 1271
    t = _inputs(19, 33, 7, V, seed=4)
    _compare(backend, t, ALL, temperature=1.3, chunk_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_teacher", [True, False])
def test_teacher_logits_instead_of_hidden(backend, grad_teacher):
    t = _inputs(9, 10, 10, 45, seed=5)
    tl = torch.nn.functional.linear(t.pop("teacher_hidden"), t.pop("teacher_weight"), t.pop("teacher_bias"))
    t["teacher_logits"] = tl
    req = STUDENT | ({"teacher_logits"} if grad_teacher else set())
    _compare(backend, t, req, temperature=2.0, divergence="jsd", beta=0.4, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_lse", [True, False])
def test_teacher_topk(backend, with_lse):
    t = _inputs(11, 10, 10, 53, seed=6)
    T = 2.0
    full = torch.nn.functional.linear(t.pop("teacher_hidden"), t.pop("teacher_weight"), t.pop("teacher_bias")).double()
    vals, ids = full.topk(7, dim=-1)
    lse = torch.logsumexp(full / T, -1) if with_lse else None
    t["teacher_topk"] = (ids, vals, lse)
    labels = torch.arange(11, device=DEVICE)
    labels[4] = -100
    _compare(backend, t, STUDENT, temperature=T, labels=labels, chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_with_k_equal_v_matches_the_full_teacher(backend):
    t = _inputs(6, 8, 8, 29, seed=7)
    T = 1.5
    full = torch.nn.functional.linear(t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"])
    vals, ids = full.double().topk(29, dim=-1)
    a = fastkd.fused_linear_distill_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"],
                                         t["teacher_weight"], student_bias=t["student_bias"],
                                         teacher_bias=t["teacher_bias"], temperature=T, backend=backend)  # fmt: skip
    b = fastkd.fused_linear_distill_loss(t["student_hidden"], t["student_weight"], student_bias=t["student_bias"],
                                         teacher_topk=(ids, vals, torch.logsumexp(full.double() / T, -1)),
                                         temperature=T, backend=backend)  # fmt: skip
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_dtypes(backend, dtype):
    t = _inputs(12, 16, 16, 70, dtype=dtype, seed=8)
    loss = _compare(backend, t, ALL, dtype=dtype, temperature=2.0, chunk_size=5)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_of_another_dtype_is_cast(backend):
    t = _inputs(5, 6, 6, 21, seed=9)
    t["teacher_hidden"] = t["teacher_hidden"].to(torch.bfloat16)
    t["teacher_weight"] = t["teacher_weight"].to(torch.bfloat16)
    t["teacher_bias"] = t["teacher_bias"].to(torch.bfloat16)
    got = fastkd.fused_linear_distill_loss(**t, backend=backend)
    want = reference_fused_linear_distill_loss(**{k: v.float() for k, v in t.items()})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_and_no_grad(backend):
    t = _inputs(4, 6, 6, 13, seed=10)
    req = {k: v.requires_grad_(True) for k, v in t.items()}
    loss = fastkd.fused_linear_distill_loss(**req, labels=torch.full((4,), -100, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert all((v.grad == 0).all() for v in req.values())
    with torch.no_grad():
        a = fastkd.fused_linear_distill_loss(**t, backend=backend)
    assert not a.requires_grad


def test_default_chunk_size():
    assert default_chunk_size(4096, 32000) == 256
    assert default_chunk_size(10, 32000) == 10
    assert default_chunk_size(100000, 10**7) == 8
    assert default_chunk_size(5, 7) == 5
    assert default_chunk_size(16384, 128256, "cuda") == 1040  # 2**27 / V rounded down to a multiple of 8
    assert default_chunk_size(16384, 128256, torch.device("cpu")) == 64


@pytest.mark.parametrize("get_op", fused_op_params(OP, "fused_linear_distill", fl._triton_op))
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("teacher", ["linear", "logits", "topk"])
def test_opcheck(get_op, reduce, teacher):
    op = get_op()
    t = _inputs(5, 4, 3, 9, seed=11)
    rs = torch.tensor([0.5, 0.0, 0.25, 0.25, 1.0], device=DEVICE)
    hs, ws, bs = t["student_hidden"], t["student_weight"], t["student_bias"]
    ht = wt = bt = tl = ids = tv = lse = None
    if teacher == "linear":
        ht, wt, bt = t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"]
    elif teacher == "logits":
        tl = torch.randn(5, 9, device=DEVICE)
    else:
        ids = torch.stack([torch.randperm(9)[:3] for _ in range(5)]).to(DEVICE)
        tv, lse = torch.randn(5, 3, device=DEVICE), torch.randn(5, device=DEVICE) + 3.0
    args = [hs, ws, bs, ht, wt, bt, tl, ids, tv, lse, rs, 2.0, 2 if teacher != "topk" else 0, 0.3, 4.0, reduce, 2]
    torch.library.opcheck(op, (*args, False, False))
    for x in (hs, ws, bs, ht, wt, bt, tl):
        if x is not None:
            x.requires_grad_(True)
    torch.library.opcheck(op, (*args, True, teacher != "topk"))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "cuda", "triton")])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compile_fullgraph(backend, reduction):
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU()).to(DEVICE)
    head = torch.nn.Linear(32, 50).to(DEVICE)
    x = torch.randn(3, 4, 16, device=DEVICE)
    th = torch.randn(3, 4, 8, device=DEVICE)
    tw = torch.randn(50, 8, device=DEVICE)
    labels = torch.randint(0, 50, (3, 4), device=DEVICE)
    labels[0, :2] = -100

    def step(x, th, tw, labels):
        out = fastkd.fused_linear_distill_loss(body(x), head.weight, th, tw, student_bias=head.bias, temperature=2.0,
                                               labels=labels, reduction=reduction, chunk_size=5, backend=backend)  # fmt: skip
        return out.sum()

    params = list(body.parameters()) + list(head.parameters())
    eager = step(x, th, tw, labels)
    eager.backward()
    ref = [p.grad.clone() for p in params]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    for _ in range(2):
        for p in params:
            p.grad = None
        loss = compiled(x, th, tw, labels)
        loss.backward()
        torch.testing.assert_close(loss, eager)
        for p, g in zip(params, ref):
            torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module(backend):
    t = _inputs(6, 5, 5, 17, seed=12)
    mod = fastkd.nn.FusedLinearDistillationLoss(temperature=2.0, divergence="reverse_kl", chunk_size=4, backend=backend)
    assert "reverse_kl" in repr(mod) and "chunk_size=4" in repr(mod)
    got = mod(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"],
              student_bias=t["student_bias"], teacher_bias=t["teacher_bias"])  # fmt: skip
    want = reference_fused_linear_distill_loss(**t, temperature=2.0, divergence="reverse_kl")
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size must be"):
        fastkd.nn.FusedLinearDistillationLoss(chunk_size=0)
    with pytest.raises(ValueError, match="divergence must be"):
        fastkd.nn.FusedLinearDistillationLoss(divergence="kld")


def _bad():
    h, w = torch.zeros(3, 4), torch.zeros(7, 4)
    th, tw = torch.zeros(3, 5), torch.zeros(7, 5)
    ids, tv = torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)
    ids[:, 1] = 1
    return [
        ((h.long(), w, th, tw), {}, TypeError, "student_hidden must be a floating-point"),
        ((h, torch.zeros(7, 5), th, tw), {}, ValueError, r"student_weight must have shape \[V, Hs\]"),
        ((h, w), {}, ValueError, "give exactly one teacher"),
        ((h, w, th, tw), {"teacher_logits": torch.zeros(3, 7)}, ValueError, "give exactly one teacher"),
        ((h, w, th), {}, ValueError, "teacher_hidden and teacher_weight must be given together"),
        ((h, w, th[:2], tw), {}, ValueError, "teacher_hidden must have the leading shape"),
        ((h, w, th, torch.zeros(6, 5)), {}, ValueError, "teacher_weight must have shape"),
        ((h, w, th, tw), {"student_bias": torch.zeros(6)}, ValueError, "student_bias must have shape"),
        ((h, w, th, tw), {"teacher_bias": torch.zeros(8)}, ValueError, "teacher_bias must have shape"),
        ((h, w), {"teacher_logits": torch.zeros(3, 6)}, ValueError, "teacher_logits must have shape"),
        ((h, w), {"teacher_topk": (ids, tv, None), "divergence": "jsd"}, ValueError, "divergence='kl' only"),
        ((h, w), {"teacher_topk": (ids, tv[:, :1])}, ValueError, "teacher_topk: teacher_logits must have the shape"),
        ((h, w), {"teacher_topk": ids}, TypeError, "teacher_topk must be a tuple"),
        ((h, w, th, tw), {"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ((h, w, th, tw), {"temperature": -1.0}, ValueError, "temperature must be positive"),
        ((h, w, th, tw), {"labels": torch.zeros(4, dtype=torch.long)}, ValueError, "labels must have"),
        ((h, w, th, tw), {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), _bad())
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastkd.fused_linear_distill_loss(*args, **kwargs)


def test_chunk_sweep_script_runs_and_writes_its_rows(tmp_path):
    """benchmarks/fld_chunk_sweep.py (a GPU measurement tool) on a tiny CPU case: every backend x
    chunk row is timed and written, and bad arguments are a clear error."""
    import json

    from benchmarks import fld_chunk_sweep

    out = tmp_path / "sweep.json"
    args = ["--device", "cpu", "--shape", "40x16x50", "--dtype", "float32", "--backends", "torch", "--reps", "1"]
    assert fld_chunk_sweep.main([*args, "--chunks", "8,64", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["provider"], r["chunk"]) for r in doc["rows"]] == [
        ("eager", None),
        ("fastkd-torch", 8),
        ("fastkd-torch", 64),
    ]
    assert doc["meta"]["shape"] == [40, 16, 50] and all(r["ms"] > 0 for r in doc["rows"])
    with pytest.raises(SystemExit):
        fld_chunk_sweep.main([*args, "--chunks", "0"])
