"""``torch.nn`` modules over fastkd's fused ops."""

from __future__ import annotations

import torch
from torch import Tensor

from fastkd.ops.distill_loss import _check_options, distill_loss


class DistillationLoss(torch.nn.Module):
    """Module form of :func:`fastkd.distill_loss`; the constructor takes the same options.

    >>> loss_fn = DistillationLoss(temperature=2.0)
    >>> loss = loss_fn(student_logits, teacher_logits)            # doctest: +SKIP
    >>> loss = loss_fn(student_logits, teacher_logits, labels=y)  # rows with y == -100 ignored  # doctest: +SKIP
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
        backend: str | None = None,
    ) -> None:
        super().__init__()
        _check_options(temperature, divergence, beta, reduction, ignore_index)  # a typo fails here
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.scale_by_t2 = scale_by_t2
        self.backend = backend

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        return distill_loss(
            student_logits, teacher_logits, temperature=self.temperature, divergence=self.divergence, beta=self.beta,
            reduction=self.reduction, ignore_index=self.ignore_index, labels=labels, mask=mask,
            scale_by_t2=self.scale_by_t2, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
            f"reduction={self.reduction!r}, scale_by_t2={self.scale_by_t2}, backend={self.backend!r}"
        )
