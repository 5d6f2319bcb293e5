"""The distillation methods (zskd, asdfd, t3, baselines) and the student builder, on tiny models."""

from __future__ import annotations

import copy
import json
import os

import _tiny
import pytest
import torch
import torch.nn.functional as F

from fastkd import data as fdata
from fastkd.loop import DistillError, distill
from fastkd.methods import METHODS, OptionError, get_method
from fastkd.methods.asdfd import rotate_pairs
from fastkd.methods.base import MethodContext, StepInfo
from fastkd.methods.t3 import T3, bigram_diversity, generate_dataset
from fastkd.methods.zskd import _StraightThroughEmbed, categorical_sample, gumbel_softmax_st, inverse_cdf_sample
from fastkd.models import evaluate, load_classifier, predict_logits
from fastkd.student import (
    EmbeddingBridge,
    StudentConfigError,
    _pca_basis,
    build_student,
    count_parameters,
    select_layers,
    student_dims,
)

ZSKD_MLM = {"generator": "mlm", "gen_every": 20, "gen_steps": 2}
CASES = [
    pytest.param("random", {}, id="random"),
    pytest.param("ood", {}, id="ood"),
    pytest.param("ood", {"balance": 64, "balance_cache": "none"}, id="ood-balance"),  # balanced draws, 64 labelled rows
    pytest.param("supervised", {}, id="supervised"),
    pytest.param("zskd", ZSKD_MLM, id="zskd-mlm"),
    pytest.param("zskd", {"generator": "embedding"}, id="zskd-embedding"),
    pytest.param("asdfd", {}, id="asdfd"),  # OOD text given: rows start from OOD sentences
    pytest.param("asdfd", {"start": "words"}, id="asdfd-words"),  # the text-free start
    pytest.param("t3", _tiny.T3_OPTIONS, id="t3"),
]


@pytest.fixture(scope="module")
def teacher_and_tok():
    model, tok = load_classifier(_tiny.teacher_dir())
    return model, tok


def _kd_log(out_dir: str, key: str) -> list[float]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    return [r[key] for r in recs if key in r and not r.get("eval")]


# --------------------------------------------------------------------------------------------
# every method learns
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "options"), CASES)
def test_method_learns_the_teacher(tmp_path, teacher_and_tok, method, options):
    """A hundred steps: the KD divergence to the teacher on held-out task data (used for evaluation
    only) falls, the KD loss on the method's own data falls (where it is not adversarial or noise), and
    the student's agreement with the teacher rises well above chance. The student is narrower than
    the teacher and starts with random blocks (only its embeddings are the teacher's, projected)."""
    teacher, tok = teacher_and_tok
    eval_rows = fdata.load_labeled(_tiny.data_files()["eval"])
    opts = {**options}
    if method == "t3":
        opts["generator"] = _tiny.causal_lm_dir()
    cfg = _tiny.config(
        method, tmp_path, max_steps=100, batch_size=16, student_hidden=16, method_options=opts, log_every=5
    )
    # the student the loop starts from (same seed, same builder), and its divergence from the teacher
    start = build_student(teacher, layers=1, hidden=16, init="embeddings", seed=cfg.seed)
    t_logits = predict_logits(teacher, tok, eval_rows, max_length=24)
    s_logits = predict_logits(start, tok, eval_rows, max_length=24)
    start_kl = float(
        F.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    )
    start_agreement = float((s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean())
    assert evaluate(teacher, tok, eval_rows)["accuracy"] == 1.0  # the teacher is exact on this task
    result = distill(cfg)
    assert result.steps == 100 and not result.interrupted
    assert result.final["kl_to_teacher"] < 0.8 * start_kl, (start_kl, result.final)
    agreement = result.final["agreement"]
    assert agreement == pytest.approx(result.final["accuracy"])  # the teacher is exact: agreement is accuracy
    assert agreement >= 0.7 and agreement >= start_agreement + 0.15, (start_agreement, agreement)
    # the KD loss on the method's own data, where that data is neither adversarial nor pure noise
    if method == "t3":  # the generator's numbers reach the log
        assert _kd_log(tmp_path, "t3_pool_confidence") and _kd_log(tmp_path, "t3_specificity")
    own = {"ood": "kd_ood", "supervised": "kd_train", "zskd": "kd_ood", "t3": "kd_generated"}
    if method in own and options.get("generator") != "embedding":
        kd = _kd_log(tmp_path, own[method])
        assert len(kd) == 20
        assert sum(kd[-3:]) / 3 < 0.8 * sum(kd[:3]) / 3, kd


# --------------------------------------------------------------------------------------------
# data-free means data-free; the teacher is never changed
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "options"), [c for c in CASES if c.id != "supervised"])
def test_data_free_methods_never_read_the_training_split(tmp_path, monkeypatch, method, options):
    files = _tiny.data_files()
    real = fdata.load_labeled
    seen = []

    def guarded(source, **kw):
        seen.append(source)
        if os.fspath(source) == files["train"]:
            raise AssertionError(f"{method} read the training split")
        return real(source, **kw)

    monkeypatch.setattr(fdata, "load_labeled", guarded)
    opts = {**options, **({"generator": _tiny.causal_lm_dir()} if method == "t3" else {})}
    result = distill(_tiny.config(method, tmp_path, max_steps=2, train=files["train"], method_options=opts))
    assert result.steps == 2
    assert seen == [files["eval"]]  # the eval split, for evaluation only


def test_supervised_reads_the_training_split(tmp_path, monkeypatch):
    """The control for the test above: the guard does catch a method that reads it."""
    files = _tiny.data_files()
    real = fdata.load_labeled

    def guarded(source, **kw):
        if os.fspath(source) == files["train"]:
            raise AssertionError("read the training split")
        return real(source, **kw)

    monkeypatch.setattr(fdata, "load_labeled", guarded)
    with pytest.raises(AssertionError, match="read the training split"):
        distill(_tiny.config("supervised", tmp_path, max_steps=1))


@pytest.mark.parametrize(
    ("method", "options"),
    [c for c in CASES if c.id in ("zskd-mlm", "zskd-embedding", "asdfd", "t3")],
)
def test_teacher_is_frozen_and_unchanged(tmp_path, teacher_and_tok, method, options):
    teacher, tok = teacher_and_tok
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # the loop must put it in eval mode itself
    opts = {**options, **({"generator": _tiny.causal_lm_dir()} if method == "t3" else {})}
    distill(_tiny.config(method, tmp_path, max_steps=3, method_options=opts), teacher=teacher, tokenizer=tok)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
def test_registry_and_option_parsing():
    assert set(METHODS) == {"zskd", "asdfd", "t3", "random", "ood", "supervised", "offline"}
    assert [m for m, c in METHODS.items() if not c.data_free] == ["supervised"]
    with pytest.raises(OptionError, match=r"unknown method 'nope'.*zskd"):
        get_method("nope")
    zskd = get_method("zskd")
    opt = zskd.parse_options({"mask-prob": "0.5", "gen_steps": "3", "generator_path": "none"})
    assert opt.mask_prob == 0.5 and opt.gen_steps == 3 and opt.generator_path is None
    with pytest.raises(OptionError, match=r"unknown option 'mask_rate'.*mask_prob"):
        zskd.parse_options({"mask_rate": 0.1})
    with pytest.raises(OptionError, match="'gen_steps' must be int"):
        zskd.parse_options({"gen_steps": "many"})
    with pytest.raises(OptionError, match="mask_prob must be in"):
        zskd.parse_options({"mask_prob": 1.5})
    with pytest.raises(OptionError, match="generator must be"):
        zskd.parse_options({"generator": "gan"})
    with pytest.raises(OptionError, match="prompt must contain"):
        T3.parse_options({"prompt": "no placeholders"})
    assert get_method("random").parse_options({"min_tokens": "2"}).min_tokens == 2


def test_t3_without_generator_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="t3 needs a causal LM"):
        distill(_tiny.config("t3", tmp_path, method_options={}))


# --------------------------------------------------------------------------------------------
# the student builder and the embedding bridge
# --------------------------------------------------------------------------------------------
def test_select_layers():
    assert select_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert select_layers(6, 3) == [0, 2, 5]
    assert select_layers(6, 1) == [5]
    assert select_layers(4, 4) == [0, 1, 2, 3]


def test_student_copies_the_kept_teacher_layers():
    teacher = _tiny_teacher(layers=3)
    student = build_student(teacher, layers=2)
    t, s = teacher.state_dict(), student.state_dict()
    for name, value in s.items():
        if ".layer.0." in name:
            assert torch.equal(value, t[name])
        elif ".layer.1." in name:
            assert torch.equal(value, t[name.replace(".layer.1.", ".layer.2.")])
        else:
            assert torch.equal(value, t[name]), name
    assert student.config.num_hidden_layers == 2
    assert count_parameters(student) < count_parameters(teacher)
    assert student.config.id2label == teacher.config.id2label


def test_narrow_student_starts_from_projected_embeddings():
    teacher = _tiny_teacher(layers=2, hidden=32)
    student = build_student(teacher, layers=1, hidden=16)
    assert student.config.hidden_size == 16 and student.config.num_attention_heads == 1  # head size 16 kept
    assert student.config.intermediate_size == 32  # the teacher's 2x ratio
    e_t = teacher.get_input_embeddings().weight
    e_s = student.get_input_embeddings().weight
    basis = _pca_basis(e_t, 16)
    assert torch.allclose(e_s, e_t @ basis, atol=1e-6)
    assert torch.allclose(basis.T @ basis, torch.eye(16), atol=1e-5)
    # the projection keeps more of the teacher's embeddings than a random 16-dim subspace would
    q, _ = torch.linalg.qr(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)))
    kept = (e_t @ basis).norm() / e_t.norm()
    assert kept > (e_t @ q).norm() / e_t.norm()
    pos_t = teacher.bert.embeddings.position_embeddings.weight
    assert torch.allclose(student.bert.embeddings.position_embeddings.weight, pos_t @ basis, atol=1e-6)
    bridge = EmbeddingBridge(teacher, student)
    assert torch.allclose(bridge.matrix, basis, atol=1e-3)  # (a small ridge term shrinks it slightly)
    same = EmbeddingBridge(teacher, build_student(teacher, layers=1))
    assert torch.allclose(same.matrix, torch.eye(32), atol=1e-3)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_narrow_student_blocks_are_projected_teacher_blocks(arch):
    """Each student head / neuron is one of the teacher's, read and written through the basis; the
    kept heads are the strongest (|W_out cols| x |W_value rows|); pooler and classifier projected."""
    import math

    if arch == "bert":
        teacher = _tiny_teacher(layers=3, hidden=32)  # 2 heads of 16
        names = {"q": "bert.encoder.layer.{}.attention.self.query.weight", "v": "bert.encoder.layer.{}.attention.self.value.weight",
                 "o": "bert.encoder.layer.{}.attention.output.dense.weight", "i": "bert.encoder.layer.{}.intermediate.dense.weight",
                 "ln": "bert.encoder.layer.{}.output.LayerNorm.weight"}  # fmt: skip
    else:
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        torch.manual_seed(0)
        teacher = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2,
                                                                       hidden_dim=64, max_position_embeddings=64))  # fmt: skip
        names = {"q": "distilbert.transformer.layer.{}.attention.q_lin.weight", "v": "distilbert.transformer.layer.{}.attention.v_lin.weight",
                 "o": "distilbert.transformer.layer.{}.attention.out_lin.weight", "i": "distilbert.transformer.layer.{}.ffn.lin1.weight",
                 "ln": "distilbert.transformer.layer.{}.output_layer_norm.weight"}  # fmt: skip
    with torch.no_grad():  # make the layer norms non-trivial
        for n, prm in teacher.named_parameters():
            if "norm" in n.lower() and n.endswith("weight"):
                prm.uniform_(0.5, 1.5)
    student = build_student(teacher, layers=2, hidden=16)  # 1 head of 16, 32 neurons
    assert "projected likewise" in student.config.fastkd_init
    t, s = teacher.state_dict(), student.state_dict()
    word = teacher.get_input_embeddings().weight.detach()
    basis = _pca_basis(word, 16)
    for i, j in enumerate(select_layers(3, 2)):
        q_t, q_s = t[names["q"].format(j)], s[names["q"].format(i)]
        candidates = [q_t[h * 16 : (h + 1) * 16] @ basis for h in range(2)]
        match = [h for h, c in enumerate(candidates) if torch.allclose(c, q_s, atol=1e-6)]
        assert len(match) == 1
        w_o, w_v = t[names["o"].format(j)], t[names["v"].format(j)]
        score = [w_o[:, h * 16 : (h + 1) * 16].norm() * w_v[h * 16 : (h + 1) * 16].norm() for h in range(2)]
        assert match[0] == int(torch.stack(score).argmax())
        w_i = t[names["i"].format(j)] @ basis
        rows = s[names["i"].format(i)]
        assert rows.shape == (32, 16)
        hits = [int(torch.isclose(w_i, r, atol=1e-6).all(1).nonzero()[0]) for r in rows]
        assert hits == sorted(set(hits))  # distinct teacher neurons, in order
        gain = math.sqrt(32 / 16) * float((word @ basis).norm() / word.norm())
        assert torch.allclose(s[names["ln"].format(i)], (basis * basis).T @ t[names["ln"].format(j)] * gain, atol=1e-5)
    head = "classifier.weight"
    if arch == "bert":
        assert torch.allclose(s[head], t[head] @ basis, atol=1e-6)
        assert torch.allclose(s["bert.pooler.dense.weight"], basis.T @ t["bert.pooler.dense.weight"] @ basis, atol=1e-6)
    else:
        assert torch.allclose(s["pre_classifier.weight"], basis.T @ t["pre_classifier.weight"] @ basis, atol=1e-6)
    assert torch.equal(s["classifier.bias"], t["classifier.bias"])


def test_student_size_errors():
    teacher = _tiny_teacher(layers=2, hidden=32)
    with pytest.raises(StudentConfigError, match="not smaller than the teacher in any dimension"):
        student_dims(teacher.config, layers=2, hidden=32)
    with pytest.raises(StudentConfigError, match="not smaller"):
        student_dims(teacher.config, layers=4, hidden=64, heads=4, intermediate=128)
    with pytest.raises(StudentConfigError, match="divisible"):
        student_dims(teacher.config, hidden=30, heads=4)
    with pytest.raises(StudentConfigError, match="positive integer"):
        student_dims(teacher.config, layers=0)
    with pytest.raises(StudentConfigError, match="init"):
        build_student(teacher, layers=1, init="magic")
    assert student_dims(teacher.config) == {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}


def _tiny_teacher(layers: int = 2, hidden: int = 32):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(_tiny.bert_config(64, layers=layers, hidden=hidden))


# --------------------------------------------------------------------------------------------
# pieces of the methods
# --------------------------------------------------------------------------------------------
def test_straight_through_gumbel_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 11, requires_grad=True)
    weight = torch.randn(11, 4)
    y_soft, index = gumbel_softmax_st(logits, 0.7, torch.Generator().manual_seed(1))
    assert torch.isfinite(y_soft).all() and torch.allclose(y_soft.sum(-1), torch.ones(5))
    # Gumbel-max: the hard sample is distributed as softmax(logits), at any temperature
    probs = torch.tensor([0.7, 0.2, 0.1])
    _, idx = gumbel_softmax_st(probs.log().expand(20000, 3), 0.3, torch.Generator().manual_seed(2))
    assert torch.allclose(torch.bincount(idx, minlength=3) / 20000.0, probs, atol=0.015)
    assert torch.equal(index, y_soft.argmax(-1))
    out = _StraightThroughEmbed.apply(y_soft, index, weight)
    assert torch.equal(out, weight[index])  # the hard sample forward
    g = torch.randn(5, 4)
    (grad_st,) = torch.autograd.grad(out, logits, g, retain_graph=True)
    (grad_soft,) = torch.autograd.grad(y_soft @ weight, logits, g)  # the relaxed sample backward
    assert torch.allclose(grad_st, grad_soft, atol=1e-6)
    # same generator seed, same sample
    assert torch.equal(gumbel_softmax_st(logits, 0.7, torch.Generator().manual_seed(1))[1], index)


def test_categorical_sample_matches_the_gumbel_max_distribution():
    # the hard fill of a step without generator training: the distribution of the Gumbel-max sample
    # (softmax(logits), whatever tau), a zero-probability entry never drawn, across block boundaries
    V = 700  # two full blocks of 256 and a tail of 188
    probs = torch.zeros(V)
    probs[[0, 255, 256, 600, 699]] = torch.tensor([0.3, 0.1, 0.25, 0.15, 0.2])
    logits = probs.log().expand(40000, V).contiguous()  # -inf where the probability is 0
    idx = categorical_sample(logits, torch.Generator().manual_seed(4))
    freq = torch.bincount(idx, minlength=V).double() / idx.numel()
    assert set(idx.unique().tolist()) <= {0, 255, 256, 600, 699}
    assert torch.allclose(freq, probs.double(), atol=0.01)
    _, gidx = gumbel_softmax_st(logits[:20000], 0.3, torch.Generator().manual_seed(5))
    gfreq = torch.bincount(gidx, minlength=V).double() / gidx.numel()
    assert torch.allclose(freq, gfreq, atol=0.015)
    # seeded: the same generator state, the same draws; one uniform number per row
    big = torch.randn(64, 3001)
    a = categorical_sample(big, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert a.dtype == torch.int64 and a.shape == (64,) and torch.equal(a, categorical_sample(big, g))
    ref = torch.Generator().manual_seed(3)
    torch.rand(64, generator=ref, dtype=torch.float64)
    assert torch.equal(g.get_state(), ref.get_state())


def test_inverse_cdf_sample_edges():
    # u = 0 -> the first entry with mass; u -> 1 -> the last entry with mass, also when rounding
    # puts the target at the total; against a float64 CDF search for random rows and uniforms
    probs = torch.softmax(torch.randn(4, 1000, dtype=torch.float64), -1).float()
    probs[:, :3] = 0.0
    probs[:, -7:] = 0.0
    u = torch.tensor([0.0, 0.5, 1.0 - 1e-16, 1.0], dtype=torch.float64)
    out = inverse_cdf_sample(probs, u)
    assert out[0] == 3 and out[2] == 992 and out[3] == 992
    torch.manual_seed(0)
    for V in (5, 256, 257, 1000):
        p = torch.softmax(3 * torch.randn(50, V), -1)
        u = torch.rand(50, dtype=torch.float64)
        c = p.double().cumsum(-1)
        want = torch.searchsorted(c, (u * c[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp_max(V - 1)
        assert torch.equal(inverse_cdf_sample(p, u), want), V


def test_rotations_preserve_norms_and_compose():
    x = torch.randn(4, 3, 7)
    k = torch.tensor([0, 1, 2, 3])
    r = rotate_pairs(x, k)
    assert torch.allclose(r.norm(dim=-1), x.norm(dim=-1), atol=1e-6)
    assert torch.equal(r[0], x[0])
    assert torch.allclose(rotate_pairs(r, (4 - k) % 4), x, atol=1e-6)
    assert torch.equal(r[..., 6], x[..., 6])  # odd last coordinate untouched
    assert torch.allclose(r[1, :, 0], -x[1, :, 1]) and torch.allclose(r[1, :, 1], x[1, :, 0])


def test_bigram_diversity():
    d = bigram_diversity(["a b c", "a b c", "x y z", ""])
    assert d[0] == 0.0 and d[1] == 0.0 and d[2] == 1.0 and d[3] == 1.0
    assert bigram_diversity(["only one"]) == [1.0]


def _ctx(teacher, tok, student=None, **kw):
    from fastkd.student import EmbeddingBridge

    student = student if student is not None else build_student(teacher, layers=1)
    base = {
        "teacher": teacher, "student": student, "tokenizer": tok, "device": torch.device("cpu"), "num_labels": 2,
        "pair_task": False, "max_length": 24, "temperature": 2.0, "divergence": "kl", "seed": 0,
        "micro_batch_size": 8, "ood_texts": _tiny.ood_texts(50, 9), "bridge": EmbeddingBridge(teacher, student),
        "progress": False,
    }  # fmt: skip
    base.update(kw)
    return MethodContext(**base)


def _info(step=0, rows=8, seed=0):
    return StepInfo(step=step, micro=0, rank=0, world=1, batch_size=rows, offset=step * rows,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip


def test_zskd_masks_real_tokens_and_trains_its_generator(teacher_and_tok):
    teacher, tok = teacher_and_tok
    cls = get_method("zskd")
    method = cls(_ctx(teacher, tok), cls.parse_options({"mask_prob": 0.3, "gen_steps": 2, "gen_every": 5}))
    method.setup()
    clean, adv = method.batch(_info())
    changed = clean.input_ids != adv.input_ids
    special = torch.isin(clean.input_ids, torch.tensor(method.ctx.special_ids()))
    assert not (changed & special).any()  # [CLS], [SEP], padding never refilled
    assert changed.any()
    before = [p.detach().clone() for p in method.gen_params]
    logs = method.before_step(0, torch.Generator().manual_seed(3))
    assert "gen_divergence" in logs and logs["gen_divergence"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, method.gen_params))  # gradients reached it
    assert all(torch.isfinite(p).all() for p in method.gen_params)
    assert method.before_step(1, torch.Generator().manual_seed(3)) == {}  # only at cycle starts
    assert method.ctx.student.training  # restored after the generator steps


def test_random_tokens_are_plain_words(teacher_and_tok):
    teacher, tok = teacher_and_tok
    cls = get_method("random")
    method = cls(_ctx(teacher, tok, pair_task=True), cls.parse_options({}))
    method.setup()
    (view,) = method.batch(_info(rows=16))
    ids, mask = view.input_ids, view.attention_mask.bool()
    assert ids.shape[1] <= 24
    assert (ids[:, 0] == tok.cls_token_id).all()
    inner = ids[mask & (ids != tok.cls_token_id) & (ids != tok.sep_token_id)]
    assert not torch.isin(inner, torch.tensor(method.ctx.special_ids())).any()
    assert (view.token_type_ids[mask] == 1).any()  # pairs get a second segment
    (again,) = method.batch(_info(rows=16))
    assert torch.equal(again.input_ids, ids)  # a function of the step's generator


def test_ood_pairs_for_pair_tasks(teacher_and_tok):
    teacher, tok = teacher_and_tok
    cls = get_method("ood")
    method = cls(_ctx(teacher, tok, pair_task=True), cls.parse_options({}))
    method.setup()
    texts, pairs = method.sampler.rows(0, 20)
    assert len(pairs) == 20 and all(isinstance(p, str) for p in pairs)
    related = sum(set(p.split()) <= set(t.split()) for t, p in zip(texts, pairs))
    assert 0 < related < 20  # both related (cropped copies) and unrelated pairs
    (view,) = method.batch(_info())
    assert (view.token_type_ids == 1).any()


def test_balanced_sampler_draws_each_class_equally_and_by_position():
    """BalancedSampler: the first `size` stream rows are labelled once; draws are class-uniform whatever
    the label skew, a pure function of the stream position (a resumed run reads the same rows), and
    reproducible from a generator for random_rows. size is capped at the corpus; < 1 is refused."""
    from fastkd.methods.base import BalancedSampler, TextSampler

    texts = [f"text {i}" for i in range(500)]
    base = TextSampler(texts, seed=3, pair_task=False, bucket=8)

    # a skewed labeller: 80% class 0, 15% class 1, 5% class 2
    def skew(ts, ps):
        return torch.tensor([0 if int(t.split()[1]) % 20 < 16 else 1 if int(t.split()[1]) % 20 < 19 else 2 for t in ts])

    calls = []
    s = BalancedSampler(base, 200, lambda ts, ps: calls.append(len(ts)) or skew(ts, ps))
    assert calls == [200] and set(s.texts) <= set(texts) and s.texts == base.rows(0, 200)[0]
    shares = s.label_shares(3)
    assert shares[0] > 0.6 and 0 < shares[2] < 0.15
    drawn, _ = s.rows(0, 3000)
    got = skew(drawn, None)
    for k in range(3):
        assert abs(float((got == k).float().mean()) - 1 / 3) < 0.04, k
    assert s.rows(1234, 16) == (drawn[1234:1250], None)  # position-pure
    a, _ = s.random_rows(32, torch.Generator().manual_seed(5))
    b, _ = s.random_rows(32, torch.Generator().manual_seed(5))
    assert a == b and set(a) <= set(s.texts)
    assert len(BalancedSampler(base, 10_000, skew).texts) == 500
    with pytest.raises(ValueError, match="balance: expected a number of OOD rows to label >= 1"):
        BalancedSampler(base, 0, skew)


def test_ood_and_zskd_balance_option(teacher_and_tok):
    """-O balance=N: ood and zskd draw from the first N stream rows, class-balanced by the tiny
    teacher's labels (pairs kept on a pair task); off by default; negative values are one-line errors."""
    from fastkd.methods.base import BalancedSampler, TextSampler

    teacher, tok = teacher_and_tok
    ood = get_method("ood")
    plain = ood(_ctx(teacher, tok), ood.parse_options({}))
    plain.setup()
    assert isinstance(plain.sampler, TextSampler) and plain.sampler.bucket == 8
    flat = ood(_ctx(teacher, tok), ood.parse_options({"length_buckets": "false"}))  # stream order, no buckets
    flat.setup()
    assert flat.sampler.bucket == 0 and flat.sampler.rows(0, 40)[0] == [
        flat.sampler.texts[i] for i in flat.sampler.stream.indices(0, 40)
    ]
    assert sorted(flat.sampler.rows(0, 128)[0]) == sorted(plain.sampler.rows(0, 128)[0])  # same rows, reordered
    m = ood(_ctx(teacher, tok), ood.parse_options({"balance": "40", "balance_cache": "none"}))
    m.setup()
    assert isinstance(m.sampler, BalancedSampler) and len(m.sampler.texts) == 40
    texts, _ = m.sampler.rows(0, 400)
    labels = m.ctx.teacher_logits_on(texts).argmax(-1)
    present = sorted(m.sampler.by_label)
    for k in present:  # each class the teacher gives the 40 rows is drawn about equally often
        assert abs(float((labels == k).float().mean()) - 1 / len(present)) < 0.1
    (view,) = m.batch(_info())
    assert view.input_ids.shape[0] == 8
    pairs = ood(_ctx(teacher, tok, pair_task=True), ood.parse_options({"balance": "30", "balance_cache": "none"}))
    pairs.setup()
    _, p2 = pairs.sampler.rows(0, 10)
    assert len(p2) == 10 and all(isinstance(p, str) for p in p2)
    zskd = get_method("zskd")
    z = zskd(_ctx(teacher, tok), zskd.parse_options({"generator": "embedding", "balance": "40", "balance_cache": "none"}))
    z.setup()
    assert isinstance(z.sampler, BalancedSampler)
    clean, adv = z.batch(_info())
    assert clean.input_ids.shape[0] == adv.input_ids.shape[0] == 8
    for cls, name in ((ood, "ood"), (zskd, "zskd")):
        with pytest.raises(OptionError, match=f"{name} balance must be >= 0"):
            cls.parse_options({"balance": "-1"})


def test_label_cache_labels_once_per_teacher(teacher_and_tok, tmp_path):
    """LabelCache (balance_cache): the labels are the teacher's argmax in the rows' order; a second
    run with the same teacher labels nothing (no teacher forward); pairs are rows of their own; a
    different teacher or max length uses another file; a broken file is labelled again; the ood and
    zskd options reach it."""
    from fastkd.methods.base import BalancedSampler, LabelCache

    teacher, tok = teacher_and_tok
    ctx = _ctx(teacher, tok)
    texts = _tiny.ood_texts(60, 4)
    want = ctx.teacher_logits_on(texts).argmax(-1)
    calls = []
    real = ctx.teacher_logits_on

    def counted(ts, ps=None, chunk=64):
        calls.append(len(ts))
        return real(ts, ps, chunk)

    ctx.teacher_logits_on = counted
    cache = LabelCache(tmp_path, ctx)
    got = cache.labels(texts + texts[:5], None)  # repeated rows are labelled once
    assert torch.equal(got, torch.cat([want, want[:5]])) and sum(calls) == len(set(texts))
    assert cache.path.is_file() and cache.path.parent == tmp_path / "labels"
    calls.clear()
    again = LabelCache(tmp_path, ctx)
    assert again.path == cache.path and torch.equal(again.labels(texts[::-1], None), want.flip(0)) and not calls
    pairs = ["a pair"] * 10
    assert torch.equal(again.labels(texts[:10], pairs), real(texts[:10], pairs).argmax(-1)) and sum(calls) == 10
    assert LabelCache(tmp_path, _ctx(teacher, tok, max_length=16)).path != cache.path
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.classifier.bias.add_(0.01)  # the same teacher fine-tuned a little further
    assert LabelCache(tmp_path, _ctx(other, tok, student=ctx.student)).path != cache.path
    cache.path.write_text("{not json")
    calls.clear()
    assert torch.equal(LabelCache(tmp_path, ctx).labels(texts, None), want) and sum(calls) == len(set(texts))
    ood = get_method("ood")
    m = ood(_ctx(teacher, tok), ood.parse_options({"balance": "40", "balance_cache": str(tmp_path / "c")}))
    m.setup()
    assert isinstance(m.sampler, BalancedSampler) and (tmp_path / "c" / "labels").is_dir()
    plain = ood(_ctx(teacher, tok), ood.parse_options({"balance": "40", "balance_cache": "none"}))
    plain.setup()
    assert m.sampler.by_label == plain.sampler.by_label and m.sampler.rows(0, 50) == plain.sampler.rows(0, 50)


def test_asdfd_guessing_makes_the_teacher_confident(teacher_and_tok):
    teacher, tok = teacher_and_tok
    cls = get_method("asdfd")
    ctx = _ctx(teacher, tok)
    # hard targets, no prior or snapping: the paper's guessing, which makes the teacher confident
    # (the default soft targets cap it on purpose: test_method_generators.py)
    hard = {"target_conf_min": 1.0, "target_conf_max": 1.0, "prior_weight": 0, "snap": 0, "div_weight": 0, "min_len": 0}
    method = cls(ctx, cls.parse_options({"construct_steps": 0, **hard}))
    method.setup()
    g = torch.Generator().manual_seed(5)
    z0, y, _ = method._construct(32, g)
    method.opt.construct_steps = 8
    z1, y1, _ = method._construct(32, torch.Generator().manual_seed(5))
    assert torch.equal(y, y1)
    with torch.no_grad():
        p0 = ctx.forward(teacher, method._view(z0), "teacher").logits.softmax(-1)[torch.arange(32), y]
        p1 = ctx.forward(teacher, method._view(z1), "teacher").logits.softmax(-1)[torch.arange(32), y]
    assert p1.mean() > p0.mean() + 0.1
    assert (z1.norm(dim=-1) <= method.max_norm * (1 + 1e-5)).all()  # inside the range of real embeddings


def test_asdfd_visible_start_lies_in_what_the_student_sees(teacher_and_tok):
    teacher, tok = teacher_and_tok
    student = build_student(teacher, layers=1, hidden=16, init="embeddings")
    ctx = _ctx(teacher, tok, student=student)
    cls = get_method("asdfd")
    for visible in (False, True):
        method = cls(ctx, cls.parse_options({"construct_steps": 2, "visible_start": str(visible).lower()}))
        method.setup()
        z, _, _ = method._construct(8, torch.Generator().manual_seed(1))
        hidden_part = (z - ctx.bridge.visible(z)).norm() / z.norm()
        # the updates are projected either way; only a projected start leaves nothing the student cannot see
        assert (hidden_part < 1e-5) if visible else (hidden_part > 0.1), (visible, float(hidden_part))


def test_asdfd_min_len_pads_rows_of_different_lengths(teacher_and_tok):
    teacher, tok = teacher_and_tok
    ctx = _ctx(teacher, tok)
    cls = get_method("asdfd")
    method = cls(ctx, cls.parse_options({"seq_len": 12, "min_len": 3, "construct_steps": 1, "pool_size": 16}))
    method.setup()
    (view,) = method.batch(_info(rows=16))
    lens = view.extras["lens"]
    assert lens.min() >= 3 and lens.max() <= 12 and len(set(lens.tolist())) > 1
    rows = torch.arange(16)
    assert (view.input_ids[:, 0] == tok.cls_token_id).all()
    assert (view.input_ids[rows, lens + 1] == tok.sep_token_id).all()
    assert torch.equal(view.attention_mask.sum(1), lens + 2)
    assert torch.equal(view.embeds_mask.sum(1), lens)
    # what lies past a row's [SEP] is padding: changing it leaves the teacher's output unchanged
    z = view.extras["z"].clone()
    junk = z.clone()
    past = torch.arange(12)[None] >= lens[:, None]
    junk[past] = torch.randn(int(past.sum()), z.shape[-1])
    with torch.no_grad():
        a = ctx.forward(teacher, method._view(z, lens=lens), "teacher").logits
        b = ctx.forward(teacher, method._view(junk, lens=lens), "teacher").logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the lengths travel with the pool and the checkpoint
    state = method.state_dict()
    again = cls(ctx, cls.parse_options({"seq_len": 12, "min_len": 3, "pool_size": 16}))
    again.setup()
    again.load_state_dict(state)
    assert torch.equal(again.pool_len[: again.pool_count], method.pool_len[: method.pool_count])
    assert set(method.pool_len[: method.pool_count].tolist()) <= set(range(3, 13))
    with pytest.raises(ValueError, match="min_len"):
        cls.parse_options({"min_len": "-1"})


def test_t3_source_fraction_mixes_the_untransformed_source_text(teacher_and_tok):
    teacher, tok = teacher_and_tok
    ctx = _ctx(teacher, tok)
    options = {"generator": _tiny.causal_lm_dir(), **_tiny.T3_OPTIONS}
    pool = [{"text": f"generated text number {i}", "text_pair": None, "intended_label": i % 2} for i in range(4)]
    seen = {}
    for fraction in ("0", "0.25"):
        method = T3(ctx, T3.parse_options({**options, "source_fraction": fraction}))
        method.setup()
        method.pool = list(pool)
        encoded = []
        encode = ctx.encode_texts
        ctx.encode_texts = lambda texts, pairs=None, out=encoded, enc=encode: (
            out.append(list(texts)) or enc(texts, pairs)
        )
        try:
            (view,) = method.batch(_info(rows=16))
        finally:
            ctx.encode_texts = encode
        assert view.input_ids.shape[0] == 16 and len(encoded) == 1
        seen[fraction] = sum(not t.startswith("generated text number") for t in encoded[0])
    assert seen == {"0": 0, "0.25": 4}
    with pytest.raises(ValueError, match="source_fraction"):
        T3.parse_options({**options, "source_fraction": "1.0"})


def test_t3_generate_dataset_rows(teacher_and_tok):
    teacher, tok = teacher_and_tok
    options = T3.parse_options({"generator": _tiny.causal_lm_dir(), **_tiny.T3_OPTIONS, "tune_steps": 2})
    rows = generate_dataset(teacher, tok, _tiny.ood_texts(30, 1), options, num_rows=24, device=torch.device("cpu"),
                            progress=False)  # fmt: skip
    assert len(rows) == 24
    assert set(rows[0]) == {"text", "text_pair", "label", "intended_label", "teacher_confidence", "source"}
    assert {r["intended_label"] for r in rows} == {0, 1}
    assert all(r["text"] and 0.0 <= r["teacher_confidence"] <= 1.0 for r in rows)
    from fastkd.methods.t3 import Rewriter

    rw = Rewriter(teacher, tok, options, device=torch.device("cpu"), max_length=24)
    assert rw.label_words == ["negative", "positive"]  # from the teacher's id2label
    assert "a positive text" in rw.prompt("the river", 1) and "the river" in rw.prompt("the river", 1)


def test_t3_pool_cache_key_ignores_how_students_draw(teacher_and_tok, tmp_path):
    """The cached pool is found again under pool_filter / pool_balance (they decide how a student draws
    from it, not what it holds); an option that shapes the pool makes a new one."""
    teacher, tok = teacher_and_tok
    base = {"generator": _tiny.causal_lm_dir(), **_tiny.T3_OPTIONS, "tune_steps": 0}

    def gen(**extra):
        info: dict = {}
        generate_dataset(teacher, tok, _tiny.ood_texts(30, 1), T3.parse_options({**base, **extra}), num_rows=8,
                         device=torch.device("cpu"), progress=False, cache=str(tmp_path), info=info)  # fmt: skip
        return info

    assert not gen()["cached"]
    assert gen(pool_filter="intended", pool_balance="true")["cached"]
    assert gen(pool_weight="margin", pool_weight_floor="0.2")["cached"]
    mixed = gen(source_fraction="0.5")  # (source_fraction is in the key: pools cached before keep their names)
    assert gen(source_fraction="0.5", balance="64", balance_cache="none")["path"] == mixed["path"]
    assert not gen(max_new_tokens="7")["cached"]
    assert len(list(tmp_path.glob("t3-*.jsonl"))) == 3
    # gen_dtype at its default is left out of the key (pools cached before it existed stay valid);
    # bfloat16 sampling makes another pool
    first = gen()
    assert first["cached"] and gen(gen_dtype="float32")["path"] == first["path"]
    assert not gen(gen_dtype="bfloat16")["cached"]
    assert len(list(tmp_path.glob("t3-*.jsonl"))) == 4


def test_t3_logprobs_match_the_generator_with_left_padding(teacher_and_tok):
    """REINFORCE needs log p(generated tokens): recomputed with the left-padded prompts, they equal the
    log-softmax of the logits generate() sampled from."""
    from fastkd.methods.t3 import Rewriter

    teacher, tok = teacher_and_tok
    options = T3.parse_options({"generator": _tiny.causal_lm_dir(), "max_new_tokens": 6, "top_p": 1.0})
    rw = Rewriter(teacher, tok, options, device=torch.device("cpu"), max_length=24)
    prompts = [rw.prompt(s, y) for s, y in [("tree", 0), ("the big river and the old stone house near it", 1)]]
    enc = rw.lm_tok(prompts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][0] == 0).any()  # the first prompt is left-padded
    torch.manual_seed(0)
    out = rw.lm.generate(**enc, do_sample=True, top_p=1.0, temperature=1.0, max_new_tokens=6, min_new_tokens=6,
                         pad_token_id=rw.lm_tok.pad_token_id, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    p_len = enc["input_ids"].shape[1]
    gen = out.sequences[:, p_len:]
    expected = torch.stack([torch.log_softmax(lg.float(), -1).gather(1, gen[:, i : i + 1]).squeeze(1)
                            for i, lg in enumerate(out.logits)], dim=1)  # fmt: skip
    mask = torch.cat([enc["attention_mask"], torch.ones_like(gen)], dim=1)
    with torch.no_grad():
        lp, gmask = rw.token_logprobs(out.sequences, mask, p_len)
    assert gmask.all()
    assert torch.allclose(lp, expected, atol=1e-4)
