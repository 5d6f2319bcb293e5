"""F-style functions: every fused op of fastkd in one namespace (``import fastkd.functional as KF``)."""

from fastkd.ops.distill_loss import distill_loss, reference_distill_loss

__all__ = ["distill_loss", "reference_distill_loss"]
