"""``fastkd distill --method offline --teacher-logits DIR``: train from stored teacher logits; the
teacher's weights initialise the student and its forward never runs."""

from __future__ import annotations

import functools
import json
import os

import _tiny
import pytest
import torch
from transformers import BertForSequenceClassification

import fastkd
from fastkd.cli import main
from fastkd.errors import DistillError
from fastkd.logits import TeacherLogits, write_teacher_logits
from fastkd.loop import distill
from fastkd.models import load_classifier, predict_logits


@functools.cache
def _rows_file() -> str:
    return _tiny.write_rows(os.path.join(_tiny.workdir(), "offline-rows.jsonl"), _tiny.task_rows(48, seed=21))


@functools.cache
def _logits_dir() -> str:
    """`fastkd logits` on the tiny teacher over the labeled rows, K = V (both classes), T = 1."""
    out = os.path.join(_tiny.workdir(), "offline-logits")
    if not os.path.isfile(os.path.join(out, "index.json")):
        argv = ["logits", "--teacher", _tiny.teacher_dir(), "--data", _rows_file(), "--top-k", "2", "--out", out]
        assert main(argv) == 0
    return out


def _config(out_dir, **kw):
    # the tiny config's temperature is 1.0, as the logits were stored; no eval file unless asked
    return _tiny.config("offline", out_dir, teacher_logits=_logits_dir(), **{"eval": None, **kw})


def _losses(out_dir) -> list[tuple[int, float]]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if not r.get("eval")]


def _student_state(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "student", "model.safetensors"))


@pytest.fixture
def teacher_spy(monkeypatch):
    """The tiny teacher, with BertForSequenceClassification.forward wrapped: a call on the teacher
    fails the test, calls on other models (the student) are counted."""
    teacher, tok = load_classifier(_tiny.teacher_dir())
    calls = {"teacher": 0, "other": 0}
    original = BertForSequenceClassification.forward

    def spy(self, *args, **kwargs):
        if self is teacher:
            calls["teacher"] += 1
            raise AssertionError("the teacher's forward ran in offline mode")
        calls["other"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", spy)
    return teacher, tok, calls


# --------------------------------------------------------------------------------------------
# training from stored logits
# --------------------------------------------------------------------------------------------
def test_offline_run_trains_and_never_runs_the_teacher(tmp_path, teacher_spy, monkeypatch):
    teacher, tok, calls = teacher_spy
    files = _tiny.data_files()
    cfg = _config(
        tmp_path, max_steps=30, batch_size=16, eval=files["eval"], eval_every=15, student_init="random", lr=1e-2
    )  # a random student: the teacher's copy starts at a KD loss of ~0
    result = distill(cfg, teacher=teacher, tokenizer=tok)
    assert calls["teacher"] == 0 and calls["other"] >= 30  # the student ran every step, the teacher never
    # evaluation without the teacher: no teacher columns, student metrics only
    assert result.teacher_metrics == {}
    assert "accuracy" in result.final and "agreement" not in result.final and "kl_to_teacher" not in result.final
    losses = [loss for _, loss in _losses(tmp_path)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5, losses
    monkeypatch.undo()  # now the teacher may run: does the student agree with it on the stored rows?
    rows = [json.loads(line) for line in open(_rows_file(), encoding="utf-8")]
    student, _ = load_classifier(result.student_dir)
    t = predict_logits(teacher, tok, rows, max_length=24).argmax(-1)
    s = predict_logits(student, tok, rows, max_length=24).argmax(-1)
    assert float((t == s).float().mean()) >= 0.9


def test_offline_run_equals_the_live_teacher_run_on_the_same_rows(tmp_path):
    """K = V: the KD term from the stored logits is the live KL, so `offline` over the stored rows
    trains the same student as `supervised` (live teacher, KD only) over the same rows file."""
    teacher, tok = load_classifier(_tiny.teacher_dir())
    kw = {"max_steps": 6, "eval": None, "student_init": "random", "lr": 1e-2}  # losses well above 0
    offline = tmp_path / "offline"
    distill(_config(offline, **kw), teacher=teacher, tokenizer=tok)
    live = tmp_path / "live"
    distill(_tiny.config("supervised", live, train=_rows_file(), **kw), teacher=teacher, tokenizer=tok)
    a, b = _losses(offline), _losses(live)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (a, b)
    sa, sb = _student_state(offline), _student_state(live)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-4, msg=k)


def test_one_batch_kd_from_stored_logits_equals_distill_loss_on_live_logits():
    teacher, tok = load_classifier(_tiny.teacher_dir())
    store = TeacherLogits(_logits_dir())
    rows = [json.loads(line) for line in open(_rows_file(), encoding="utf-8")][:16]
    live = predict_logits(teacher, tok, rows, max_length=24).float()
    got = [store.row(i) for i in range(16)]
    ids = torch.cat([r["ids"] for r in got])
    vals = torch.cat([r["logits"] for r in got])
    lse = torch.cat([r["lse"] for r in got])
    assert ids.shape == (16, 2)  # K = V: every class stored
    student = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    stored = fastkd.topk_distill_loss(student, ids, vals, teacher_logsumexp=lse, temperature=1.0)
    ref = fastkd.distill_loss(student, live, temperature=1.0, divergence="kl")
    assert abs(float(stored) - float(ref)) <= 1e-5, (float(stored), float(ref))
    assert float(ref) > 0.01  # not trivially equal


# --------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------
def test_offline_stop_and_resume_equals_the_straight_run(tmp_path):
    teacher, tok = load_classifier(_tiny.teacher_dir())
    teacher.config.hidden_dropout_prob = 0.1  # the student trains with dropout: resume must restore the RNG
    teacher.config.attention_probs_dropout_prob = 0.1
    kw = {"max_steps": 6, "batch_size": 16}  # 6 x 16 rows over 48 stored rows: two epochs of the stream
    distill(_config(tmp_path / "straight", **kw), teacher=teacher, tokenizer=tok)
    first = distill(_config(tmp_path / "split", stop_after=3, **kw), teacher=teacher, tokenizer=tok)
    assert first.steps == 3 and first.interrupted
    second = distill(_config(tmp_path / "split", resume=True, **kw), teacher=teacher, tokenizer=tok)
    assert second.steps == 6 and not second.interrupted
    a, b = _student_state(tmp_path / "straight"), _student_state(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "split")


# --------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, before any work
# --------------------------------------------------------------------------------------------
def _cli(out_dir, logits_dir, *extra) -> list[str]:
    return [
        "distill", "--teacher", _tiny.teacher_dir(), "--method", "offline", "--teacher-logits", str(logits_dir),
        "--out-dir", str(out_dir), "--max-length", "24", "--batch-size", "8", "--max-steps", "2", "--threads", "1",
        "--no-progress", "--student-layers", "1", "--temperature", "1.0", *extra,
    ]  # fmt: skip


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_cli_trains_from_stored_logits(tmp_path, capsys):
    assert main(_cli(tmp_path / "run", _logits_dir(), "--eval", _tiny.data_files()["eval"])) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n") :])
    assert summary["steps"] == 2 and summary["teacher"] == {} and "accuracy" in summary["final"]
    assert os.path.isfile(tmp_path / "run" / "student" / "model.safetensors")


def test_cli_refuses_a_tokenizer_mismatch(tmp_path, capsys):
    teacher, _ = load_classifier(_tiny.teacher_dir())
    other = _tiny.bert_tokenizer()
    other.add_tokens(["zebra"])  # another vocabulary: other ids for the same text
    rows = [json.loads(line) for line in open(_rows_file(), encoding="utf-8")][:8]
    write_teacher_logits(teacher, other, rows, str(tmp_path / "logits"), top_k=2)
    assert main(_cli(tmp_path / "run", tmp_path / "logits")) == 2
    line = _one_line_error(capsys)
    assert line.startswith("fastkd distill: error: --teacher-logits:") and "tokenizer" in line and "differs" in line
    assert not os.path.exists(tmp_path / "run" / "student")


def test_cli_refuses_a_temperature_mismatch(tmp_path, capsys):
    assert main(_cli(tmp_path / "run", _logits_dir(), "--temperature", "2.0")) == 2
    line = _one_line_error(capsys)
    assert "temperature 1.0, training asks for 2.0" in line


def test_causal_lm_logits_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _tiny.causal_lm_dir()
    lm, lm_tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    write_teacher_logits(lm, lm_tok, ["good movie", "bad plot"], str(tmp_path / "lm"), top_k=4)
    with pytest.raises(DistillError, match=r"holds causal_lm logits.*DistillationTrainer"):
        distill(_tiny.config("offline", tmp_path / "run", teacher_logits=str(tmp_path / "lm"), eval=None))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"divergence": "jsd"}, r"divergence must be kl with --teacher-logits"),
        ({"hidden_weight": 1.0}, r"hidden_weight must be 0 with --teacher-logits"),
        ({"teacher_logits": None}, r"method 'offline' needs --teacher-logits DIR"),
        ({"teacher_logits": "/nonexistent/logits"}, r"--teacher-logits '/nonexistent/logits' is not a folder"),
        ({"method": "ood"}, r"--teacher-logits is read by method offline only, not 'ood'"),
        ({"max_length": 4}, r"rows of up to \d+ tokens but max_length is 4"),
    ],
)
def test_bad_offline_options_are_one_line_errors(tmp_path, change, match):
    cfg = _config(tmp_path, max_steps=1)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(DistillError, match=match) as e:
        distill(cfg)
    assert "\n" not in str(e.value)
