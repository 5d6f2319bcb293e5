"""Classification metrics for evaluating teachers and students: accuracy, macro-F1, MCC.

Plain PyTorch on integer predictions and labels (no scikit-learn needed); the definitions match
scikit-learn's ``accuracy_score``, ``f1_score(average="macro")`` and ``matthews_corrcoef``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _as_long(x: Tensor | Sequence[int], name: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(list(x))
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got {t.dtype}")
    return t.reshape(-1).long().cpu()


def confusion_matrix(preds: Tensor | Sequence[int], labels: Tensor | Sequence[int], num_classes: int) -> Tensor:
    """``C[i, j]`` = number of rows with true class i predicted as j (int64, ``[K, K]``)."""
    p, y = _as_long(preds, "preds"), _as_long(labels, "labels")
    if p.numel() != y.numel():
        raise ValueError(f"preds and labels must have the same length, got {p.numel()} and {y.numel()}")
    return torch.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(preds: Tensor | Sequence[int], labels: Tensor | Sequence[int]) -> dict[str, float]:
    """``{"accuracy", "macro_f1", "mcc"}`` for integer class predictions against true labels.

    * macro-F1: the unweighted mean of per-class F1 over the classes that occur in the labels or
      the predictions (scikit-learn's convention); a class with no true and no predicted rows is
      not counted, and F1 is 0 where precision + recall is 0.
    * MCC: the multi-class Matthews correlation (Gorodkin's R_K), 0 when it is undefined (a
      constant prediction or a single true class).
    """
    p, y = _as_long(preds, "preds"), _as_long(labels, "labels")
    if p.numel() == 0:
        raise ValueError("classification_metrics needs at least one row")
    if (p < 0).any() or (y < 0).any():
        raise ValueError("class ids must be non-negative")
    k = int(max(p.max().item(), y.max().item())) + 1
    c = confusion_matrix(p, y, k).double()
    tp = c.diag()
    true_n = c.sum(1)  # rows of class i
    pred_n = c.sum(0)  # rows predicted as i
    present = (true_n + pred_n) > 0
    denom = true_n + pred_n
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    macro_f1 = float(f1[present].mean().item())
    s = c.sum()
    correct = tp.sum()
    num = correct * s - (pred_n * true_n).sum()
    den = torch.sqrt((s * s - (pred_n * pred_n).sum()) * (s * s - (true_n * true_n).sum()))
    mcc = float((num / den).item()) if den > 0 else 0.0
    return {"accuracy": float((correct / s).item()), "macro_f1": macro_f1, "mcc": mcc}
