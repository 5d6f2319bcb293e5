"""``DistillationTrainer``: a ``transformers.Trainer`` that distils a teacher into the model it trains.

    from fastkd.integrations.transformers import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0, args=args,
                                  train_dataset=ds, data_collator=collator)
    trainer.train(); trainer.save_model("student")

* Sequence classification: logit KD with :func:`fastkd.distill_loss` (or
  :func:`fastkd.topk_distill_loss` from offline logits).
* Causal LM: token-level KD on shifted positions (position p of a row distils the distribution of
  token p + 1; positions whose next token is padding are ignored). When the student's output layer
  is a plain ``torch.nn.Linear`` the logits are never built: the model runs with its head bypassed
  (it returns the final hidden states) and :func:`fastkd.fused_linear_distill_loss` applies the
  head weight chunk by chunk. The forward still goes through the (possibly DDP-wrapped) model, so
  gradient synchronisation works unchanged.
* Offline teacher: ``teacher_logits_dir`` (written by ``fastkd logits``) instead of a teacher model;
  the dataset is then :meth:`fastkd.logits.TeacherLogits.dataset` (tokens + top-K logits per row),
  collated by :class:`TeacherLogitsCollator`. The student's tokenizer is checked against the
  teacher's fingerprint (``tokenizer=`` / ``processing_class=``).
* Loss: ``kd_weight * KD + ce_weight * CE(labels) + hidden_weight * hidden_match`` (the hidden term
  compares the last hidden states with :func:`fastkd.hidden_match`; it needs a live teacher of the
  same hidden size). ``ce_weight > 0`` for a causal LM builds the student's logits.

Gradient accumulation: the loss of each micro-batch is its own mean and the Trainer divides it by
the accumulation steps. Works under ``torchrun`` (DDP; gloo on CPU), with bf16 autocast and
``save_model`` / ``save_pretrained`` (the teacher is never saved).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

import fastkd
from fastkd.logits import TeacherLogits, model_kind

TEACHER_KEYS = ("teacher_ids", "teacher_logits", "teacher_lse")


@contextlib.contextmanager
def hidden_states_out(model: torch.nn.Module) -> Iterator[torch.nn.Linear | None]:
    """While active, the model's output layer returns its input: ``model(...).logits`` are the final
    hidden states. Yields the head (a plain Linear), or None when the head cannot be bypassed (then
    nothing changes)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    plain = type(head) is torch.nn.Linear and not any(
        getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    if not plain:
        yield None
        return
    head.forward = lambda x: x  # instance attribute: nn.Module.__call__ uses it
    try:
        yield head
    finally:
        del head.forward


class TeacherLogitsCollator:
    """Pads rows of :meth:`TeacherLogits.dataset` into a batch (right padding; the pad token id and
    the teacher's padded positions are masked by ``attention_mask``)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        L = max(int(r["input_ids"].shape[0]) for r in rows)
        P = max(int(r["teacher_ids"].shape[0]) for r in rows)
        K = int(rows[0]["teacher_ids"].shape[1])
        B = len(rows)
        out = {
            "input_ids": torch.full((B, L), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(B, L, dtype=torch.long),
            "teacher_ids": torch.zeros(B, P, K, dtype=torch.int32),
            "teacher_logits": torch.zeros(B, P, K, dtype=torch.float32),
            "teacher_lse": torch.zeros(B, P, dtype=torch.float32),
        }
        # distinct ids in padded positions (they are never read, but stay valid for the kernels)
        out["teacher_ids"][:] = torch.arange(K, dtype=torch.int32)
        for i, r in enumerate(rows):
            n, p = int(r["input_ids"].shape[0]), int(r["teacher_ids"].shape[0])
            out["input_ids"][i, :n] = r["input_ids"]
            out["attention_mask"][i, :n] = 1
            out["teacher_ids"][i, :p] = r["teacher_ids"]
            out["teacher_logits"][i, :p] = r["teacher_logits"]
            out["teacher_lse"][i, :p] = r["teacher_lse"]
        if "labels" in rows[0]:
            out["labels"] = torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long)
        return out


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` whose loss distils ``teacher_model`` (or offline teacher logits) into ``model``.

    Args:
        model: the student (``*ForSequenceClassification`` or ``*ForCausalLM``).
        teacher_model: the teacher (same task and, for a causal LM, the same vocabulary); frozen,
            moved to the student's device, never saved. Or None with ``teacher_logits_dir``.
        teacher_logits_dir: a folder written by ``fastkd logits`` (its temperature must equal
            ``temperature``; K < V uses the stored logsumexp and the tail-mass term).
        temperature, divergence, beta: as in :func:`fastkd.distill_loss` (offline: ``"kl"`` only).
        kd_weight, ce_weight, hidden_weight: the weights of the three loss terms.
        **trainer_kwargs: everything ``transformers.Trainer`` takes (``args``, datasets, collator...).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        teacher_model: torch.nn.Module | None = None,
        teacher_logits_dir: str | None = None,
        temperature: float = 2.0,
        divergence: str = "kl",
        beta: float = 0.5,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        hidden_weight: float = 0.0,
        **trainer_kwargs: Any,
    ) -> None:
        if (teacher_model is None) == (teacher_logits_dir is None):
            raise ValueError("give exactly one of teacher_model and teacher_logits_dir")
        fastkd.nn.DistillationLoss(temperature=temperature, divergence=divergence, beta=beta)  # validates
        for name, w in (("kd_weight", kd_weight), ("ce_weight", ce_weight), ("hidden_weight", hidden_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"{name} must be a number >= 0, got {w!r}")
        self.offline: TeacherLogits | None = None
        if teacher_logits_dir is not None:
            self.offline = TeacherLogits(teacher_logits_dir)
            self.offline.check_temperature(temperature)
            if divergence != "kl":
                raise ValueError(f"offline teacher logits support divergence='kl' only, got {divergence!r}")
            if hidden_weight > 0:
                raise ValueError("hidden_weight > 0 needs a live teacher_model (hidden states are not stored)")
            tok = trainer_kwargs.get("processing_class", trainer_kwargs.get("tokenizer"))
            if tok is not None:
                self.offline.check_tokenizer(tok)
            if trainer_kwargs.get("data_collator") is None:
                trainer_kwargs["data_collator"] = TeacherLogitsCollator(getattr(tok, "pad_token_id", None) or 0)
        args = trainer_kwargs.get("args")
        if args is not None and model is not None and model_kind(model) == "causal_lm":
            # DDP must not look for unused parameters: the bypassed lm_head is absent from the
            # forward graph, its gradient arrives later from the fused op (a search would mark it
            # ready twice).
            if getattr(args, "ddp_find_unused_parameters", None) is None:
                args.ddp_find_unused_parameters = False
        super().__init__(model=model, **trainer_kwargs)
        # Each micro-batch's loss is its own mean: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.teacher = teacher_model
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self.teacher.to(self.args.device)
        self.kind = model_kind(model)
        if self.offline is not None and self.offline.kind != self.kind:
            raise ValueError(f"the teacher logits are for a {self.offline.kind}, the student is a {self.kind}")
        self.temperature, self.divergence, self.beta = float(temperature), divergence, float(beta)
        self.kd_weight, self.ce_weight, self.hidden_weight = float(kd_weight), float(ce_weight), float(hidden_weight)

    # The Trainer drops dataset columns the model's forward does not take; keep the teacher's.
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TEACHER_KEYS, "labels"]))

    # ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        topk = tuple(inputs.pop(k, None) for k in TEACHER_KEYS)
        if self.kind == "causal_lm":
            loss, out = self._causal_lm_loss(model, inputs, labels, topk)
        else:
            loss, out = self._classifier_loss(model, inputs, labels, topk)
        return (loss, out) if return_outputs else loss

    def _teacher_forward(self, inputs, **kw):
        with torch.no_grad():
            return self.teacher(**inputs, **kw)

    def _classifier_loss(self, model, inputs, labels, topk):
        want_hidden = self.hidden_weight > 0
        out = model(**inputs, output_hidden_states=want_hidden)
        s = out.logits
        loss = s.new_zeros((), dtype=torch.float32)
        t_out = None
        if self.offline is not None:
            ids, tv, lse = topk
            kd = fastkd.topk_distill_loss(
                s, ids[:, 0], tv[:, 0], teacher_logsumexp=lse[:, 0], temperature=self.temperature
            )
        else:
            t_out = self._teacher_forward(inputs, output_hidden_states=want_hidden)
            kd = fastkd.distill_loss(
                s, t_out.logits, temperature=self.temperature, divergence=self.divergence, beta=self.beta
            )
        loss = loss + self.kd_weight * kd
        if self.ce_weight > 0 and labels is not None:
            loss = loss + self.ce_weight * F.cross_entropy(s.float(), labels)
        if want_hidden:
            loss = loss + self.hidden_weight * self._hidden_term(out, t_out, inputs)
        return loss, out

    def _hidden_term(self, out, t_out, inputs):
        hs, ht = out.hidden_states[-1], t_out.hidden_states[-1]
        if hs.shape != ht.shape:
            raise ValueError(
                f"hidden_weight > 0 compares the last hidden states, which differ in shape: student "
                f"{tuple(hs.shape)}, teacher {tuple(ht.shape)}"
            )
        mask = inputs.get("attention_mask")
        mask = None if mask is None else mask.bool()
        return fastkd.hidden_match(hs, ht.to(hs.dtype), loss="mse", mask=mask)

    def _causal_lm_loss(self, model, inputs, labels, topk):
        attn = inputs.get("attention_mask")
        if attn is None:
            attn = torch.ones_like(inputs["input_ids"])
        keep = attn[:, 1:].bool()  # position p distils token p + 1: both must be real tokens
        keep = keep & attn[:, :-1].bool()
        unwrapped = self.accelerator.unwrap_model(model)
        want_hidden = self.hidden_weight > 0
        fused = self.ce_weight == 0
        ctx = hidden_states_out(unwrapped) if fused else contextlib.nullcontext(None)
        with ctx as head:
            out = model(**inputs, output_hidden_states=want_hidden)
        s = out.logits[:, :-1]
        loss = s.new_zeros((), dtype=torch.float32)
        kw = {"temperature": self.temperature, "mask": keep}
        t_out = None
        if self.offline is not None:
            ids, tv, lse = (x[:, :-1] for x in topk)
            if head is not None:
                kd = fastkd.fused_linear_distill_loss(s, head.weight, student_bias=head.bias,
                                                      teacher_topk=(ids, tv, lse), **kw)  # fmt: skip
            else:
                kd = fastkd.topk_distill_loss(s, ids, tv, teacher_logsumexp=lse, **kw)
        else:
            t_unwrapped = self.teacher
            with (
                torch.no_grad(),
                hidden_states_out(t_unwrapped) if head is not None else contextlib.nullcontext(None) as t_head,
            ):
                t_out = self.teacher(**inputs, output_hidden_states=want_hidden)
            kw.update(divergence=self.divergence, beta=self.beta)
            if head is not None and t_head is not None:
                kd = fastkd.fused_linear_distill_loss(
                    s, head.weight, t_out.logits[:, :-1], t_head.weight, student_bias=head.bias,
                    teacher_bias=t_head.bias, **kw,
                )  # fmt: skip
            elif head is not None:  # the teacher's head could not be bypassed: its logits exist anyway
                kd = fastkd.fused_linear_distill_loss(
                    s, head.weight, student_bias=head.bias, teacher_logits=t_out.logits[:, :-1], **kw
                )
            else:
                kd = fastkd.distill_loss(s, t_out.logits[:, :-1].to(s.dtype), **kw)
        loss = loss + self.kd_weight * kd
        if self.ce_weight > 0:
            tgt = inputs["input_ids"][:, 1:].masked_fill(~keep, -100)
            loss = loss + self.ce_weight * F.cross_entropy(s.float().reshape(-1, s.shape[-1]), tgt.reshape(-1))
        if want_hidden:
            if t_out is None:
                raise ValueError("hidden_weight > 0 needs a live teacher_model")
            loss = loss + self.hidden_weight * self._hidden_term(out, t_out, inputs)
        return loss, out
