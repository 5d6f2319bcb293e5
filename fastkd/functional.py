"""F-style functions: every fused op of fastkd in one namespace (``import fastkd.functional as KF``)."""

from fastkd.ops.distill_loss import distill_loss, reference_distill_loss
from fastkd.ops.embedding_ascent import embedding_ascent_, embedding_ascent_multi_, reference_embedding_ascent_
from fastkd.ops.hidden_match import hidden_match, reference_hidden_match
from fastkd.ops.nearest_tokens import nearest_tokens, reference_nearest_tokens
from fastkd.ops.scale_grad import reference_scale_grad_, scale_grad_

__all__ = [
    "distill_loss",
    "embedding_ascent_",
    "embedding_ascent_multi_",
    "hidden_match",
    "nearest_tokens",
    "reference_distill_loss",
    "reference_embedding_ascent_",
    "reference_hidden_match",
    "reference_nearest_tokens",
    "reference_scale_grad_",
    "scale_grad_",
]
