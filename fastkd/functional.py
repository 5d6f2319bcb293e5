"""F-style functions: every fused op of fastkd in one namespace (``import fastkd.functional as KF``)."""

from fastkd.ops.distill_loss import distill_loss, reference_distill_loss
from fastkd.ops.hidden_match import hidden_match, reference_hidden_match

__all__ = ["distill_loss", "hidden_match", "reference_distill_loss", "reference_hidden_match"]
