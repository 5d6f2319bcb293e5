"""fastkd.topk_distill_loss on every backend against a float64 reference (loss and student gradient).

The oracle is ``reference_topk_distill_loss`` in float64 with autograd; ``test_reference_*`` tie it
to an independent formulation (the KL between the K + 1 outcome distributions "one of the ids" /
"the tail") and to ``fastkd.distill_loss`` when K = V.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TRITON_NUMPY_WARNINGS, backend_params, fused_op_params
from conftest import LOGITS_TOL as TOL

import fastkd
from fastkd.ops import topk_distill as tk
from fastkd.ops.topk_distill import OP, reference_topk_distill_loss

pytestmark = TRITON_NUMPY_WARNINGS

BACKENDS = backend_params(OP)


def _case(N, V, K, *, dtype=torch.float32, seed=0, scale=2.0):
    """Student logits, the teacher's top-K ids and logits (float64, exact), and its full float64 logits.

    The teacher's values stay in float64 for every backend (they are cast to the kernel's float32
    inside), so the oracle sees the same teacher: a tail mass of float32 rounding noise would count
    in a float64 oracle (above its 1e-12 tolerance) but not in a float32 kernel.
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    tv, ids = t.topk(K, dim=-1)
    perm = torch.randperm(K, generator=g)  # ids in no particular order
    ids, tv = ids[:, perm], tv[:, perm]
    return s.to(DEVICE, dtype), ids.to(DEVICE), tv.to(DEVICE), t.to(DEVICE)


def _err(a, e) -> float:
    a, e = a.detach().to(torch.float64), e.detach().to(torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    if a.numel() == 0:
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def _reference(s, ids, tv, lse, *, grad_out=None, labels=None, mask=None, **kw):
    s64 = s.detach().to(torch.float64).requires_grad_(True)
    keep = None if labels is None else labels != -100
    if mask is not None:
        keep = mask if keep is None else keep & mask
    loss = reference_topk_distill_loss(
        s64,
        ids,
        tv.to(torch.float64),
        teacher_logsumexp=None if lse is None else lse.to(torch.float64),
        keep=keep,
        **kw,
    )
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(torch.float64)
    (g,) = torch.autograd.grad(loss, (s64,), go)
    return loss.detach(), g


def _run(backend, s, ids, tv, lse, *, grad_out=None, **kw):
    s_ = s.detach().clone().requires_grad_(True)
    loss = fastkd.topk_distill_loss(s_, ids, tv, teacher_logsumexp=lse, backend=backend, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), s_.grad


def _check(got, ref, dtype, what=""):
    loss, g = got
    rloss, rg = ref
    tol = TOL[dtype]
    assert torch.isfinite(loss).all() and torch.isfinite(g).all(), what
    assert _err(loss, rloss) <= tol["loss"], f"{what} loss {loss} vs {rloss}"
    assert g.dtype == dtype
    assert _err(g, rg) <= tol["grad"], f"{what} grad error {_err(g, rg)}"


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_reference_is_the_kl_of_the_coarsened_distributions(T):
    s, ids, tv, t_full = _case(5, 40, 7, dtype=torch.float64, seed=1)
    lse = torch.logsumexp(t_full / T, -1)
    got = reference_topk_distill_loss(
        s, ids, tv, teacher_logsumexp=lse, temperature=T, reduction="none", scale_by_t2=False
    )
    # independent: outcomes = the K ids + "anything else", for both distributions
    q_full = F.softmax(s / T, -1)
    p_full = F.softmax(t_full / T, -1)
    qk = q_full.gather(-1, ids)
    pk = p_full.gather(-1, ids)
    q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    p = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    want = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(got, want)
    # without the logsumexp: the renormalised top-K against the student's probabilities at the ids
    got = reference_topk_distill_loss(s, ids, tv, temperature=T, reduction="none", scale_by_t2=False)
    pr = F.softmax(tv / T, -1)
    torch.testing.assert_close(got, (pr * (pr.log() - qk.log())).sum(-1))


@pytest.mark.parametrize("with_lse", [True, False])
def test_reference_equals_distill_loss_when_k_is_v(with_lse):
    s, ids, _tv, t_full = _case(6, 23, 23, dtype=torch.float64, seed=2)
    T = 1.7
    lse = torch.logsumexp(t_full / T, -1) if with_lse else None
    got = reference_topk_distill_loss(s, ids, t_full.gather(-1, ids), teacher_logsumexp=lse, temperature=T)
    want = fastkd.reference_distill_loss(s, t_full, temperature=T)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# Every backend against the float64 reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_lse", [True, False])
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize(("N", "V", "K"), [(7, 33, 5), (4, 1271, 17), (3, 50, 50), (5, 20, 1)])
def test_backends_against_float64(backend, with_lse, T, N, V, K):
    s, ids, tv, t_full = _case(N, V, K, seed=N + V + K)
    lse = torch.logsumexp(t_full / T, -1) if with_lse else None
    labels = torch.arange(N, device=DEVICE)
    labels[1] = -100
    kw = {"temperature": T, "labels": labels}
    _check(_run(backend, s, ids, tv, lse, **kw), _reference(s, ids, tv, lse, **kw), torch.float32, f"{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_reductions_mask_and_leading_shape(backend, reduction):
    s, ids, tv, t_full = _case(12, 37, 6, seed=3)
    s, ids, tv = s.reshape(3, 4, 37), ids.reshape(3, 4, 6), tv.reshape(3, 4, 6)
    lse = torch.logsumexp(t_full / 2.0, -1).reshape(3, 4)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.3
    go = torch.randn(3, 4, dtype=torch.float64).to(DEVICE) if reduction == "none" else None
    kw = {"temperature": 2.0, "reduction": reduction, "mask": mask}
    got = _run(backend, s, ids, tv, lse, grad_out=go, **kw)
    ref = _reference(s, ids, tv, lse, grad_out=go, **kw)
    _check(got, ref, torch.float32, reduction)
    if reduction == "none":
        assert got[0].shape == (3, 4) and (got[0][~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_dtypes(backend, dtype):
    s, ids, tv, t_full = _case(6, 129, 9, dtype=dtype, seed=4)
    lse = torch.logsumexp(t_full / 2.0, -1)
    got = _run(backend, s, ids, tv, lse, temperature=2.0)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check(got, _reference(s, ids, tv, lse, temperature=2.0), dtype, str(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_and_ignored_rows_not_read(backend):
    s, ids, tv, t_full = _case(4, 31, 4, seed=5)
    lse = torch.logsumexp(t_full, -1)
    labels = torch.tensor([0, -100, 2, -100], device=DEVICE)
    s_bad = s.clone()
    s_bad[1] = float("nan")
    tv_bad = tv.clone()
    tv_bad[3] = float("nan")
    got = _run(backend, s_bad, ids.to(torch.int32), tv_bad, lse, labels=labels)
    ref = _reference(s, ids, tv, lse, labels=labels)
    _check(got, ref, torch.float32)
    assert (got[1][1] == 0).all() and (got[1][3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    s, ids, tv, _ = _case(3, 11, 2, seed=6)
    loss, g = _run(backend, s, ids, tv, None, mask=torch.zeros(3, dtype=torch.bool, device=DEVICE))
    assert loss.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("get_op", fused_op_params(OP, "topk_distill", tk._triton_op))
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("with_lse", [True, False])
def test_opcheck(get_op, reduce, with_lse):
    op = get_op()
    s, ids, tv, t_full = _case(4, 9, 3, seed=7)
    # the raw op takes the teacher's values in the accumulation dtype (float32 here); the public
    # function casts them
    tv = tv.to(torch.float32)
    lse = torch.logsumexp(t_full, -1).to(torch.float32) if with_lse else None
    rs = torch.tensor([0.5, 0.0, 0.25, 0.25], device=DEVICE)
    torch.library.opcheck(op, (s, ids, tv, lse, rs, 2.0, 4.0, reduce, False))
    s.requires_grad_(True)
    torch.library.opcheck(op, (s, ids, tv, lse, rs, 2.0, 4.0, reduce, True))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "cuda", "triton")])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 50).to(DEVICE)
    x = torch.randn(3, 4, 16, device=DEVICE)
    _, ids, tv, t_full = _case(12, 50, 5, seed=8)
    ids, tv, lse = (
        ids.reshape(3, 4, 5),
        tv.float().reshape(3, 4, 5),
        torch.logsumexp(t_full / 2, -1).float().reshape(3, 4),
    )
    labels = torch.randint(0, 50, (3, 4), device=DEVICE)
    labels[0, :2] = -100

    def step(x, ids, tv, lse, labels):
        return fastkd.topk_distill_loss(
            model(x), ids, tv, teacher_logsumexp=lse, temperature=2.0, labels=labels, backend=backend
        )

    eager = step(x, ids, tv, lse, labels)
    eager.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    for _ in range(2):
        model.zero_grad()
        loss = compiled(x, ids, tv, lse, labels)
        loss.backward()
        torch.testing.assert_close(loss, eager)
        for p, g in zip(model.parameters(), ref):
            torch.testing.assert_close(p.grad, g)


def _bad():
    s = torch.zeros(2, 5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    ids[:, 1], ids[:, 2] = 1, 2
    tv = torch.zeros(2, 3)
    return [
        ((s.long(), ids, tv), {}, TypeError, "student_logits must be a floating-point"),
        ((s, ids.float(), tv), {}, TypeError, "teacher_ids must be an integer"),
        ((s, ids[:1], tv), {}, ValueError, "teacher_ids must have shape"),
        ((s, torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6)), {}, ValueError, "1 <= K <= V"),
        ((s, ids, tv[:, :2]), {}, ValueError, "teacher_logits must have the shape of teacher_ids"),
        ((s, ids + 3, tv), {}, ValueError, r"teacher_ids must lie in \[0, V\)"),
        ((s, ids, tv), {"teacher_logsumexp": torch.zeros(3)}, ValueError, "teacher_logsumexp must have shape"),
        ((s, ids, tv), {"temperature": 0.0}, ValueError, "temperature must be positive"),
        ((s, ids, tv), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((s, ids, tv), {"labels": torch.zeros(3, dtype=torch.long)}, ValueError, "labels must have"),
        ((s, ids, tv), {"mask": torch.ones(2)}, TypeError, "mask must be a boolean"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), _bad())
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastkd.topk_distill_loss(*args, **kwargs)
