"""fastkd.teacher: fine-tuning a tiny random BERT on a synthetic sentiment task, caching, the CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from fastkd import teacher as T

POS = ["good", "great", "fine", "superb", "lovely"]
NEG = ["bad", "awful", "dull", "poor", "boring"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "really", "quite", "a", "story"]


def tiny_encoder(path, hidden=32, layers=2):
    """Save a tiny random BertModel and a word-level tokenizer (no download) to ``path``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *FILLER]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


def synthetic_rows(n, seed):
    """Sentences of filler words plus one sentiment word; label 1 when it is a positive one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randrange(3, 8))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
        rows.append({"text": " ".join(words), "text_pair": None, "label": label})
    return rows


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert")


def test_classification_metrics_by_hand():
    m = T.classification_metrics([1, 1, 0, 0], [1, 0, 0, 0], 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert T.classification_metrics([0, 0], [0, 0], 2)["mcc"] == 0.0  # undefined -> 0


def test_finetune_learns_saves_and_loads(encoder, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    train, dev = synthetic_rows(256, 0), synthetic_rows(64, 1)
    out = tmp_path / "teacher"
    metrics = T.finetune(encoder, train, dev, out, epochs=4, lr=3e-3, batch_size=16, max_length=16, progress=False)
    assert metrics["accuracy"] >= 0.9, metrics
    assert metrics["num_labels"] == 2 and metrics["n"] == 64
    meta = json.loads((out / T.META_FILE).read_text())
    assert meta["settings"]["epochs"] == 4 and len(meta["history"]) == 4
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    logits = T.predict(model, tok, dev, max_length=16)
    acc = (logits.argmax(-1) == torch.tensor([r["label"] for r in dev])).float().mean().item()
    assert acc == pytest.approx(metrics["accuracy"])  # the saved model is the one that was scored
    clf = pipeline("text-classification", model=str(out))
    assert clf("the movie was great")[0]["label"] in model.config.id2label.values()


def test_finetune_is_seeded(encoder, tmp_path):
    train, dev = synthetic_rows(32, 0), synthetic_rows(16, 1)
    kw = {"epochs": 1, "batch_size": 8, "max_length": 16, "progress": False, "seed": 3}
    a = T.finetune(encoder, train, dev, tmp_path / "a", **kw)
    b = T.finetune(encoder, train, dev, tmp_path / "b", **kw)
    assert a["accuracy"] == b["accuracy"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cached_finetune_reuses_only_same_settings_and_data(encoder, tmp_path, monkeypatch):
    train, dev = synthetic_rows(32, 0), synthetic_rows(16, 1)
    kw = {"epochs": 1, "batch_size": 8, "max_length": 16, "progress": False}
    first, reused = T.cached_finetune(encoder, train, dev, tmp_path / "t", **kw)
    assert not reused
    calls = []
    real = T.finetune
    monkeypatch.setattr(T, "finetune", lambda *a, **k: calls.append(k) or real(*a, **k))
    again, reused = T.cached_finetune(encoder, train, dev, tmp_path / "t", **kw)
    assert reused and again == first and calls == []
    _, reused = T.cached_finetune(encoder, train, dev, tmp_path / "t", **{**kw, "lr": 1e-4})
    assert not reused and len(calls) == 1
    _, reused = T.cached_finetune(encoder, train[:-1], dev, tmp_path / "t", **{**kw, "lr": 1e-4})
    assert not reused and len(calls) == 2  # other training data


def test_bad_inputs(encoder, tmp_path):
    rows = synthetic_rows(4, 0)
    with pytest.raises(T.TeacherError, match="train_rows is empty"):
        T.finetune(encoder, [], rows, tmp_path / "x", progress=False)
    with pytest.raises(T.TeacherError, match=r"dev_rows\[0\]"):
        T.finetune(encoder, rows, [{"text": "a", "label": -1}], tmp_path / "x", progress=False)
    with pytest.raises(T.TeacherError, match="epochs"):
        T.finetune(encoder, rows, rows, tmp_path / "x", epochs=0, progress=False)
    with pytest.raises(T.TeacherError, match="cannot load"):
        T.finetune(tmp_path / "missing-model", rows, rows, tmp_path / "x", progress=False)


def test_read_labeled_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "text_pair": "z", "label": 0}\n')
    (tmp_path / "a.csv").write_text('text,label\n"x, quoted",1\n')
    (tmp_path / "a.tsv").write_text("text\ttext_pair\tlabel\nx\ty\t2\n")
    (tmp_path / "bad.csv").write_text("sentence,label\nx,1\n")
    assert T.read_labeled(str(tmp_path / "a.jsonl"))[1] == {"text": "y", "text_pair": "z", "label": 0}
    assert T.read_labeled(str(tmp_path / "a.csv")) == [{"text": "x, quoted", "text_pair": None, "label": 1}]
    assert T.read_labeled(str(tmp_path / "a.tsv")) == [{"text": "x", "text_pair": "y", "label": 2}]
    with pytest.raises(T.TeacherError, match="columns text and label"):
        T.read_labeled(str(tmp_path / "bad.csv"))
    with pytest.raises(T.TeacherError, match="no such file"):
        T.read_labeled(str(tmp_path / "none.jsonl"))


def test_cli(encoder, tmp_path, capsys):
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(32, 0)))
    dev.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(16, 1)))
    argv = [
        "--model",
        str(encoder),
        "--train",
        str(train),
        "--dev",
        str(dev),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "-o",
        str(tmp_path / "out"),
    ]
    assert T.main(argv) == 0
    assert "saved the teacher to" in capsys.readouterr().out
    assert T.main(argv) == 0
    assert "reused the cached teacher" in capsys.readouterr().out
    assert T.main([*argv[:4], "--train", str(tmp_path / "nope.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err
