"""Benchmark of one whole data-free distillation step: fastkd's fused ops vs the same loop on the
reference ops (``backend="torch"``).

Run: ``python -m pytest benchmarks/bench_step.py --benchmark-only -q``

The step (Zero-shot KD / AS-DFD style, in embedding space), on random BERT models built from
configs (no downloads); the student has the teacher's width and half its depth:

1. generator: teacher and student forward on the pseudo input embeddings, the divergence
   ``fastkd.distill_loss(student, teacher)`` (gradient through both models), its gradient w.r.t.
   the embeddings, and one adversarial ascent step ``fastkd.embedding_ascent_`` (per-token L2
   step, projected into a ball around the starting embeddings, [CLS]/[SEP]/padding untouched);
2. student: teacher forward (no grad) and student forward on the new embeddings, the logit KD loss
   plus, in the ``kd+hidden`` variant, ``fastkd.hidden_match`` of mapped hidden states (padding
   masked), backward, and an AdamW step.

Heads: ``cls`` (sequence classification, 2 labels: the logit loss is tiny, the step is dominated by
the models) and ``mlm`` (masked-LM head over the 30522-token vocabulary: token-level KD, where the
loss is a large part of the step). Providers: ``eager`` runs every fastkd op with
``backend="torch"`` (the pure-PyTorch references); ``fastkd-<backend>`` with that backend. CPU:
float32, 2 threads; GPU: float32 weights under ``torch.autocast(bfloat16)``. Mode: ``full``
(the whole step). Until ``fastkd.embedding_ascent_`` (issue 5) and ``fastkd.hidden_match``
(issue 4) are in fastkd, the cases that need them skip with that reason.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

import fastkd
from benchmarks.common import (
    ANY,
    CPU,
    DEFAULT_FULL,
    DEVICE,
    FULL,
    GPU,
    IS_CUDA,
    QUICK,
    backend_of,
    case_param,
    provider_params,
    require_fit,
    run_case,
)
from fastkd.ops import distill_loss as _distill_loss
from fastkd.ops import embedding_ascent as _embedding_ascent
from fastkd.ops import hidden_match as _hidden_match
from fastkd.ops.distill_loss import OP as DISTILL_OP

TEMPERATURE = 2.0
ASCENT_STEP = 0.05  # per-token step (the embeddings' norms are ~1 in these random models)
ASCENT_RADIUS = 0.5  # L2 ball around the starting embeddings
VOCAB = 30522


@dataclass(frozen=True)
class StepCase:
    name: str
    head: str  # "cls" | "mlm"
    hidden: int
    heads: int
    teacher_layers: int
    student_layers: int
    batch: int
    seq: int

    @property
    def shape(self) -> str:
        return f"{self.name} B{self.batch} T{self.seq}"


_CASES = [
    (StepCase("tiny-cls", "cls", 128, 2, 4, 2, 8, 32), ANY, QUICK),
    (StepCase("tiny-cls", "cls", 128, 2, 4, 2, 32, 64), ANY, DEFAULT_FULL),
    (StepCase("tiny-mlm", "mlm", 128, 2, 4, 2, 16, 64), ANY, DEFAULT_FULL),
    (StepCase("small-cls", "cls", 384, 12, 6, 3, 16, 64), CPU, DEFAULT_FULL),
    (StepCase("small-cls", "cls", 384, 12, 6, 3, 32, 128), GPU, DEFAULT_FULL),
    (StepCase("small-mlm", "mlm", 384, 12, 6, 3, 16, 64), CPU, FULL),
    (StepCase("small-mlm", "mlm", 384, 12, 6, 3, 32, 128), GPU, DEFAULT_FULL),
    (StepCase("base-mlm", "mlm", 768, 12, 12, 6, 32, 128), GPU, DEFAULT_FULL),
]
CASES = [
    case_param(c, id=f"{c.name}-B{c.batch}-T{c.seq}-{d[0] if len(d) == 1 else 'any'}", devices=d, sizes=s)
    for c, d, s in _CASES
]

# The ops each variant's step runs (their backends must all be usable for a provider to run).
VARIANTS = {
    "kd": (_distill_loss.OP, _embedding_ascent.OP),
    "kd+hidden": (_distill_loss.OP, _embedding_ascent.OP, _hidden_match.OP),
}


def _models(case: StepCase):
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    def cfg(layers: int) -> BertConfig:
        return BertConfig(
            vocab_size=VOCAB, hidden_size=case.hidden, num_hidden_layers=layers, num_attention_heads=case.heads,
            intermediate_size=4 * case.hidden, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=2,
        )  # fmt: skip

    cls = BertForSequenceClassification if case.head == "cls" else BertForMaskedLM
    torch.manual_seed(0)
    teacher = cls(cfg(case.teacher_layers)).to(DEVICE).eval()
    teacher.requires_grad_(False)
    student = cls(cfg(case.student_layers)).to(DEVICE).train()
    return teacher, student


def _batch(case: StepCase, teacher):
    """Pseudo embeddings (real token embeddings of random ids), attention mask with padding, and
    the ascent mask ([CLS], [SEP] and padding stay put)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T = case.batch, case.seq
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    pos = torch.arange(T)
    attn = (pos[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, VOCAB, (B, T), generator=g)
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(B), lengths - 1] = 102  # [SEP]
    ids = ids * attn
    ascent_mask = attn.bool() & (pos[None, :] > 0) & (pos[None, :] < (lengths - 1)[:, None])
    with torch.no_grad():
        embeds = teacher.get_input_embeddings()(ids.to(DEVICE)).float()
    return embeds.contiguous(), attn.to(DEVICE), ascent_mask.to(DEVICE)


def make_step(case: StepCase, variant: str, backend: str):
    teacher, student = _models(case)
    embeds0, attn, ascent_mask = _batch(case, teacher)
    keep = attn.bool()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    use_hidden = variant == "kd+hidden"
    # Student layer i (1-based) is matched to teacher layer i * Lt / Ls; hidden_states[0] is the embeddings.
    ratio = case.teacher_layers // case.student_layers
    s_layers = list(range(1, case.student_layers + 1))
    t_layers = [i * ratio for i in s_layers]

    def autocast():
        if IS_CUDA:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def kd(s_logits, t_logits):
        mask = keep if case.head == "mlm" else None
        return fastkd.distill_loss(s_logits, t_logits, temperature=TEMPERATURE, mask=mask, backend=backend)

    def step() -> None:
        # 1. generator: one adversarial ascent step on the pseudo embeddings.
        x = embeds0.clone().requires_grad_(True)
        with autocast():
            t_logits = teacher(inputs_embeds=x, attention_mask=attn).logits
            s_logits = student(inputs_embeds=x, attention_mask=attn).logits
            div = kd(s_logits, t_logits)
        (grad,) = torch.autograd.grad(div, x)
        x_adv = x.detach()
        fastkd.embedding_ascent_(
            x_adv, grad, step_size=ASCENT_STEP, norm="l2", radius=ASCENT_RADIUS, origin=embeds0,
            mask=ascent_mask, backend=backend,
        )  # fmt: skip
        # 2. student update on the adversarial embeddings.
        with autocast():
            with torch.no_grad():
                t_out = teacher(inputs_embeds=x_adv, attention_mask=attn, output_hidden_states=use_hidden)
            s_out = student(inputs_embeds=x_adv, attention_mask=attn, output_hidden_states=use_hidden)
            loss = kd(s_out.logits, t_out.logits)
            if use_hidden:
                loss = loss + fastkd.hidden_match(
                    [s_out.hidden_states[i] for i in s_layers], [t_out.hidden_states[j] for j in t_layers],
                    mask=keep, backend=backend,
                )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    n_params = sum(p.numel() for p in teacher.parameters()) + sum(p.numel() for p in student.parameters())
    return step, n_params


def _need_bytes(case: StepCase) -> int:
    """A generous estimate of the step's memory (weights, optimizer state, activations, logits)."""
    tokens = case.batch * case.seq
    layers = case.teacher_layers + case.student_layers
    params = (VOCAB + 512) * case.hidden * 2 + layers * 12 * case.hidden**2
    if case.head == "mlm":
        params += 2 * VOCAB * case.hidden
    acts = layers * tokens * case.hidden * 4 * 24 + layers * case.batch * case.heads * case.seq**2 * 4 * 4
    logits = 8 * tokens * VOCAB * 4 if case.head == "mlm" else 0
    return params * 4 * 4 + acts + logits


@pytest.mark.parametrize("provider", provider_params([DISTILL_OP], compile=False))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES)
def test_dfkd_step(benchmark, case, variant, provider):
    backend = "torch" if provider == "eager" else backend_of(provider)
    for op in VARIANTS[variant]:
        ok, reason = op.usable(backend, DEVICE)
        if not ok:
            pytest.skip(f"fastkd.{op.name} backend {backend!r}: {reason}")
    require_fit(_need_bytes(case), f"the {case.shape} step")
    step, n_params = make_step(case, variant, backend)
    try:
        run_case(
            benchmark,
            op="dfkd_step",
            variant=variant,
            provider=provider,
            mode="full",
            shape=case.shape,
            dtype="bfloat16-autocast" if IS_CUDA else "float32",
            fwd=step,
            extra={"family": case.head, "params": n_params, "backend": backend},
        )
    except fastkd.BackendUnavailableError as e:  # an op of the step has no such backend here
        pytest.skip(str(e))
