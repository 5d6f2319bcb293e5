"""The generators behind the data-free methods, on tiny models: zskd's masked-LM training, asdfd's
pseudo-embedding prior and soft targets, t3's rewards and the pool statistics, and the quality
benchmark's bootstrap."""

from __future__ import annotations

import math
import random
from pathlib import Path

import _tiny
import pytest
import torch

from fastkd.methods import get_method
from fastkd.methods import mlm_generator as M
from fastkd.methods.base import MethodContext
from fastkd.methods.t3 import pool_diversity, pool_statistics
from fastkd.methods.zskd import build_mlm_generator
from fastkd.models import load_classifier
from fastkd.student import EmbeddingBridge, build_student


@pytest.fixture(scope="module")
def teacher_and_tok():
    return load_classifier(_tiny.teacher_dir())


def _structured_texts(n: int, seed: int) -> list[str]:
    """OOD text with context a masked LM can learn: each sentence repeats a word after a fixed cue."""
    rng = random.Random(seed)
    words = _tiny.OOD_WORDS
    out = []
    for _ in range(n):
        w = rng.choice(words)
        out.append(f"the {w} and the {w} with a {w}")
    return out


def _ctx(teacher, tok, **kw):
    student = build_student(teacher, layers=1)
    base = {
        "teacher": teacher, "student": student, "tokenizer": tok, "device": torch.device("cpu"), "num_labels": 2,
        "pair_task": False, "max_length": 24, "temperature": 2.0, "divergence": "kl", "seed": 0,
        "micro_batch_size": 8, "ood_texts": _structured_texts(200, 1), "bridge": EmbeddingBridge(teacher, student),
        "progress": False,
    }  # fmt: skip
    base.update(kw)
    return MethodContext(**base)


def test_asdfd_text_start_begins_at_the_words_of_ood_sentences(teacher_and_tok):
    teacher, tok = teacher_and_tok
    method = _asdfd(teacher, tok, construct_steps=0, snap=0, adv_steps=0)
    assert method.text_start  # auto: OOD text is given
    ids, lens = method.text_start_ids(0, 4)
    texts, _ = method.sampler.rows(0, 4)
    for r, text in enumerate(texts):
        want = tok(text, add_special_tokens=False)["input_ids"][: method.n]
        assert lens[r] == len(want) and ids[r, : len(want)].tolist() == want
    z, _, lens2 = method._construct(4, torch.Generator().manual_seed(0), 0)
    weight = teacher.get_input_embeddings().weight.detach()
    assert torch.equal(lens2, lens)
    for r in range(4):
        torch.testing.assert_close(z[r, : lens[r]], weight[ids[r, : lens[r]]])
        assert float(z[r, lens[r] :].abs().sum()) == 0.0  # padding positions are empty
    # the guessing then moves them towards the target class, and snapping keeps them near words
    moved = _asdfd(teacher, tok, construct_steps=3, snap=0.5, adv_steps=0)
    z3, _, _ = moved._construct(4, torch.Generator().manual_seed(0), 0)
    assert not torch.allclose(z3, z)


def test_asdfd_start_words_and_the_missing_text_error(teacher_and_tok):
    teacher, tok = teacher_and_tok
    cls = get_method("asdfd")
    assert not _asdfd(teacher, tok, start="words").text_start
    no_text = cls(_ctx(teacher, tok, ood_texts=None), cls.parse_options({}))
    no_text.setup()
    assert not no_text.text_start  # auto without OOD text: the paper's text-free start
    with pytest.raises(ValueError, match="start=text needs out-of-domain text"):
        cls(_ctx(teacher, tok, ood_texts=None), cls.parse_options({"start": "text"})).setup()
    with pytest.raises(ValueError, match="start must be one of"):
        cls.parse_options({"start": "sentences"})
    # pair tasks keep the fixed layout: the sentences' tokens fill every position
    pair = cls(_ctx(teacher, tok, pair_task=True), cls.parse_options({}))
    pair.setup()
    ids, lens = pair.text_start_ids(0, 3)
    assert lens is None and ids.shape == (3, pair.n)


# --------------------------------------------------------------------------------------------
# zskd: the masked-LM generator
# --------------------------------------------------------------------------------------------
def test_fill_ban_mask_covers_specials_and_placeholders():
    class Tok:
        all_special_ids = (0, 2)

        def get_vocab(self):
            return {"[PAD]": 0, "cat": 1, "[CLS]": 2, "[unused3]": 3, "dog": 4, "<extra_id_0>": 5}

    ban = M.fill_ban_mask(Tok(), 7)  # id 6 has no token
    assert ban.tolist() == [True, False, True, True, False, True, True]


def test_mask_positions_only_real_tokens_and_one_per_row():
    content = torch.tensor([[False, True, True, False], [False, True, False, False], [False] * 4])
    pick = M.mask_positions(content, 0.0, torch.Generator().manual_seed(0))
    assert not (pick & ~content).any()
    assert pick.sum(1).tolist() == [1, 1, 0]


def test_generator_learns_masked_lm_and_is_cached(teacher_and_tok, tmp_path):
    teacher, tok = teacher_and_tok
    texts = _structured_texts(600, 0)
    kw = dict(batch_size=32, lr=3e-3, mask_prob=0.15, max_length=16, seed=0, progress=False,
              device=torch.device("cpu"))  # fmt: skip
    gen, info = M.pretrained_generator(
        lambda: build_mlm_generator(teacher, 2), tok, texts, steps=150, cache=str(tmp_path), **kw
    )
    before = info["before_training"]["mlm_accuracy"]
    # the copies of a sentence's word are predictable from context: far above the unigram baseline
    assert info["mlm_accuracy"] > max(before, info["unigram_accuracy"]) + 0.2, info
    assert info["cached"] is False and info["positions"] > 50
    # the same teacher, text and settings: loaded from the cache, same weights, no training
    again, info2 = M.pretrained_generator(
        lambda: build_mlm_generator(teacher, 2), tok, texts, steps=150, cache=str(tmp_path), **kw
    )
    assert info2["cached"] is True and info2["mlm_accuracy"] == info["mlm_accuracy"]
    for (n, a), (_, b) in zip(gen.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    # other text: another cache entry
    _, info3 = M.pretrained_generator(
        lambda: build_mlm_generator(teacher, 2), tok, texts[:300], steps=5, cache=str(tmp_path), **kw
    )
    assert info3["cached"] is False


def test_unigram_bias_starts_at_the_unigram_baseline(teacher_and_tok):
    teacher, tok = teacher_and_tok
    gen = build_mlm_generator(teacher, 2)
    texts = ["tree tree tree river"] * 50
    ban = M.fill_ban_mask(tok, gen.get_input_embeddings().weight.shape[0])
    assert M.init_unigram_bias(gen, tok, texts, ban, 16)
    bias = gen.get_output_embeddings().bias
    vocab = tok.get_vocab()
    assert bias[vocab["tree"]] > bias[vocab["river"]] > bias[vocab["house"]]


def test_zskd_fills_are_never_special_and_generator_stays_an_lm(teacher_and_tok):
    teacher, tok = teacher_and_tok
    cls = get_method("zskd")
    opts = {"pretrain_steps": 100, "pretrain_lr": 3e-3, "generator_cache": "none", "gen_every": 10, "gen_steps": 5,
            "mask_prob": 0.5}  # fmt: skip
    method = cls(_ctx(teacher, tok), cls.parse_options(opts))
    method.setup()
    assert method.generator_info["mlm_accuracy"] >= method.generator_info["unigram_accuracy"]
    # special tokens (and [MASK] itself) never appear where the generator filled
    view = method.ctx.encode_texts(method.ctx.ood_texts[:16])
    for seed in range(5):
        adv = method._token_adversary(view, torch.Generator().manual_seed(seed))
        changed_ids = adv.input_ids[adv.input_ids != view.input_ids]
        assert not torch.isin(changed_ids, torch.tensor(method.ctx.special_ids())).any()
    # updates are spread: 5 per 10 steps, one every 2 steps, each reporting the MLM term
    logs = [method.before_step(s, torch.Generator().manual_seed(s)) for s in range(10)]
    assert [bool(x) for x in logs] == [s % 2 == 0 for s in range(10)]
    assert all("gen_mlm_loss" in x and x["gen_mlm_loss"] >= 0 for x in logs if x)


def test_zskd_refuses_a_generator_that_is_not_a_language_model(teacher_and_tok):
    teacher, tok = teacher_and_tok
    cls = get_method("zskd")
    method = cls(
        _ctx(teacher, tok),
        cls.parse_options({"pretrain_steps": 0, "generator_cache": "none", "min_gen_lift": 50.0}),
    )
    with pytest.raises(ValueError, match="not a language model"):
        method.setup()


# --------------------------------------------------------------------------------------------
# asdfd: soft targets, the manifold prior, snapping, pool statistics
# --------------------------------------------------------------------------------------------
def _asdfd(teacher, tok, **opts):
    cls = get_method("asdfd")
    method = cls(_ctx(teacher, tok), cls.parse_options(opts))
    method.setup()
    return method


def test_asdfd_text_weight_adds_the_ood_methods_rows_as_a_view(teacher_and_tok):
    from fastkd.methods.base import StepInfo

    teacher, tok = teacher_and_tok
    plain = _asdfd(teacher, tok, construct_steps=1)
    mixed = _asdfd(teacher, tok, construct_steps=1, text_weight=0.5)
    ood = get_method("ood")(mixed.ctx, get_method("ood").parse_options({}))
    ood.setup()

    def info(offset):
        g = torch.Generator().manual_seed(5)
        return StepInfo(step=0, micro=0, rank=0, world=1, batch_size=8, offset=offset, generator=g)

    for offset in (0, 8, 40):
        text, pseudo = mixed.batch(info(offset))
        (want,) = ood.batch(info(offset))
        assert (text.name, text.weight) == ("ood", 0.5)
        assert torch.equal(text.input_ids, want.input_ids) and torch.equal(text.attention_mask, want.attention_mask)
        assert text.teacher_embeds is None and pseudo.teacher_embeds is not None
        # the pseudo view is what asdfd makes without the text view (same draws)
        (alone,) = plain.batch(info(offset))
        torch.testing.assert_close(pseudo.teacher_embeds, alone.teacher_embeds)
    with pytest.raises(ValueError, match="text_weight must be >= 0"):
        get_method("asdfd").parse_options({"text_weight": -1})
    with pytest.raises(ValueError, match="text_weight > 0 needs out-of-domain text"):
        cls = get_method("asdfd")
        cls(_ctx(teacher, tok, ood_texts=None), cls.parse_options({"text_weight": 1.0})).setup()


def test_nearest_words_is_the_brute_force_nearest(teacher_and_tok):
    teacher, tok = teacher_and_tok
    method = _asdfd(teacher, tok)
    z = torch.randn(3, 5, method.words.shape[1])
    got = method.nearest_words(z)
    d = torch.cdist(z.reshape(-1, z.shape[-1]), method.words)
    want = method.words[d.argmin(1)].reshape(z.shape)
    torch.testing.assert_close(got, want)
    # special tokens are not on the manifold
    special = teacher.get_input_embeddings().weight[tok.cls_token_id].detach()
    assert not torch.equal(method.nearest_words(special[None, None])[0, 0], special)


def test_soft_targets_cap_the_confidence(teacher_and_tok):
    teacher, tok = teacher_and_tok
    method = _asdfd(teacher, tok, target_conf_min=0.6, target_conf_max=0.8)
    y = torch.tensor([0, 1, 1, 0])
    q = method.soft_targets(y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.sum(1), torch.ones(4))
    conf = q[torch.arange(4), y]
    assert (conf >= 0.6).all() and (conf <= 0.8).all() and (q.argmax(1) == y).all()


def test_soft_targets_make_a_less_certain_teacher_than_hard_ones(teacher_and_tok):
    teacher, tok = teacher_and_tok
    conf = {}
    for name, lo, hi in (("hard", 1.0, 1.0), ("soft", 0.55, 0.7)):
        method = _asdfd(teacher, tok, construct_steps=10, target_conf_min=lo, target_conf_max=hi, prior_weight=0,
                        snap=0, div_weight=0, min_len=0)  # fmt: skip
        z, y, _ = method._construct(32, torch.Generator().manual_seed(3))
        with torch.no_grad():
            p = method.ctx.forward(teacher, method._view(z), "teacher").logits.softmax(-1)
        conf[name] = float(p[torch.arange(32), y].mean())
    assert conf["soft"] < conf["hard"] - 0.05, conf


def test_prior_and_snapping_keep_pseudo_embeddings_near_words(teacher_and_tok):
    teacher, tok = teacher_and_tok
    dist = {}
    for name, prior, snap in (("free", 0.0, 0.0), ("prior", 5.0, 0.0), ("snap", 0.0, 1.0)):
        method = _asdfd(teacher, tok, construct_steps=6, construct_step_size=0.5, prior_weight=prior, snap=snap,
                        div_weight=0, min_len=0)  # fmt: skip
        z, _, _ = method._construct(16, torch.Generator().manual_seed(2))
        dist[name] = float(method.prior(z))
    assert dist["snap"] < 1e-8  # fully snapped: every row is a real word embedding
    assert dist["prior"] < 0.7 * dist["free"], dist


def test_asdfd_pool_statistics(teacher_and_tok):
    teacher, tok = teacher_and_tok
    method = _asdfd(teacher, tok, pool_size=8, min_len=0)
    words = method.words
    method.pool_z[:4] = words[:1].expand(4, method.n, -1)  # four identical rows of one real word
    method.pool_y[:4] = torch.tensor([0, 0, 0, 1])
    method.pool_count = 4
    stats = method.pool_statistics()
    assert stats["pool_manifold_dist"] == pytest.approx(0.0, abs=1e-8)
    assert stats["pool_mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert stats["pool_min_label_share"] == pytest.approx(0.25)
    # the diversity penalty of a new row identical to the pool is ~1, of an orthogonal-ish one lower
    same = words[:1].expand(1, method.n, -1).clone()
    other = words[5:6].expand(1, method.n, -1).clone()
    assert float(method.diversity_penalty(same, None)) == pytest.approx(1.0, abs=1e-5)
    assert float(method.diversity_penalty(other, None)) < 1.0


# --------------------------------------------------------------------------------------------
# t3: rewards over the pool, pool statistics
# --------------------------------------------------------------------------------------------
def test_pool_diversity_counts_the_memory():
    assert pool_diversity(["a b c", "x y z"], []) == [1.0, 1.0]
    memory = [{("a", "b"), ("b", "c")}]
    assert pool_diversity(["a b c", "x y z"], memory) == [0.0, 1.0]


def test_pool_statistics_values():
    rows = [
        {"text": "a b c", "label": 0, "intended_label": 0, "teacher_confidence": 0.9},
        {"text": "a b c", "label": 1, "intended_label": 0, "teacher_confidence": 0.2},
        {"text": "x y", "label": 1, "intended_label": 1, "teacher_confidence": 0.7},
        {"text": "p q r s", "label": 1, "intended_label": 1, "teacher_confidence": 0.8},
    ]
    st = pool_statistics(rows, 2)
    assert st["rows"] == 4 and st["distinct_texts"] == 0.75
    assert st["distinct_2"] == pytest.approx(6 / 8)  # bigrams: ab bc ab bc xy pq qr rs
    assert st["label_shares"] == [0.25, 0.75]
    assert st["intended_agreement"] == 0.75
    assert st["mean_intended_confidence"] == pytest.approx(0.65)
    assert st["mean_max_jaccard"] == pytest.approx(0.5)  # the two copies score 1, the others 0
    assert st["top_opening_share"] == 0.5  # "a" opens two of the four rows
    assert "names_label_share" not in st  # only with label_words


def test_names_a_label_and_its_pool_share():
    from fastkd.methods.t3 import names_a_label

    words = ["negative", "neutral", "positive"]
    assert names_a_label("Negative! Not how I wish to be remembered.", words)
    assert names_a_label("so POSITIVELY great", words)  # a label word starting a word, any case
    assert not names_a_label("a nonnegative integer", words)  # inside a word: not a name of the class
    assert not names_a_label("what a dreadful day", words)
    assert not names_a_label("5 stars in 1999", ["1", "5"])  # star-rating labels: numbers are ordinary text
    assert names_a_label("a 5-star hotel", ["1 star", "5-star"])
    rows = [{"text": t} for t in ("Negative Tweet: the volume", "Excited to go", "excited: positive", "rain again")]
    st = pool_statistics(rows, 3, label_words=words)
    assert st["names_label_share"] == 0.5
    assert st["top_opening_share"] == 0.5  # "excited" opens two rows (case and punctuation ignored)


def test_t3_reward_saturates_and_rewards_the_missing_class(teacher_and_tok):
    from fastkd.methods.t3 import T3

    teacher, tok = teacher_and_tok
    opts = T3.parse_options({"generator": _tiny.causal_lm_dir(), **_tiny.T3_OPTIONS, "spec_cap": 0.6,
                             "div_weight": 0.0, "balance_weight": 1.0})  # fmt: skip
    from fastkd.methods.t3 import Rewriter

    rw = Rewriter(teacher, tok, opts, device=torch.device("cpu"), max_length=24)
    texts = ["good great excellent wonderful film", "bad awful terrible boring film"]
    probs = rw.teacher_probs(texts)
    assert probs[0, 1] > 0.6 and probs[1, 0] > 0.6  # the tiny teacher is sure of both
    rw.remember(["x"] * 10, [1] * 10)  # the pool so far: all positive
    reward, parts = rw.rewards(texts, [1, 0])
    # specificity saturates at the cap: both are 1 although the probabilities differ
    assert parts["specificity"].tolist() == pytest.approx([1.0, 1.0])
    # the negative text fills the class the pool lacks
    assert parts["balance"][1] > 0 > parts["balance"][0]
    assert reward[1] > reward[0]


def test_t3_reward_takes_the_specificity_of_a_text_that_names_its_label(teacher_and_tok):
    from fastkd.methods.t3 import T3, Rewriter

    teacher, tok = teacher_and_tok
    base = {"generator": _tiny.causal_lm_dir(), **_tiny.T3_OPTIONS, "div_weight": 0.0, "balance_weight": 0.0,
            "label_words": "bad,good"}  # fmt: skip
    texts = ["good great excellent wonderful film", "great excellent wonderful film"]
    got = {}
    for pen in (0.0, 0.75, 1.0):
        opts = T3.parse_options({**base, "leak_penalty": pen})
        rw = Rewriter(teacher, tok, opts, device=torch.device("cpu"), max_length=24)
        _, parts = rw.rewards(texts, [1, 1])
        assert parts["leaked"].tolist() == [True, False]
        got[pen] = parts["specificity"].tolist()
    assert got[0.0][0] > 0.5 and got[0.0][1] > 0.5  # the tiny teacher likes both
    assert got[0.75][0] == pytest.approx(got[0.0][0] * 0.25) and got[1.0][0] == 0.0  # only the first names "good"
    assert got[1.0][1] == pytest.approx(got[0.0][1])
    with pytest.raises(ValueError, match="leak_penalty must be in"):
        T3.parse_options({**base, "leak_penalty": 1.5})


def test_t3_tune_step_reports_kl_to_the_reference(teacher_and_tok):
    from fastkd.methods.t3 import T3, Rewriter

    teacher, tok = teacher_and_tok
    opts = T3.parse_options({"generator": _tiny.causal_lm_dir(), **_tiny.T3_OPTIONS, "tune_lr": 1e-2})
    rw = Rewriter(teacher, tok, opts, device=torch.device("cpu"), max_length=24)
    torch.manual_seed(0)
    first = rw.tune_step(["tree river house"] * 4, [0, 1, 0, 1])
    assert first["t3_kl_ref"] == pytest.approx(0.0, abs=1e-4)  # nothing tuned yet: the reference itself
    for _ in range(3):
        last = rw.tune_step(["tree river house"] * 4, [0, 1, 0, 1])
    assert abs(last["t3_kl_ref"]) > 1e-4  # the tuned LM moved away from the reference
    assert len(rw.memory) > 0


# --------------------------------------------------------------------------------------------
# the quality benchmark's statistics
# --------------------------------------------------------------------------------------------
def test_bootstrap_delta():
    from benchmarks.quality import bootstrap_delta

    rng = random.Random(0)
    base = ["".join(str(int(rng.random() < 0.7)) for _ in range(400)) for _ in range(3)]
    same = bootstrap_delta(base, base, draws=500)
    assert same[0] == pytest.approx(0.0) and same[1] < 0 < same[2]
    better = ["".join("1" if c == "1" or rng.random() < 0.5 else "0" for c in s) for s in base]
    d, lo, hi = bootstrap_delta(better, base, draws=500)
    assert d > 10 and lo > 0 and lo < d < hi


def test_quality_summary_columns_and_goals(tmp_path):
    import csv

    from benchmarks import quality as Q

    rng = random.Random(1)

    def correct(p):
        return "".join(str(int(rng.random() < p)) for _ in range(300))

    runs = []
    for seed in range(3):
        for method, p in (("ood", 0.6), ("zskd", 0.9), ("asdfd", 0.7), ("t3", 0.3), ("random", 0.5)):
            c = correct(p)
            runs.append({"task": "movie_reviews", "method": method, "seed": seed, "wall_s": 1.0,
                         "test_acc": 100.0 * c.count("1") / len(c), "test_correct": c})  # fmt: skip
    rows = Q.summarise(runs, {"movie_reviews": {"test_acc": 80.0}})
    Q.write_csv(tmp_path / "summary.csv", rows)
    with open(tmp_path / "summary.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(Q.COLUMNS)
    by = {r["method"]: r for r in got}
    assert by["teacher"]["mean_acc"] == "80.00" and by["ood"]["delta_vs_ood"] == "0.00"
    assert float(by["zskd"]["delta_ci_low"]) > 0 > float(by["t3"]["delta_ci_high"])
    assert float(by["zskd"]["pct_of_teacher"]) == pytest.approx(float(by["zskd"]["mean_acc"]) / 0.8, abs=0.02)
    text = "\n".join(Q.goals(rows))
    assert "movie_reviews: zskd beats ood with a 95% interval above zero: MET" in text
    assert "movie_reviews: t3 beats ood with a 95% interval above zero: NOT MET" in text
    assert "every seed method >= 75% of the teacher: NOT MET (t3)" in text
    runs[0]["steps"], runs[1]["steps"] = 400, 1600  # a table that mixes budgets compares budgets, not methods
    with pytest.raises(ValueError, match=r"the movie_reviews runs mix budgets \(400, 1600 steps\)"):
        Q.summarise(runs, {})
    runs[1]["steps"] = 400
    runs[1]["ood"] = "austen"  # nor one that mixes OOD corpora (a record without "ood" read WordNet)
    with pytest.raises(ValueError, match=r"the movie_reviews runs mix OOD corpora \(austen, wordnet\)"):
        Q.summarise(runs, {})


def test_quality_dev_summary_pairs_with_ood_and_the_budget_plot_joins_budgets(tmp_path):
    """Dev sweep points: per-class accuracy from the per-row record, the paired difference to plain ood at
    the same steps, and a setting run at two budgets (one record given -O strings, one typed) is one series
    over the seeds both budgets have."""
    from benchmarks import quality as Q

    labels = [0, 0, 1, 1, 2]
    assert Q.per_class_accuracy("10110", labels) == [50.0, 100.0, 0.0]
    with pytest.raises(ValueError, match="correct has 4 rows but labels has 5"):
        Q.per_class_accuracy("1011", labels)

    def rec(method, tag, seed, steps, acc, options=None):
        return {"task": "tweets", "method": method, "tag": tag, "seed": seed, "steps": steps, "dev_acc": acc,
                "dev_agreement": acc + 5, "options": options or {}, "loop": {}, "wall_s": 1.0,
                "dev_per_class": [acc - 10, acc, acc + 10]}  # fmt: skip

    runs = [rec("ood", "a", s, 400, 55.0 + s) for s in range(3)]
    runs += [rec("ood", "b", s, 1600, 62.0 + s) for s in range(2)]
    runs += [rec("t3", "c", s, 400, 60.0 + 2 * s) for s in range(3)]
    runs += [rec("ood", "d", s, 400, 66.0, {"balance": "32768"}) for s in range(3)]
    runs += [rec("ood-balanced", "e", s, 1600, 67.0, {"balance": 32768}) for s in (1, 2)]
    other = [{**rec("ood", "f", s, 400, 70.0), "ood": "austen"} for s in range(2)]  # another corpus:
    other += [{**rec("zskd", "g", s, 400, 71.0 + s), "ood": "austen"} for s in range(2)]  # paired with its ood
    lines = Q.dev_summary(runs + other)
    by_tag = {line.split(" | ")[2]: line for line in lines[2:]}
    assert "| 400 | 3 | 56.0 (55.0, 56.0, 57.0) | 46.0 / 56.0 / 66.0 | 61.0 |  |" in by_tag["a"]
    assert by_tag["c"].endswith("| +6.0 (3 of 3 ahead) |")  # 60-55, 62-56, 64-57
    assert by_tag["e"].endswith("| +4.0 (1 of 1 ahead) |")  # the 1,600-step ood runs share seed 1 only: 67-63
    assert by_tag["f"].endswith("| 75.0 |  |") and by_tag["g"].endswith("| +1.5 (2 of 2 ahead) |")
    assert "ood=austen" in "\n".join(Q.dev_table(other))
    series = {s["label"]: s for s in Q.budget_series(runs)}
    assert set(series) == {"ood (b)", "ood-balanced (e)"}  # t3 ran at one budget only
    assert series["ood (b)"]["seeds"] == [0, 1] and series["ood (b)"]["mean"] == [55.5, 62.5]
    assert series["ood-balanced (e)"]["steps"] == [400, 1600] and series["ood-balanced (e)"]["seeds"] == [1, 2]
    if Q._pyplot() is not None:
        assert Q.plot_budget(tmp_path / "budget.png", runs) and (tmp_path / "budget.png").stat().st_size > 0
    assert not Q.plot_budget(tmp_path / "none.png", runs[:3])


def test_quality_ood_corpus_joins_its_parts_once(tmp_path):
    from benchmarks import quality as Q
    from fastkd.assets import Assets

    (tmp_path / "wordnet.txt").write_text("a gloss\nanother gloss\n")
    (tmp_path / "austen.txt").write_text("It is a truth.\n")
    got = Assets(cache_dir=str(tmp_path), wordnet_path=str(tmp_path / "wordnet.txt"),
                 austen_path=str(tmp_path / "austen.txt"))  # fmt: skip
    assert Q.ood_corpus("austen", got) == str(tmp_path / "austen.txt")
    joined = Q.ood_corpus("wordnet+austen", got)
    assert Path(joined).read_text() == "a gloss\nanother gloss\nIt is a truth.\n"
    with pytest.raises(ValueError, match=r"ood must be one of \('wordnet', 'austen', 'wordnet\+austen'\), got 'web'"):
        Q.ood_corpus("web", got)


def test_quality_option_overrides_need_a_dev_run(tmp_path, capsys):
    """-O changes a method's settings, which are chosen on dev: without --dev it is refused, and a
    malformed one names what was expected."""
    from benchmarks import quality as Q

    with pytest.raises(SystemExit):
        Q.main(["--work", str(tmp_path), "-O", "asdfd.start=text"])
    assert "give --dev TAG" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        Q.main(["--work", str(tmp_path), "--dev", "x", "-O", "start=text"])
    assert "expected METHOD.KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        Q.main(["--work", str(tmp_path), "--t3-pool-rows", "8192"])
    assert "--t3-pool/--t3-pool-rows changes t3's pool" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        Q.main(["--work", str(tmp_path), "--dev", "x", "--t3-pool-rows", "0"])
    assert "expected a positive number of rows" in capsys.readouterr().err


def test_quality_asdfd_probe_on_tiny_models(teacher_and_tok):
    """The probe of asdfd's guessing reports shares in [0, 1] and label shares that sum to one."""
    from benchmarks import quality as Q

    ctx = {"teacher": teacher_and_tok, "data": {"ood": _tiny.data_files()["ood"]}}
    got = Q.asdfd_probe("tiny", ctx, rows=8, student_shape={"layers": 1})
    assert got["rows"] == 8 and 0.0 <= got["tokens_changed"] <= 1.0
    for key in ("target_agreement_before", "target_agreement_after"):
        assert 0.0 <= got[key] <= 1.0
    for key in ("label_shares_before", "label_shares_after"):
        assert sum(got[key]) == pytest.approx(1.0, abs=0.01) and len(got[key]) == 2
    assert len(got["examples"]) == 3 and all(isinstance(e, str) and e for e in got["examples"])


def test_quality_task_options_layer_over_the_method_options(monkeypatch):
    """A task's dev choices override OPTIONS for that task only, and every committed choice is an
    option the method accepts (a misspelt key fails here, not an hour into the benchmark)."""
    from benchmarks import quality as Q
    from fastkd.methods import get_method

    monkeypatch.setitem(Q.TASK_OPTIONS, "tweets", {"t3": {"source_fraction": 0.75, "tune_lr": 2e-5}})
    got = Q.method_options("tweets", "t3")
    assert got["source_fraction"] == 0.75 and got["tune_lr"] == 2e-5
    assert got["refresh_every"] == Q.OPTIONS["t3"]["refresh_every"]
    assert Q.method_options("movie_reviews", "t3") == {"source_fraction": 0.5, "refresh_every": 0, "pool_balance": True}
    assert Q.method_options("movie_reviews", "ood") == {}
    monkeypatch.undo()
    assert Q.method_options("tweets", "t3") == {"source_fraction": 0.0, "refresh_every": 0, "pool_balance": True}
    for task, methods in Q.TASK_OPTIONS.items():
        assert task in Q.TASKS
        for method in methods:
            extra = {"generator": "lm"} if method == "t3" else {}  # t3's one required option
            get_method(Q.fastkd_method(method)).parse_options({**Q.method_options(task, method), **extra})
    # a variant row runs its fastkd method with its own registered options, on every task
    assert Q.fastkd_method("ood-balanced") == "ood" and Q.fastkd_method("zskd") == "zskd"
    for task in Q.TASKS:
        assert Q.method_options(task, "ood-balanced") == {"balance": 32768}
        get_method("ood").parse_options(Q.method_options(task, "ood-balanced"))
    assert set(Q.VARIANTS) <= set(Q.METHODS) and all(v in Q.METHODS for v in Q.VARIANTS.values())


def _teacher_labels(teacher, tok, texts):
    enc = tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        return teacher(**enc).logits.argmax(-1).tolist()


def _pool_file(tmp_path, rows):
    import json

    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"text": t, "intended_label": y, "label": 1 - y}) + "\n" for t, y in rows))
    return str(path)


def _t3(teacher, tok, pool_file, **opts):
    cls = get_method("t3")
    m = cls(_ctx(teacher, tok), cls.parse_options({"generator": "unused", "pool_file": pool_file, "pool_size": 0,
                                                    "refresh_every": 0, **opts}))  # fmt: skip
    m.setup()  # a pool file and no refresh: the generator is never loaded
    return m


def test_t3_pool_filter_keeps_the_rows_the_teacher_labels_as_intended(teacher_and_tok, tmp_path):
    """pool_filter=intended keeps exactly the rows whose *current* teacher label (not the file's stored
    one, here deliberately wrong) is the intended label; none kept is a one-line error."""
    teacher, tok = teacher_and_tok
    texts = _structured_texts(60, 5)
    truth = _teacher_labels(teacher, tok, texts)
    assert len(set(truth)) == 2  # the tiny teacher tells the texts apart
    intended = [y if i % 3 else 1 - y for i, y in enumerate(truth)]  # a third of the rows disagree
    path = _pool_file(tmp_path, list(zip(texts, intended)))
    assert len(_t3(teacher, tok, path).pool) == 60
    m = _t3(teacher, tok, path, pool_filter="intended")
    assert [r["text"] for r in m.pool] == [t for t, a, b in zip(texts, truth, intended) if a == b]
    assert all(r["label"] == r["intended_label"] for r in m.pool)
    bad = _pool_file(tmp_path, [(t, 1 - y) for t, y in zip(texts, truth)])
    with pytest.raises(ValueError, match="pool_filter=intended: no row"):
        _t3(teacher, tok, bad, pool_filter="intended")


def test_t3_pool_balance_draws_each_teacher_class_equally(teacher_and_tok, tmp_path):
    teacher, tok = teacher_and_tok
    texts = _structured_texts(200, 6)
    truth = _teacher_labels(teacher, tok, texts)
    major = max((0, 1), key=truth.count)
    a = [t for t, y in zip(texts, truth) if y == major][:40]
    b = [t for t, y in zip(texts, truth) if y != major][:4]
    assert len(a) == 40 and len(b) == 4
    path = _pool_file(tmp_path, [(t, 0) for t in a + b])
    for balance, share in ((False, 4 / 44), (True, 0.5)):
        m = _t3(teacher, tok, path, pool_balance=balance)
        idx = m._pool_indices(4000, torch.Generator().manual_seed(0))
        got = sum(m.pool[i]["text"] in b for i in idx) / len(idx)
        assert got == pytest.approx(share, abs=0.03), balance
        assert len(set(idx)) == 44  # every row is still drawn


def test_t3_balance_draws_the_source_rows_class_balanced(teacher_and_tok, tmp_path):
    """balance=N: the source_fraction rows of a batch come from a BalancedSampler over the first N OOD
    stream rows (the pool rows are drawn as before, the batch is reproducible from its generator);
    without source_fraction it is a one-line error."""
    from fastkd.methods.base import BalancedSampler
    from fastkd.methods.base import StepInfo as SI

    teacher, tok = teacher_and_tok
    path = _pool_file(tmp_path, [(t, 0) for t in _structured_texts(20, 2)])
    plain = _t3(teacher, tok, path, source_fraction=0.5)
    m = _t3(teacher, tok, path, source_fraction=0.5, balance=40, balance_cache="none")
    assert plain.source_sampler is None and isinstance(m.source_sampler, BalancedSampler)

    def info(seed):
        return SI(step=0, micro=0, rank=0, world=1, batch_size=8, offset=0, generator=torch.Generator().manual_seed(seed))

    drawn = []
    draw = m.source_sampler.random_rows
    m.source_sampler.random_rows = lambda n, g: drawn.append(draw(n, g)) or drawn[-1]
    (view,) = m.batch(info(3))
    (again,) = m.batch(info(3))
    assert torch.equal(view.input_ids, again.input_ids) and view.input_ids.shape[0] == 8
    assert len(drawn) == 2 and drawn[0] == drawn[1] and len(drawn[0][0]) == 4  # half the batch, from the sampler
    assert set(drawn[0][0]) <= set(m.source_sampler.texts)  # rows of the labelled N
    from fastkd.methods import OptionError

    with pytest.raises(OptionError, match="t3 balance draws the source_fraction rows"):
        get_method("t3").parse_options({"generator": "x", "balance": "8"})


def test_t3_pool_weight_margin_draws_rows_by_teacher_margin(teacher_and_tok, tmp_path, monkeypatch):
    """pool_weight=margin draws each row with probability (floor + 1 - top-2 margin) / sum; uniform stays
    uniform; bad settings are errors. The tiny teacher is equally sure of every text, so the teacher's
    logits are replaced by a function of the row's length, and the margins are recomputed here in float64."""
    from types import SimpleNamespace

    teacher, tok = teacher_and_tok
    texts = [" ".join(_tiny.OOD_WORDS[: 1 + i % 9]) for i in range(30)]
    path = _pool_file(tmp_path, [(t, 0) for t in texts])
    floor = 0.05
    m = _t3(teacher, tok, path, pool_weight="margin", pool_weight_floor=floor)

    def fake_forward(model, view, side, *, hidden=False):
        n = view.attention_mask.sum(-1).float()
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(n), 0.5 * (n - 6.0)], -1))

    monkeypatch.setattr(m.ctx, "forward", fake_forward)
    want = []
    for r in m.pool:
        n = len(tok(r["text"], truncation=True, max_length=24)["input_ids"])
        p1 = 1.0 / (1.0 + math.exp(-0.5 * (n - 6.0)))
        want.append(floor + 1.0 - abs(2.0 * p1 - 1.0))
    want_t = torch.tensor(want, dtype=torch.float64)
    assert float(want_t.max() / want_t.min()) > 5
    idx = m._pool_indices(60000, torch.Generator().manual_seed(0))
    got = torch.bincount(torch.tensor(idx), minlength=len(texts)).double() / len(idx)
    torch.testing.assert_close(m._weights, want_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want_t / want_t.sum(), rtol=0, atol=0.006)
    u = _t3(teacher, tok, path)
    got_u = torch.bincount(torch.tensor(u._pool_indices(60000, torch.Generator().manual_seed(0))), minlength=30)
    assert float((got_u.double() / 60000 - 1 / 30).abs().max()) < 0.006 and u._weights is None
    with pytest.raises(ValueError, match="pool_weight must be uniform or margin"):
        _t3(teacher, tok, path, pool_weight="entropy")
    with pytest.raises(ValueError, match="pool_weight_floor must be > 0"):
        _t3(teacher, tok, path, pool_weight="margin", pool_weight_floor=0)
    with pytest.raises(ValueError, match="choose one"):
        _t3(teacher, tok, path, pool_weight="margin", pool_balance=True)


def test_bootstrap_delta_paired_uses_the_pairing():
    """Seeds that move both methods alike (a shared initialisation) widen the unpaired interval but
    cancel in the paired one; no common seed is an error."""
    from benchmarks.quality import bootstrap_delta, bootstrap_delta_paired

    rng = random.Random(3)
    levels = [0.45, 0.6, 0.75, 0.5, 0.7]  # the seed decides most of the accuracy
    b = {s: "".join(str(int(rng.random() < p)) for _ in range(1000)) for s, p in enumerate(levels)}
    # a = b with 3% of the wrong rows of each seed fixed: a small effect, the same under every seed
    a = {s: "".join("1" if c == "1" or rng.random() < 0.03 else "0" for c in row) for s, row in b.items()}
    d, lo, hi, ahead, k = bootstrap_delta_paired(a, b, draws=500)
    assert lo > 0 and lo < d < hi and (ahead, k) == (5, 5)
    d2, lo2, hi2 = bootstrap_delta(list(a.values()), list(b.values()), draws=500)
    assert d2 == pytest.approx(d) and lo2 < 0 < hi2  # unpaired: the seed spread swamps the effect
    same = bootstrap_delta_paired(b, b, draws=200)
    assert same[0] == 0.0 and same[1] <= 0 <= same[2] and same[3] == 0
    with pytest.raises(ValueError, match="share no seed"):
        bootstrap_delta_paired({0: "1"}, {1: "1"})


# --------------------------------------------------------------------------------------------
# zskd adv_balance: class-balanced weights on the adversarial rows
# --------------------------------------------------------------------------------------------
def test_balance_weights_give_the_target_class_mass():
    from fastkd.methods.zskd import balance_weights

    probs = torch.eye(3)[torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 0])].float()  # 70% / 20% / 10%
    target = torch.full((3,), 1 / 3)
    w = balance_weights(probs, target, cap=100.0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    mass = (w[:, None] * probs).mean(0)
    torch.testing.assert_close(mass, target, atol=1e-6, rtol=0)
    # the cap bounds each class's ratio to [1/2, 2]: class 2's 3.33 is held at 2, class 0's 0.48 at 0.5
    w2 = balance_weights(probs, target, cap=2.0)
    ratios = w2 / w2[0]
    assert ratios[8].item() == pytest.approx(2.0 / 0.5, rel=1e-5)
    assert ratios[6].item() == pytest.approx((1 / 3 / 0.2) / 0.5, rel=1e-5)
    # soft rows: a row's weight is its probabilities times the class ratios
    soft = torch.softmax(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), -1)
    w3 = balance_weights(soft, target, cap=100.0)
    r = target / soft.mean(0)
    torch.testing.assert_close(w3, (soft @ r) / (soft @ r).mean())


@pytest.mark.parametrize("mode", ["uniform", "clean"])
def test_zskd_adv_balance_weights_the_adversarial_kd_term(teacher_and_tok, mode):
    from types import SimpleNamespace

    from fastkd.loop import Trainee, micro_step_loss
    from fastkd.methods.base import StepInfo
    from fastkd.methods.zskd import balance_weights

    teacher, tok = teacher_and_tok
    cls = get_method("zskd")
    opts = {"pretrain_steps": 5, "generator_cache": "none", "min_gen_lift": 0, "adv_balance": mode}
    method = cls(_ctx(teacher, tok), cls.parse_options(opts))
    method.setup()
    ctx = method.ctx
    info = StepInfo(step=0, micro=0, rank=0, world=1, batch_size=8, offset=0, generator=torch.Generator().manual_seed(3))
    views = method.batch(info)
    assert [v.name for v in views] == ["ood", "adversarial"]
    cfg = SimpleNamespace(kd_weight=1.0, grad_accum=1, ce_weight=0.0)
    parts: dict = {}
    loss = micro_step_loss(cfg, ctx, method, views, Trainee(teacher, ctx.student, None, 0.0), parts)
    with torch.no_grad():
        t = [ctx.forward(teacher, v, "teacher").logits for v in views]
        s = [ctx.forward(ctx.student, v, "student").logits for v in views]
        rows = ctx.kd(s[1], t[1], reduction="none")
        p_adv, p_clean = torch.softmax(t[1].float(), -1), torch.softmax(t[0].float(), -1)
        target = torch.full((2,), 0.5) if mode == "uniform" else p_clean.mean(0)
        w = balance_weights(p_adv, target, 5.0)
        torch.testing.assert_close(rows.mean(), ctx.kd(s[1], t[1]))  # per-row terms on the batch-mean scale
        want = ctx.kd(s[0], t[0]) + (rows * w).sum() / w.sum()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["kd_adversarial"], rows.mean(), rtol=1e-5, atol=1e-7)  # logged: plain mean
    assert not torch.allclose(w, torch.ones_like(w))  # the weights do something here


def test_zskd_adv_candidates_keep_the_most_divergent_refill_per_row(teacher_and_tok):
    teacher, tok = teacher_and_tok
    cls = get_method("zskd")
    opts = {"pretrain_steps": 5, "generator_cache": "none", "min_gen_lift": 0, "mask_prob": 0.5}
    one = cls(_ctx(teacher, tok), cls.parse_options(opts))
    one.setup()
    four = cls(one.ctx, cls.parse_options({**opts, "adv_candidates": 4}))
    four.setup()
    view = one.ctx.encode_texts(one.ctx.ood_texts[:16])
    # the same draws: four's candidates are what four successive single refills give
    g1, g4 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    cands = [one._token_adversary(view, g1).input_ids for _ in range(4)]
    chosen = four._token_adversary(view, g4).input_ids
    div = four.row_divergence(view, cands)  # [4, 16]
    assert div.shape == (4, 16)
    best = div.argmax(0)
    for r in range(16):
        assert torch.equal(chosen[r], cands[int(best[r])][r])
    assert len({int(b) for b in best}) > 1  # rows pick different candidates: per row, not per batch
    # the kept rows are at least as divergent as any single candidate's, and more than the first's on average
    kept = four.row_divergence(view, [chosen])[0]
    torch.testing.assert_close(kept, div.max(0).values, rtol=1e-4, atol=1e-6)
    assert kept.mean() > div[0].mean()
    # the student's train/eval mode is restored after the scoring passes
    assert one.ctx.student.training
    with pytest.raises(ValueError, match="adv_candidates must be >= 1"):
        cls.parse_options({"adv_candidates": 0})


def test_zskd_adv_balance_option_errors(teacher_and_tok):
    cls = get_method("zskd")
    with pytest.raises(ValueError, match="adv_balance must be"):
        cls.parse_options({"adv_balance": "yes"})
    with pytest.raises(ValueError, match="adv_balance_cap must be >= 1"):
        cls.parse_options({"adv_balance_cap": 0.5})


def test_t3_gen_dtype_samples_in_bfloat16_and_keeps_float32_log_probs(teacher_and_tok, monkeypatch):
    """``gen_dtype=bfloat16`` runs ``generate`` under a bfloat16 autocast (the LM's matmuls then give
    bfloat16), while the REINFORCE log-probs of the same sequences stay float32; a bad value names the
    option."""
    from fastkd.methods.t3 import T3, Rewriter

    teacher, tok = teacher_and_tok
    seen: dict[str, torch.dtype] = {}

    def record(dtype_key):
        def hook(module, args, output):
            seen.setdefault(dtype_key, output.logits.dtype)

        return hook

    for dtype in ("bfloat16", "float32"):
        opts = T3.parse_options({"generator": _tiny.causal_lm_dir(), **_tiny.T3_OPTIONS, "gen_dtype": dtype})
        rw = Rewriter(teacher, tok, opts, device=torch.device("cpu"), max_length=24)
        handle = rw.lm.register_forward_hook(record(dtype))
        torch.manual_seed(0)
        texts, seq, mask, p_len = rw.sample(["tree river house", "a small boat"], [0, 1])
        handle.remove()
        assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
        lp, gmask = rw.token_logprobs(seq, mask, p_len)
        assert torch.isfinite(lp[gmask.bool()]).all() and (lp[gmask.bool()] <= 0).all()
    assert seen == {"bfloat16": torch.bfloat16, "float32": torch.float32}
    opts = T3.parse_options({"generator": _tiny.causal_lm_dir(), **_tiny.T3_OPTIONS, "gen_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="gen_dtype=bfloat16: torch has no autocast for device 'meta'"):
        Rewriter(teacher, tok, opts, device=torch.device("meta"), max_length=24)
    with pytest.raises(ValueError, match="gen_dtype must be float32 or bfloat16"):
        T3.parse_options({"generator": "lm", "gen_dtype": "float16"})


def test_quality_t3_pool_settings_per_task():
    """Each task's pool settings are T3_POOL with the task's own on top, and every key is a t3 option
    (or the pool's size)."""
    from benchmarks import quality as Q
    from fastkd.methods.t3 import T3

    for task in ("movie_reviews", "tweets"):
        got = Q.t3_pool_settings(task)
        assert (got["num_rows"], got["gen_batch"], got["gen_dtype"]) == (4096, 64, "float32")
        assert got["tune_steps"] == Q.T3_POOL["tune_steps"] == 8
    assert Q.T3_POOL["num_rows"] == 512 and Q.T3_POOL["gen_batch"] == 16 and "gen_dtype" not in Q.T3_POOL
    for task in Q.TASKS:
        got = Q.t3_pool_settings(task)
        T3.parse_options({"generator": "lm", **{k: v for k, v in got.items() if k != "num_rows"}})


def test_quality_t3_pool_rows_flag_lasts_one_call(monkeypatch, tmp_path):
    """--t3-pool-rows sets the pool size for the tasks of its own call and is undone afterwards."""
    from benchmarks import quality as Q

    seen = []
    monkeypatch.setattr(Q, "_main", lambda p, args: seen.append(Q.t3_pool_settings("movie_reviews")["num_rows"]) or 0)
    assert Q.main(["--work", str(tmp_path), "--tasks", "movie_reviews", "--dev", "x", "--t3-pool-rows", "100"]) == 0
    assert seen == [100]
    assert Q.t3_pool_settings("movie_reviews")["num_rows"] == 4096
    assert Q.t3_pool_settings("tweets")["num_rows"] == 4096


def test_quality_t3_pool_flag_sets_typed_generation_settings_for_one_call(monkeypatch, tmp_path, capsys):
    """--t3-pool KEY=VALUE changes a pool setting (typed as the t3 option) for the call's tasks only;
    unknown keys, the settings the benchmark owns and bad values are one-line errors naming the flag."""
    from benchmarks import quality as Q

    seen = []
    monkeypatch.setattr(Q, "_main", lambda p, args: seen.append(Q.t3_pool_settings("tweets")) or 0)
    argv = ["--work", str(tmp_path), "--tasks", "tweets", "--prepare-only"]
    prompt = "Write a {label} {task} inspired by: {text}"
    assert Q.main([*argv, "--t3-pool", "max_new_tokens=40", "--t3-pool", f"prompt={prompt}"]) == 0
    assert seen[0]["max_new_tokens"] == 40 and seen[0]["prompt"] == prompt and seen[0]["num_rows"] == 4096
    assert Q.t3_pool_settings("tweets")["max_new_tokens"] == 24 and "prompt" not in Q.t3_pool_settings("tweets")
    for bad, msg in [
        ("colour=red", "unknown option 'colour'"),
        ("max_new_tokens=many", "max_new_tokens"),
        ("prompt=no placeholders", "prompt must contain {label}"),
        ("pool_file=x.jsonl", "the benchmark sets it"),
        ("pool_balance=true", "use -O t3.pool_balance=VALUE"),
        ("num_rows=-3", "expected a positive number of rows"),
        ("max_new_tokens", "expected KEY=VALUE"),
    ]:
        with pytest.raises(SystemExit):
            Q.main([*argv, "--t3-pool", bad])
        err = capsys.readouterr().err
        assert msg in err and "--t3-pool" in err, (bad, err)
    assert len(seen) == 1
