"""Distillation methods: the three data-free methods and the baselines, behind one interface.

========== ==================================================================================
name       what the student learns from
========== ==================================================================================
zskd       Zero-shot KD (Rashid et al., EMNLP 2021): OOD text + adversarial examples
asdfd      AS-DFD (Ma et al., EMNLP 2020): pseudo embeddings guessed from the teacher
t3         DFKD-T3 (Bai et al., 2023): OOD text rewritten into task-like text by a tuned LM
random     random token sequences (baseline floor)
ood        plain KD on OOD text (baseline)
supervised KD on the real training data (upper bound; not data-free)
offline    KD from teacher logits stored by ``fastkd logits`` (the teacher never runs)
========== ==================================================================================

Each method is a :class:`fastkd.methods.base.Method` subclass registered here by name; the loop
(:func:`fastkd.loop.distill`) looks it up with :func:`get_method`.
"""

from __future__ import annotations

from fastkd.methods.asdfd import ASDFD
from fastkd.methods.base import Method, MethodContext, OptionError, StepInfo, View
from fastkd.methods.baselines import OutOfDomain, RandomTokens, Supervised
from fastkd.methods.offline import Offline
from fastkd.methods.t3 import T3
from fastkd.methods.zskd import ZeroShotKD

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a Method subclass under ``cls.name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError("register_method expects a Method subclass with a name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The Method class registered as ``name``; an OptionError listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


for _cls in (ZeroShotKD, ASDFD, T3, RandomTokens, OutOfDomain, Supervised, Offline):
    register_method(_cls)

def reads_ood(name: str) -> bool:
    """Whether method ``name`` reads out-of-domain text: it must be given one (``needs_ood``) or uses
    one when given (``accepts_ood``, asdfd's text starts)."""
    cls = get_method(name)
    return cls.needs_ood or cls.accepts_ood


__all__ = [
    "ASDFD",
    "METHODS",
    "T3",
    "Method",
    "MethodContext",
    "Offline",
    "OptionError",
    "OutOfDomain",
    "RandomTokens",
    "StepInfo",
    "Supervised",
    "View",
    "ZeroShotKD",
    "get_method",
    "reads_ood",
    "register_method",
]
