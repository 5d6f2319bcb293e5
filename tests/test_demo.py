"""fastkd demo end to end on tiny random models and tiny fake assets (no download, no hub)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from fastkd import assets as A
from fastkd import demo as D
from fastkd import teacher as T

POS = ["good", "great", "fine", "superb", "lovely"]
NEG = ["bad", "awful", "dull", "poor", "boring"]
FILLER = ["the", "movie", "film", "was", "plot", "acting", "really", "quite", "a", "story"]
OOD = ["tree", "river", "stone", "animal", "water", "city", "small", "large", "of", "in", "made", "part"]
PROMPT = "rewrite following text as in one sentence , . : movie review negative positive".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(POS + NEG + FILLER + OOD + PROMPT)]


def _rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randrange(3, 8))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
        out.append({"text": " ".join(words), "label": label})
    return out


def _encoder(path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)


def _generator(path):
    """A tiny random Llama with a word-level tokenizer: stands in for SmolLM2 in t3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", *VOCAB[5:]]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    cfg = LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def fake_assets(tmp_path_factory):
    """Assets in the real layout: a tiny encoder, a synthetic review split, OOD sentences, a tiny LM."""
    root = tmp_path_factory.mktemp("assets")
    (root / "minilm").mkdir()
    _encoder(root / "minilm")
    mr = root / "movie_reviews"
    mr.mkdir()
    for split, n, seed in (("train", 160, 0), ("dev", 48, 1), ("test", 48, 2)):
        (mr / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    rng = random.Random(3)
    (root / "wordnet.txt").write_text(
        "\n".join(" ".join(rng.choices(OOD + FILLER, k=rng.randrange(3, 9))) for _ in range(300)) + "\n"
    )
    (root / "gen").mkdir()
    _generator(root / "gen")
    return A.Assets(
        cache_dir=str(root), minilm_dir=str(root / "minilm"), movie_reviews_dir=str(mr), wordnet_path=str(root / "wordnet.txt"),
        smollm2_dir=str(root / "gen"), smollm2_file="",
    )  # fmt: skip


@pytest.fixture
def patched(fake_assets, monkeypatch):
    asked = []

    def prepare(cache=None, *, assets=A.ASSETS, progress=True, register=True):
        asked.append(list(assets))
        return fake_assets

    monkeypatch.setattr(A, "prepare", prepare)
    return asked


TINY = [
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--batch-size",
    "8",
    "--student-layers",
    "1",
    "--student-hidden",
    "16",
    "--student-heads",
    "2",
    "--student-intermediate",
    "32",
    "--no-progress",
]


def test_demo_end_to_end_fast(patched, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--quick", "--methods", "random", "ood", "-o", str(out), "--cache", str(tmp_path / "cache"), *TINY]
    assert D.main(argv) == 0
    assert patched == [["minilm", "movie_reviews", "wordnet"]]  # no generator download without t3
    printed = capsys.readouterr().out
    assert "| method | test accuracy | % of teacher |" in printed
    md = (out / "results.md").read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ] == ["teacher", "random", "ood"]
    with open(out / "results.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"teacher", "random", "ood"}
    assert float(rows["teacher"]["pct_of_teacher"]) == 100.0
    for m in ("random", "ood"):
        assert 0.0 <= float(rows[m]["accuracy"]) <= 1.0
        assert float(rows[m]["compression"]) > 1.0  # the student is smaller
        assert int(rows[m]["parameters"]) < int(rows["teacher"]["parameters"])
        assert int(rows[m]["steps"]) == 4
        pct = 100 * float(rows[m]["accuracy"]) / float(rows["teacher"]["accuracy"])
        assert float(rows[m]["pct_of_teacher"]) == pytest.approx(pct)
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "results.json").read_text())
    assert [h["step"] for h in summary["methods"]["ood"]["history"]] == [2, 4]
    assert summary["teacher"]["source"] == "fine-tuned"
    assert summary["budget"]["name"] == "quick" and summary["budget"]["steps"] == 4
    # quick budget: the quick teacher (1 epoch), fine-tuned on the (at most 2,000) training rows
    assert summary["teacher"]["epochs"] == 1 and summary["teacher"]["train_rows"] == 160


def test_demo_reuses_the_cached_teacher(patched, tmp_path, monkeypatch):
    argv = ["--quick", "--methods", "random", "-o", str(tmp_path / "a"), "--cache", str(tmp_path / "cache"), *TINY]
    assert D.main(argv) == 0
    monkeypatch.setattr(T, "finetune", lambda *a, **k: pytest.fail("the cached teacher should have been reused"))
    argv[argv.index("-o") + 1] = str(tmp_path / "b")
    assert D.main(argv) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["teacher"]["source"] == "cached"


def test_demo_missing_asset_exits_2(monkeypatch, tmp_path, capsys):
    def prepare(*a, **k):
        raise A.AssetError("could not obtain the MiniLM encoder: no network")

    monkeypatch.setattr(A, "prepare", prepare)
    assert D.main(["--quick", "-o", str(tmp_path / "o")]) == 2
    assert "fastkd demo: error: could not obtain the MiniLM encoder" in capsys.readouterr().err


def test_budgets_and_overrides():
    parser = __import__("argparse").ArgumentParser()
    D.add_arguments(parser)
    quick = D.budget_from_args(parser.parse_args(["--quick"]))
    assert quick.name == "quick" and "t3" not in quick.methods and quick.steps < D.BUDGETS["cpu"].steps
    auto = D.budget_from_args(parser.parse_args(["--device", "cpu"]))
    assert auto.name == "cpu" and set(auto.methods) == set(D.METHODS)
    custom = D.budget_from_args(parser.parse_args(["--budget", "gpu", "--steps", "7", "--methods", "t3"]))
    assert (custom.name, custom.steps, custom.methods, custom.batch_size) == ("gpu", 7, ("t3",), 64)
    with pytest.raises(D.DemoError, match="--steps must be >= 1"):
        D.budget_from_args(parser.parse_args(["--steps", "0"]))


def test_default_student_is_5x_smaller_than_minilm():
    """The default student shape against the real MiniLM config (built, not downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification

    from fastkd.student import build_student, count_parameters

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        num_labels=2,
    )
    teacher = BertForSequenceClassification(cfg)
    n_teacher = count_parameters(teacher)
    assert 22.7e6 < n_teacher < 22.8e6
    s = D.STUDENT
    student = build_student(
        teacher, layers=s["layers"], hidden=s["hidden"], heads=s["heads"], intermediate=s["intermediate"], init="random"
    )
    assert n_teacher / count_parameters(student) >= 5.0


def test_render_table():
    row = {
        "method": "zskd",
        "accuracy": 0.8123,
        "pct_of_teacher": 95.55,
        "parameters": 4_300_000,
        "compression": 5.26,
        "speedup": 7.04,
        "wall_time_s": 150.0,
    }
    table = D.render_table(
        [row, {**row, "method": "t3", "accuracy": None, "pct_of_teacher": None, "wall_time_s": None}]
    )
    assert "| zskd | 81.2% | 95.5% | 4.3 M | 5.3x | 7.0x | 2.5 min |" in table
    assert "| t3 | failed |  |" in table


def test_demo_all_methods_with_tiny_generator(patched, tmp_path, monkeypatch):
    import dataclasses

    # the tiny generator cannot beat the unigram baseline; its refusal is tested in test_method_generators
    cpu = D.BUDGETS["cpu"]
    options = {**cpu.method_options, "zskd": {**cpu.method_options.get("zskd", {}), "min_gen_lift": 0}}
    monkeypatch.setitem(D.BUDGETS, "cpu", dataclasses.replace(cpu, method_options=options))
    out = tmp_path / "all"
    argv = ["--budget", "cpu", "-o", str(out), "--cache", str(tmp_path / "cache"), *TINY]
    assert D.main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["teacher", *D.METHODS]
    failed = {m: d["error"] for m, d in summary["methods"].items() if "error" in d}
    assert failed == {}
    assert all(r["accuracy"] is not None for r in summary["rows"])
