"""fastkd.teacher: fine-tuning a tiny random BERT on a synthetic sentiment task, caching, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fastkd import teacher as T
from fastkd.models import predict_logits

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
    logits = predict_logits(model, tok, dev, max_length=16)
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


def test_label_names_map_to_sorted_ids_and_travel_with_the_teacher(encoder, tmp_path, capsys):
    """A CSV whose label column holds names: the teacher maps them (sorted, stable), saves id2label /
    label2id, and every later reader of that task maps names through the teacher's label2id."""
    import csv

    from fastkd.cli import main as cli_main

    names = {0: "sports", 1: "politics", 2: "tech"}  # sorted: politics=0, sports=1, tech=2
    rng = random.Random(0)

    def write(path, n):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                k = rng.randrange(3)
                w.writerow([" ".join(rng.choices(FILLER, k=4) + [["ball", "vote", "chip"][k]]), names[k]])

    write(tmp_path / "train.csv", 48)
    write(tmp_path / "dev.csv", 12)
    out = tmp_path / "teacher"
    argv = ["--model", str(encoder), "--train", str(tmp_path / "train.csv"), "--dev", str(tmp_path / "dev.csv"),
            "--epochs", "1", "--batch-size", "8", "--max-length", "16", "-o", str(out)]  # fmt: skip
    assert T.main(argv) == 0
    assert "labels ['politics', 'sports', 'tech']" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["label2id"] == {"politics": 0, "sports": 1, "tech": 2}
    assert config["id2label"] == {"0": "politics", "1": "sports", "2": "tech"}
    # `fastkd eval` reads the same named labels through the teacher's label2id
    assert cli_main(["eval", "--model", str(out), "--data", str(tmp_path / "dev.csv"), "--max-length", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 12
    # a name the teacher does not know is a one-line error naming it, exit status 2
    (tmp_path / "odd.csv").write_text("text,label\nsome text,weather\n")
    assert cli_main(["eval", "--model", str(out), "--data", str(tmp_path / "odd.csv")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and "'weather'" in err[0] and "politics" in err[0] and err[0].startswith("fastkd eval: error:")


def test_label_names_and_integers_do_not_mix(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,1\nb,pos\n")
    (tmp_path / "dev.csv").write_text("text,label\na,1\n")
    with pytest.raises(T.TeacherError, match="mixes names"):
        T.read_labeled_splits(str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"))


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
    assert T.main([*argv[:4], "--train", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
