"""fastkd.integrations.transformers.DistillationTrainer on tiny random models (CPU, seconds).

The loss falls and the student's agreement with the teacher rises (classification and causal LM);
the causal LM goes through the fused-linear op (the logits are never built); gradient accumulation
matches one large batch; an offline run (``fastkd logits`` with K = V) equals a live-teacher run;
DDP under torchrun with gloo; save_pretrained.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny import bert_config, bert_tokenizer, causal_lm_dir, task_rows, teacher_dir

pytest.importorskip("accelerate")
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

import fastkd
from fastkd.integrations.transformers import DistillationTrainer, TeacherLogitsCollator
from fastkd.logits import TeacherLogits, write_teacher_logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _args(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8, "learning_rate": 5e-3,
        "max_steps": 30, "logging_steps": 1, "report_to": [], "use_cpu": True, "save_strategy": "no",
        "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0,
    }  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def _cls_data(n=240, seed=21):
    tok = bert_tokenizer()
    rows = task_rows(n, seed=seed)
    ds = [dict(tok(r["text"], truncation=True, max_length=32), labels=r["label"]) for r in rows]
    return tok, ds


def _student_cls(seed=0):
    tok = bert_tokenizer()
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(len(tok), layers=1, hidden=16))


def _agreement_cls(student, teacher, tok, rows):
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        return (student(**enc).logits.argmax(-1) == teacher(**enc).logits.argmax(-1)).float().mean().item()


def _kd_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_classification_loss_falls_agreement_rises(tmp_path):
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir())
    tok, ds = _cls_data()
    student = _student_cls()
    held = task_rows(64, seed=22)
    before = _agreement_cls(student, teacher, tok, held)
    args = _args(
        tmp_path, learning_rate=2e-2, max_steps=60, per_device_train_batch_size=16, lr_scheduler_type="constant"
    )
    tr = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0, args=args, train_dataset=ds,
                             data_collator=DataCollatorWithPadding(tok))  # fmt: skip
    tr.train()
    losses = _kd_losses(tr)
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5, losses
    after = _agreement_cls(student.eval(), teacher, tok, held)
    assert after > max(before, 0.8), (before, after)


def _lm_models(seed_t=0, seed_s=1):
    tok = AutoTokenizer.from_pretrained(causal_lm_dir())
    V = len(tok)
    torch.manual_seed(seed_t)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False,
        pad_token_id=0,
    )).eval()  # fmt: skip
    torch.manual_seed(seed_s)
    student = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
    ))  # fmt: skip
    return tok, teacher, student


def _lm_data(tok, n=96, seed=23):
    texts = [r["text"] for r in task_rows(n, seed=seed)]
    return texts, [dict(tok(t, truncation=True, max_length=24)) for t in texts]


def _lm_collator(tok):
    def collate(rows):
        return tok.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows], return_tensors="pt")

    return collate


def _agreement_lm(student, teacher, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    m = enc["attention_mask"].bool()
    with torch.no_grad():
        a = student(**enc).logits.argmax(-1)
        b = teacher(**enc).logits.argmax(-1)
    return (a == b)[m].float().mean().item()


def test_causal_lm_fused_loss_falls_agreement_rises(tmp_path, monkeypatch):
    tok, teacher, student = _lm_models()
    _texts, ds = _lm_data(tok)
    held = [r["text"] for r in task_rows(32, seed=24)]
    before = _agreement_lm(student, teacher, tok, held)
    calls = []
    real = fastkd.fused_linear_distill_loss

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(fastkd, "fused_linear_distill_loss", spy)
    tr = DistillationTrainer(model=student, teacher_model=teacher, temperature=1.0,
                             args=_args(tmp_path, max_steps=40, learning_rate=1e-2), train_dataset=ds,
                             data_collator=_lm_collator(tok))  # fmt: skip
    tr.train()
    # the fused op received hidden states (the logits were never built)
    assert calls and all(s[-1] == student.config.hidden_size for s in calls)
    losses = _kd_losses(tr)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    after = _agreement_lm(student.eval(), teacher, tok, held)
    assert after > before + 0.1, (before, after)
    # save_pretrained through the Trainer: the student only, reloadable, same weights
    tr.save_model(str(tmp_path / "saved"))
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "saved"))
    for (k, v), (k2, v2) in zip(student.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir())
    tok, ds = _cls_data(16)
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        student = _student_cls(seed=3)
        tr = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0, ce_weight=0.5,
                                 args=_args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                            max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                                            max_grad_norm=0.0),
                                 train_dataset=ds, data_collator=DataCollatorWithPadding(tok))  # fmt: skip
        tr.train()
        results.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    start = _student_cls(seed=3).state_dict()
    moved = max((results[0][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
def test_offline_equals_live_when_k_is_v(tmp_path, kind):
    if kind == "causal_lm":
        tok, teacher, _ = _lm_models()
        texts, ds_live = _lm_data(tok, n=32)
        rows = texts
        collate_live = _lm_collator(tok)

        def new_student():
            return _lm_models()[2]
    else:
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir())
        tok = bert_tokenizer()
        trows = task_rows(32, seed=25)
        rows = trows
        ds_live = [dict(tok(r["text"], truncation=True, max_length=128), labels=r["label"]) for r in trows]
        collate_live = DataCollatorWithPadding(tok)

        def new_student():
            return _student_cls(seed=4)

    T = 2.0
    write_teacher_logits(teacher, tok, rows, str(tmp_path / "logits"), top_k=10**6, temperature=T, batch_size=5)
    tl = TeacherLogits(str(tmp_path / "logits"))
    assert tl.top_k == tl.vocab_size
    kw = {"max_steps": 4, "per_device_train_batch_size": 8, "optim": "sgd", "learning_rate": 0.5,
          "lr_scheduler_type": "constant"}  # fmt: skip
    live = new_student()
    DistillationTrainer(model=live, teacher_model=teacher, temperature=T, args=_args(tmp_path, **kw),
                        train_dataset=ds_live, data_collator=collate_live).train()  # fmt: skip
    off = new_student()
    DistillationTrainer(model=off, teacher_logits_dir=str(tmp_path / "logits"), temperature=T, processing_class=tok,
                        args=_args(tmp_path, **kw), train_dataset=tl.dataset(),
                        data_collator=TeacherLogitsCollator(tok.pad_token_id)).train()  # fmt: skip
    start = new_student().state_dict()
    assert max((live.state_dict()[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for k, v in live.state_dict().items():
        torch.testing.assert_close(off.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_offline_refuses_another_tokenizer(tmp_path):
    tok, teacher, _ = _lm_models()
    write_teacher_logits(teacher, tok, ["good movie"], str(tmp_path / "logits"), top_k=4, temperature=2.0)
    student = _student_cls()
    from fastkd.logits import TeacherLogitsError

    with pytest.raises(TeacherLogitsError, match="differs"):
        DistillationTrainer(model=student, teacher_logits_dir=str(tmp_path / "logits"), temperature=2.0,
                            processing_class=bert_tokenizer(), args=_args(tmp_path))  # fmt: skip
    with pytest.raises(TeacherLogitsError, match="temperature"):
        DistillationTrainer(model=student, teacher_logits_dir=str(tmp_path / "logits"), temperature=1.0,
                            args=_args(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="exactly one of teacher_model and teacher_logits_dir"):
        DistillationTrainer(model=student, args=_args(tmp_path))


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_trainer import _args, _lm_models, _lm_data, _lm_collator
    from fastkd.integrations.transformers import DistillationTrainer
    import pathlib
    tok, teacher, student = _lm_models()
    texts, ds = _lm_data(tok, n=32)
    tr = DistillationTrainer(model=student, teacher_model=teacher, temperature=1.0, train_dataset=ds,
                             data_collator=_lm_collator(tok),
                             args=_args(pathlib.Path({tmp!r}), max_steps=3, per_device_train_batch_size=4,
                                        ddp_backend="gloo", gradient_accumulation_steps=2))
    tr.train()
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    out = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    assert dist.get_world_size() == 2
    assert torch.equal(out[0], out[1]), "replicas diverged"
    start = _lm_models()[2]
    moved = (flat - torch.cat([p.detach().flatten() for p in start.parameters()])).abs().max().item()
    assert moved > 1e-4, moved
    if dist.get_rank() == 0:
        print("DDP-OK", len(tr.state.log_history))
    """
)


def test_ddp_torchrun_gloo(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), tmp=str(tmp_path)))
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    )
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "DDP-OK" in r.stdout
