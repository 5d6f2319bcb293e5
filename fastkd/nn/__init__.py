"""``torch.nn`` modules over fastkd's fused ops (one file per op)."""

from fastkd.nn.distill_loss import DistillationLoss
from fastkd.nn.fused_linear_distill import FusedLinearDistillationLoss
from fastkd.nn.hidden_match import HiddenStateMatcher

__all__ = ["DistillationLoss", "FusedLinearDistillationLoss", "HiddenStateMatcher"]
