"""fastkd: data-free knowledge distillation for NLP models, with fused distillation kernels.

Public API::

    import fastkd
    loss = fastkd.distill_loss(student_logits, teacher_logits, temperature=2.0)
    loss = fastkd.hidden_match(student_states, teacher_states, weight, bias, loss="mse", mask=attention_mask)
    fastkd.embedding_ascent_(embeds, embeds.grad, step_size=0.1, radius=1.0, origin=start)  # in place
    ids, scores = fastkd.nearest_tokens(embeds, model.get_input_embeddings().weight, k=1)
    loss = fastkd.fused_linear_distill_loss(h_student, lm_head_s.weight, h_teacher, lm_head_t.weight)
    loss = fastkd.topk_distill_loss(student_logits, teacher_ids, teacher_topk_logits, teacher_logsumexp=lse)

Backends (``backend=`` argument, ``FASTKD_BACKEND`` environment variable, or automatic):
``cuda``, ``triton``, ``cpu`` (compiled), ``torch`` (reference). ``python -m fastkd.info`` shows
what is available here and why not.
"""

from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _alias_source_kernels() -> None:
    # An installed fastkd ships the Triton kernels as the subpackage fastkd/kernels. In a source
    # checkout they live in the top-level kernels/ folder (the design card's layout): register that
    # folder as fastkd.kernels so both layouts import the same way. Nothing is imported here. The
    # folder has no __init__.py (kernels/README.md says why), so the alias is a bare package module.
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")) or "fastkd.kernels" in _sys.modules:
        return
    src = _os.path.join(_os.path.dirname(here), "kernels")
    if not _os.path.isfile(_os.path.join(src, "distill_loss.py")):
        return
    spec = _ilu.spec_from_loader("fastkd.kernels", loader=None, is_package=True)
    if spec is None:
        return
    spec.submodule_search_locations = [src]
    module = _ilu.module_from_spec(spec)
    module.__doc__ = "fastkd's Triton kernels (the checkout's kernels/ folder; see its README.md)."
    _sys.modules["fastkd.kernels"] = module
    globals()["kernels"] = module


_alias_source_kernels()

from fastkd import nn  # noqa: E402
from fastkd.backends import BACKENDS, available_backends  # noqa: E402
from fastkd.errors import BackendUnavailableError, FastKDError  # noqa: E402
from fastkd.ops.distill_loss import distill_loss, reference_distill_loss  # noqa: E402
from fastkd.ops.embedding_ascent import (  # noqa: E402
    embedding_ascent_,
    embedding_ascent_multi_,
    reference_embedding_ascent_,
)
from fastkd.ops.fused_linear_distill import (  # noqa: E402
    fused_linear_distill_loss,
    reference_fused_linear_distill_loss,
)
from fastkd.ops.hidden_match import hidden_match, reference_hidden_match  # noqa: E402
from fastkd.ops.nearest_tokens import nearest_tokens, reference_nearest_tokens  # noqa: E402
from fastkd.ops.topk_distill import reference_topk_distill_loss, topk_distill_loss  # noqa: E402

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DistillConfig",
    "FastKDError",
    "__version__",
    "available_backends",
    "distill",
    "distill_loss",
    "embedding_ascent_",
    "embedding_ascent_multi_",
    "evaluate",
    "fused_linear_distill_loss",
    "hidden_match",
    "nearest_tokens",
    "nn",
    "reference_distill_loss",
    "reference_embedding_ascent_",
    "reference_fused_linear_distill_loss",
    "reference_hidden_match",
    "reference_nearest_tokens",
    "reference_topk_distill_loss",
    "topk_distill_loss",
]

# The distillation loop imports transformers: load it on first use, not with `import fastkd`.
_LAZY = {
    "distill": "fastkd.loop",
    "DistillConfig": "fastkd.loop",
    "DistillResult": "fastkd.loop",
    "evaluate": "fastkd.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
