"""Offline teacher logits: ``fastkd logits`` writes shards + index, TeacherLogits reads them back."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _tiny import bert_tokenizer, causal_lm_dir, task_rows, teacher_dir, write_rows

from fastkd.logits import TeacherLogits, TeacherLogitsError, tokenizer_fingerprint, write_teacher_logits


def _causal():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = causal_lm_dir()
    return AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("k", [5, 10_000])
def test_causal_lm_round_trip_across_shards(tmp_path, k):
    model, tok = _causal()
    texts = [r["text"] for r in task_rows(7, seed=11)]
    write_teacher_logits(model, tok, texts, str(tmp_path), top_k=k, temperature=2.0, batch_size=3, rows_per_shard=3)
    tl = TeacherLogits(str(tmp_path))
    V = model.config.vocab_size
    assert len(tl) == 7 and tl.kind == "causal_lm" and tl.top_k == min(k, V) and tl.vocab_size == V
    assert len(tl.index["shards"]) == 3  # 3 + 3 + 1 rows
    for i, text in enumerate(texts):
        r = tl.row(i)
        enc = tok(text, return_tensors="pt")
        assert torch.equal(r["input_ids"], enc["input_ids"][0])
        with torch.no_grad():
            logits = model(**enc).logits[0].float()
        L = enc["input_ids"].shape[1]
        assert r["ids"].dtype == torch.int32 and r["ids"].shape == (L, min(k, V))
        torch.testing.assert_close(r["logits"], logits.gather(-1, r["ids"].long()))
        torch.testing.assert_close(r["logits"][:, 0], logits.max(-1).values)  # the top entry first
        torch.testing.assert_close(r["lse"], torch.logsumexp(logits / 2.0, -1))
        if k >= V:  # every id once
            assert torch.equal(r["ids"].sort(-1).values, torch.arange(V, dtype=torch.int32).expand(L, V))


def test_classifier_rows_and_labels(tmp_path):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir())
    tok = bert_tokenizer()
    rows = task_rows(5, seed=12)
    write_teacher_logits(teacher, tok, rows, str(tmp_path), top_k=2)
    tl = TeacherLogits(str(tmp_path))
    assert tl.kind == "classifier" and tl.index["labeled"]
    for i, row in enumerate(rows):
        r = tl.row(i)
        enc = tok(row["text"], return_tensors="pt")
        with torch.no_grad():
            logits = teacher(**enc).logits[0]
        assert r["ids"].shape == (1, 2) and r["label"] == row["label"]
        assert torch.equal(r["input_ids"], enc["input_ids"][0])
        torch.testing.assert_close(r["logits"][0], logits.gather(-1, r["ids"][0].long()))
    ds = tl.dataset()
    assert set(ds[0]) == {"input_ids", "attention_mask", "teacher_ids", "teacher_logits", "teacher_lse", "labels"}


def test_tokenizer_fingerprint_and_checks(tmp_path):
    model, tok = _causal()
    write_teacher_logits(model, tok, ["good movie", "bad plot"], str(tmp_path), top_k=3)
    tl = TeacherLogits(str(tmp_path))
    tl.check_tokenizer(tok)  # same tokenizer: fine
    assert tokenizer_fingerprint(tok) == tl.index["tokenizer_fingerprint"]
    other = bert_tokenizer()
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    with pytest.raises(TeacherLogitsError, match=r"tokenizer .* differs"):
        tl.check_tokenizer(other)
    tl.check_temperature(1.0)
    with pytest.raises(TeacherLogitsError, match=r"temperature 1\.0, training asks for 2\.0"):
        tl.check_temperature(2.0)
    with pytest.raises(IndexError):
        tl.row(2)


def test_bad_folder_and_arguments(tmp_path):
    with pytest.raises(TeacherLogitsError, match=r"has no index\.json"):
        TeacherLogits(str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(TeacherLogitsError, match="is not a fastkd-teacher-logits"):
        TeacherLogits(str(tmp_path))
    model, tok = _causal()
    with pytest.raises(TeacherLogitsError, match="top_k must be a positive int"):
        write_teacher_logits(model, tok, ["good"], str(tmp_path / "x"), top_k=0)


def test_cli(tmp_path):
    from fastkd.cli import main

    data = write_rows(str(tmp_path / "rows.jsonl"), task_rows(6, seed=13))
    out = tmp_path / "logits"
    assert main(["logits", "--teacher", causal_lm_dir(), "--data", data, "--top-k", "4", "--out", str(out),
                 "--temperature", "2.0", "--batch-size", "4"]) == 0  # fmt: skip
    tl = TeacherLogits(str(out))
    assert len(tl) == 6 and tl.top_k == 4 and tl.temperature == 2.0
    assert tl.index["source"]["teacher"] == os.path.abspath(causal_lm_dir())


def test_cli_error_is_one_line(tmp_path, capsys):
    from fastkd.cli import main

    data = write_rows(str(tmp_path / "rows.jsonl"), task_rows(2, seed=14))
    rc = main(["logits", "--teacher", causal_lm_dir(), "--data", data, "--top-k", "0", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "fastkd logits: error: top_k must be a positive int" in capsys.readouterr().err
