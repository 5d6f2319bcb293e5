"""fastkd.data (labeled rows, OOD text, named sources, resumable sampling) and fastkd.metrics."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from fastkd import data as fdata
from fastkd.metrics import classification_metrics, confusion_matrix


# --------------------------------------------------------------------------------------------
# labeled files
# --------------------------------------------------------------------------------------------
def test_load_labeled_csv_tsv_jsonl(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('text,text_pair,label\n"good, really",,1\nbad,"other, part",0\n', encoding="utf-8")
    tsv_path = tmp_path / "a.tsv"
    tsv_path.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n", encoding="utf-8")
    jsonl_path = tmp_path / "a.jsonl"
    jsonl_path.write_text(
        json.dumps({"text": "x", "label": 1}) + "\n\n" + json.dumps({"sentence1": "p", "sentence2": "h", "label": "0"}),
        encoding="utf-8",
    )
    assert fdata.load_labeled(str(csv_path)) == [
        {"text": "good, really", "text_pair": None, "label": 1},
        {"text": "bad", "text_pair": "other, part", "label": 0},
    ]
    assert fdata.load_labeled(str(tsv_path)) == [
        {"text": "good film", "text_pair": None, "label": 1},
        {"text": "bad film", "text_pair": None, "label": 0},
    ]
    assert fdata.load_labeled(str(jsonl_path)) == [
        {"text": "x", "text_pair": None, "label": 1},
        {"text": "p", "text_pair": "h", "label": 0},  # columns are read per row (GLUE names too)
    ]


def test_load_labeled_glue_pairs_and_label_names(tmp_path):
    p = tmp_path / "mnli.jsonl"
    p.write_text(
        "\n".join(
            json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "label": lab}) for i, lab in enumerate(["Yes", "no"])
        ),
        encoding="utf-8",
    )
    rows = fdata.load_labeled(str(p), label2id={"no": 0, "yes": 1})
    assert rows == [
        {"text": "p0", "text_pair": "h0", "label": 1},
        {"text": "p1", "text_pair": "h1", "label": 0},
    ]
    with pytest.raises(fdata.DataError, match="label 'Yes' is a name"):
        fdata.load_labeled(str(p))


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ("", ".jsonl", "is empty"),
        ("text,label\n", ".csv", "is empty"),
        ("words,label\nx,1\n", ".csv", "needs a text column"),
        ('{"text": "x", "label": 1}\n{"label": 0}\n', ".jsonl", "row 1 needs a text column"),
        ("text\nx\n", ".csv", "label column"),
        ('{"text": "x", "label": 1}\n{broken', ".jsonl", r":2: not valid JSON"),
        ("text,label\nx,1.5\n", ".csv", "not an integer"),
        ("a\tb\n", ".txt", "plain text has no labels"),
    ],
)
def test_load_labeled_bad_files(tmp_path, content, suffix, match):
    p = tmp_path / f"bad{suffix}"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(fdata.DataError, match=match):
        fdata.load_labeled(str(p))


def test_missing_sources_are_clear(tmp_path, monkeypatch):
    with pytest.raises(fdata.DataError, match="no such file"):
        fdata.load_labeled(str(tmp_path / "missing.csv"))
    with pytest.raises(fdata.DataError, match="no such file"):
        fdata.load_text("./nowhere/corpus.txt")
    # a bare name that is neither a file nor a registered source goes to `datasets`; without it installed
    # the error says so
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(fdata.DataError, match="datasets"):
        fdata.load_text("some_unregistered_corpus")


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
def test_load_text_file_folder_and_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("  one  \n\n two\n", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("skip me\n", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("nested\n", encoding="utf-8")
    assert fdata.load_text(str(tmp_path / "a.txt")) == ["one", "two"]
    assert fdata.load_text(str(tmp_path)) == ["one", "two", "second file", "nested"]
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"text": "made up", "label": 1, "intended_label": 1}) + "\n", encoding="utf-8")
    assert fdata.load_text(str(gen)) == ["made up"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(fdata.DataError, match="empty"):
        fdata.load_text(str(empty))


def test_named_sources_with_split():
    calls = []

    def corpus(split):
        calls.append(split)
        return [{"text": f"{split}-a", "label": 0}, {"text": f"{split}-b", "label": 1}]

    fdata.register_source("unit_corpus", corpus)
    try:
        assert "unit_corpus" in fdata.registered_sources()
        assert fdata.load_labeled("unit_corpus:dev")[1] == {"text": "dev-b", "text_pair": None, "label": 1}
        assert fdata.load_text("unit_corpus") == ["None-a", "None-b"]
        assert calls == ["dev", None]
    finally:
        fdata._SOURCES.pop("unit_corpus", None)
    with pytest.raises(ValueError, match="source name"):
        fdata.register_source("a:b", corpus)
    with pytest.raises(TypeError, match="callable"):
        fdata.register_source("x", "not callable")


def test_failing_source_names_itself():
    def broken(split):
        raise OSError("disk on fire")

    fdata.register_source("unit_broken", broken)
    try:
        with pytest.raises(fdata.DataError, match=r"unit_broken.*disk on fire"):
            fdata.load_text("unit_broken")
    finally:
        fdata._SOURCES.pop("unit_broken", None)


def test_in_memory_lists():
    assert fdata.load_text(["a ", "", "b"]) == ["a", "b"]
    assert fdata.load_labeled([{"text": "t", "label": 2}]) == [{"text": "t", "text_pair": None, "label": 2}]


def test_datasets_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert fdata.load_labeled(str(tmp_path / "ds")) == [
        {"text": "good", "text_pair": None, "label": 1},
        {"text": "bad", "text_pair": None, "label": 0},
    ]
    assert fdata.load_text(str(tmp_path / "ds")) == ["good", "bad"]


# --------------------------------------------------------------------------------------------
# sampling and tokenisation
# --------------------------------------------------------------------------------------------
def test_shuffled_stream_is_positional():
    s = fdata.ShuffledStream(7, seed=3)
    first = s.indices(0, 7)
    assert sorted(first) == list(range(7))  # one epoch = one permutation
    assert sorted(s.indices(7, 7)) == list(range(7))
    assert s.indices(7, 7) != first  # another epoch, another order
    whole = s.indices(0, 20)
    assert whole == s.indices(0, 9) + s.indices(9, 11)  # positions, not iterator state
    assert fdata.ShuffledStream(7, seed=3).indices(5, 10) == whole[5:15]
    assert fdata.ShuffledStream(7, seed=4).indices(0, 7) != first
    with pytest.raises(ValueError, match="n > 0"):
        fdata.ShuffledStream(0, 1)


def test_mix_seed_stable_and_spread():
    assert fdata.mix_seed(1, 2, 3) == fdata.mix_seed(1, 2, 3)
    seeds = {fdata.mix_seed(0, s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200
    assert all(0 <= x < 2**63 for x in seeds)


def test_encode_pairs_and_truncation():
    from _tiny import bert_tokenizer

    tok = bert_tokenizer()
    enc = fdata.encode(tok, ["good movie", "bad"], ["the plot", None], max_length=5)
    assert enc["input_ids"].shape == (2, 5)
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1][: enc["input_ids"].shape[1]]
    single = fdata.encode(tok, ["good movie very good"], max_length=4)
    assert single["input_ids"][0, 0].item() == tok.cls_token_id
    assert single["input_ids"][0, -1].item() == tok.sep_token_id


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def test_metrics_binary_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 1, 0, 0, 0, 1, 0, 1]
    # tp=3 fn=1 fp=1 tn=3
    m = classification_metrics(p, y)
    assert m["accuracy"] == pytest.approx(6 / 8)
    f1_pos = 2 * 3 / (2 * 3 + 1 + 1)
    f1_neg = 2 * 3 / (2 * 3 + 1 + 1)
    assert m["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    assert m["mcc"] == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))


def test_metrics_multiclass_and_degenerate():
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    p = torch.tensor([0, 2, 2, 2, 1, 1])
    c = confusion_matrix(p, y, 3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    m = classification_metrics(p, y)
    f1 = [2 * 1 / (2 + 0 + 1), 2 * 1 / (2 + 1 + 1), 2 * 2 / (4 + 1 + 0)]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    # Gorodkin's R_K from its definition
    s, correct = 6, 4
    pk, tk = [1, 2, 3], [2, 2, 2]
    num = correct * s - sum(a * b for a, b in zip(pk, tk))
    den = math.sqrt((s * s - sum(a * a for a in pk)) * (s * s - sum(b * b for b in tk)))
    assert m["mcc"] == pytest.approx(num / den)
    const = classification_metrics([1, 1, 1, 1], [0, 1, 0, 1])
    assert const["mcc"] == 0.0 and const["accuracy"] == 0.5
    assert const["macro_f1"] == pytest.approx((0 + 2 / 3) / 2)
    with pytest.raises(TypeError, match="preds"):
        classification_metrics(torch.tensor([0.5]), [0])
    with pytest.raises(ValueError, match="same length"):
        classification_metrics([0, 1], [0])


def test_datasets_hub_name_and_split_with_a_stand_in_module(monkeypatch):
    """The `datasets` path (hub name, name:split, DatasetDict) against a stand-in module."""
    import types

    calls = []

    class DatasetDict(dict):
        pass

    def load_dataset(name, split=None):
        calls.append((name, split))
        return [{"text": f"{name}/{split}", "label": 1}]

    fake = types.SimpleNamespace(load_dataset=load_dataset, load_from_disk=None, DatasetDict=DatasetDict)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert fdata.load_labeled("org/sst2:validation") == [{"text": "org/sst2/validation", "text_pair": None, "label": 1}]
    assert fdata.load_text("wikitext") == ["wikitext/train"]
    assert calls == [("org/sst2", "validation"), ("wikitext", "train")]

    def load_dict(name, split=None):
        return DatasetDict(test=[{"text": "a", "label": 0}])

    fake.load_dataset = load_dict
    assert fdata.load_text("dictcorpus") == ["a"]  # no split asked: the only one
    with pytest.raises(fdata.DataError, match="has no split 'validation'"):
        fdata.load_text("dictcorpus:validation")


def test_macro_f1_averages_over_the_classes_in_labels_or_predictions_by_hand():
    # labels [0, 1, 0, 0], predictions [0, 2, 0, 1] (a 4-class model; class 3 never occurs)
    # class 0: tp 2, 3 true, 2 predicted -> F1 = 2*2 / (3 + 2) = 0.8
    # class 1: tp 0, 1 true, 1 predicted -> F1 = 0
    # class 2: tp 0, 0 true, 1 predicted -> F1 = 0 (counted: scikit-learn's labels=None takes the
    #          union of the classes in y_true and y_pred)
    # class 3: in neither -> not counted (averaging over all 4 model classes would give 0.2)
    m = classification_metrics([0, 2, 0, 1], [0, 1, 0, 0])
    assert m["macro_f1"] == pytest.approx(0.8 / 3)
    assert m["accuracy"] == pytest.approx(0.5)


def test_one_metrics_implementation():
    import fastkd.models
    import fastkd.teacher

    assert not hasattr(fastkd.teacher, "classification_metrics")
    assert fastkd.models.classification_metrics is classification_metrics
