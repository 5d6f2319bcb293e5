"""Tiny offline models and data for the method / loop / CLI tests (no downloads).

* a word-level BERT tokenizer over a small vocabulary (PreTrainedTokenizerFast, built in memory);
* a synthetic sentiment task: sentences of neutral words with words of one polarity, label =
  polarity; a tiny BERT teacher fine-tuned on it in a few seconds (cached per process);
* an out-of-domain corpus: other topics, with sentiment words in some sentences only;
* a tiny random Llama causal LM with its own word-level tokenizer (for T3).
"""

from __future__ import annotations

import functools
import json
import os
import random
import tempfile

import torch

POS = "good great excellent wonderful love happy delightful brilliant fun charming superb enjoyable".split()
NEG = "bad awful terrible boring hate sad dull poor mess weak dreadful tedious".split()
NEUTRAL = (
    "the a movie film plot actor scene story it was is this and of with very quite rather director music "
    "ending characters script camera its an to in on for as"
).split()
OOD_WORDS = (
    "tree river house car city book table water light stone garden window road bird animal plant metal "
    "country person day year part place thing way group number system kind form state"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(POS + NEG + NEUTRAL + OOD_WORDS))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip


def task_rows(n: int, seed: int, pair: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 9))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
        row = {"text": " ".join(words), "text_pair": None, "label": label}
        if pair:
            row["text_pair"] = " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 5)))
        rows.append(row)
    return rows


def ood_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(OOD_WORDS + NEUTRAL[:8]) for _ in range(rng.randint(4, 12))]
        if rng.random() < 0.85:  # other topics, but opinionated words in most sentences
            for _ in range(rng.randint(1, 2)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(POS + NEG))
        out.append(" ".join(words))
    return out


def write_rows(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def bert_config(vocab_size: int, layers: int = 2, hidden: int = 32, heads: int = 2, labels: int = 2):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, id2label={0: "negative", 1: "positive"} if labels == 2 else None,
        label2id={"negative": 0, "positive": 1} if labels == 2 else None,
    )  # fmt: skip


@functools.cache
def workdir() -> str:
    return tempfile.mkdtemp(prefix="fastkd-tiny-")


@functools.cache
def teacher_dir(layers: int = 2, hidden: int = 32, steps: int = 150) -> str:
    """A tiny BERT fine-tuned on the synthetic task (~100% accuracy), saved with its tokenizer."""
    from transformers import BertForSequenceClassification

    from fastkd.data import encode

    out = os.path.join(workdir(), f"teacher-{layers}-{hidden}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = bert_tokenizer()
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    model = BertForSequenceClassification(bert_config(len(tok), layers, hidden))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = task_rows(steps * 32, seed=1)
    model.train()
    for i in range(steps):
        batch = rows[i * 32 : (i + 1) * 32]
        enc = encode(tok, [r["text"] for r in batch], max_length=32)
        loss = model(**enc, labels=torch.tensor([r["label"] for r in batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.random.set_rng_state(state)
    torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@functools.cache
def data_files() -> dict[str, str]:
    d = workdir()
    files = {
        "train": write_rows(os.path.join(d, "train.jsonl"), task_rows(200, seed=2)),
        "eval": write_rows(os.path.join(d, "eval.jsonl"), task_rows(96, seed=3)),
        "ood": os.path.join(d, "ood.txt"),
    }
    with open(files["ood"], "w", encoding="utf-8") as f:
        f.write("\n".join(ood_texts(400, seed=4)) + "\n")
    return files


@functools.cache
def causal_lm_dir() -> str:
    """A tiny random Llama with a word-level tokenizer over the test words and the prompt words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = os.path.join(workdir(), "causal-lm")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    prompt_words = "rewrite following text as in one sentence , . : rewritten negative positive class 0 1".split()
    words = list(dict.fromkeys(POS + NEG + NEUTRAL + OOD_WORDS + prompt_words))
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        tie_word_embeddings=True,
    )  # fmt: skip
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    torch.random.set_rng_state(state)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


T3_OPTIONS = {"pool_size": 128, "gen_batch": 64, "max_new_tokens": 12, "tune_steps": 1, "tune_batch": 4}


def config(method: str, out_dir: str, **kw):
    """A DistillConfig for the tiny teacher: one thread, no progress bar, small batches."""
    from fastkd.loop import DistillConfig

    files = data_files()
    base = {
        "teacher": teacher_dir(), "method": method, "ood": files["ood"], "eval": files["eval"],
        "out_dir": str(out_dir), "max_steps": 8, "batch_size": 8, "max_length": 24, "student_layers": 1,
        "lr": 5e-3, "temperature": 1.0, "eval_every": 0, "save_every": 0, "log_every": 1, "progress": False,
        "threads": 1,
    }  # fmt: skip
    if method == "supervised":
        base["train"] = files["train"]
    if method == "t3":
        base["method_options"] = {"generator": causal_lm_dir(), **T3_OPTIONS}
    if method == "zskd":  # loop tests: the tiny generator's quality is tested in test_method_generators
        kw["method_options"] = {"min_gen_lift": 0, **kw.get("method_options", {})}
    base.update(kw)
    return DistillConfig(**base)

