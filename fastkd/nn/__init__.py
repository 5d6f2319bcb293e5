"""``torch.nn`` modules over fastkd's fused ops (one file per op)."""

from fastkd.nn.distillation import DistillationLoss

__all__ = ["DistillationLoss"]
