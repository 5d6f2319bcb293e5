"""``torch.nn`` module over :func:`fastkd.fused_linear_distill_loss`."""

from __future__ import annotations

import torch
from torch import Tensor

from fastkd.ops.fused_linear_distill import _check_options, fused_linear_distill_loss


class FusedLinearDistillationLoss(torch.nn.Module):
    """Module form of :func:`fastkd.fused_linear_distill_loss`; the constructor takes the options.

    >>> loss_fn = FusedLinearDistillationLoss(temperature=2.0)
    >>> loss = loss_fn(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels=y)  # doctest: +SKIP
    >>> loss = loss_fn(h_s, student.lm_head.weight, teacher_topk=(ids, logits, lse))       # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        divergence: str = "kl",
        beta: float = 0.5,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        scale_by_t2: bool = True,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        _check_options(temperature, divergence, beta, reduction, chunk_size)  # a typo fails here
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.scale_by_t2 = scale_by_t2
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        *,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        teacher_topk: tuple | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, teacher_logits=teacher_logits, teacher_topk=teacher_topk,
            temperature=self.temperature, divergence=self.divergence, beta=self.beta, labels=labels,
            ignore_index=self.ignore_index, mask=mask, reduction=self.reduction, scale_by_t2=self.scale_by_t2,
            chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
            f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, backend={self.backend!r}"
        )
