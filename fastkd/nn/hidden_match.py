"""Intermediate-layer distillation: hidden-state (and attention) matching between two transformers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastkd.ops.distill_loss import distill_loss
from fastkd.ops.hidden_match import DEFAULT_EPS, LOSSES, REDUCTIONS, hidden_match

LAYER_MAPS: tuple[str, ...] = ("uniform", "last")
ATTENTION_LOSSES: tuple[str, ...] = ("kl", "mse")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform mapping on ``hidden_states`` indices (0 = embeddings output):
    ``(0, 0)`` and student layer ``i`` to teacher layer ``round(i * teacher_layers / student_layers)``
    (half up), so the last layers always pair."""
    return [(0, 0)] + [
        (i, (2 * i * teacher_layers + student_layers) // (2 * student_layers)) for i in range(1, student_layers + 1)
    ]


class HiddenStateMatcher(torch.nn.Module):
    """Matches mapped student and teacher hidden states (TinyBERT / MiniLM / DistilBERT-style), with
    learned per-layer projections, through the fused :func:`fastkd.hidden_match`.

    Args:
        student_hidden, teacher_hidden: hidden sizes ``Hs`` and ``Ht``.
        student_layers, teacher_layers: numbers of transformer layers; the ``hidden_states`` tuples
            that ``transformers`` returns (``output_hidden_states=True``) hold one more entry, index 0
            being the embeddings output.
        layer_map: ``"uniform"`` (:func:`uniform_layer_map`: embeddings to embeddings and every student
            layer to a teacher layer spaced evenly), ``"last"`` (last layer to last layer, MiniLM), or
            a list of ``(student_index, teacher_index)`` pairs into the ``hidden_states`` tuples.
        loss: ``"mse"``, ``"cosine"`` or ``"nmse"`` (see :func:`fastkd.hidden_match`).
        project: learn a projection ``Ht x Hs`` per mapped pair (``nn.Linear``-like parameters
            ``weight [P, Ht, Hs]`` and ``bias [P, Ht]``, ``nn.Linear``'s initialisation). Without it
            the widths must match.
        bias: give the projections a bias.
        share_projection: one projection ``weight [Ht, Hs]`` (and ``bias [Ht]``) for all pairs.
        layer_weights: one weight per mapped pair (default 1).
        reduction: ``"mean"`` (over mapped pairs and kept tokens) or ``"sum"``.
        attention: None, ``"kl"`` (MiniLM: KL(teacher || student) between the attention distributions
            of every query row and head, mean over kept rows and mapped layers, through
            :func:`fastkd.distill_loss` on log-probabilities) or ``"mse"`` (TinyBERT: mean squared
            difference of the attention matrices passed in, per key, mean over kept query rows, heads
            and mapped layers, through :func:`fastkd.hidden_match`). ``transformers`` returns attention
            probabilities (``output_attentions=True``, eager attention). Pairs that involve the
            embeddings (index 0) have no attention and are skipped. Student and teacher need the same
            number of heads.
        attention_weight: factor of the attention term in the total.
        eps: norm floor of ``"cosine"`` / ``"nmse"``.
        backend: the fastkd backend (None = automatic).

    ``forward(student_hidden_states, teacher_hidden_states, attention_mask=None,
    student_attentions=None, teacher_attentions=None)`` returns the scalar loss
    ``hidden + attention_weight * attention``. :meth:`hidden_loss` and :meth:`attention_loss` give the
    two terms separately.

    >>> matcher = HiddenStateMatcher(312, 768, 4, 12, loss="mse", attention="kl")
    >>> s = student(**batch, output_hidden_states=True, output_attentions=True)  # doctest: +SKIP
    >>> with torch.no_grad():                                                     # doctest: +SKIP
    ...     t = teacher(**batch, output_hidden_states=True, output_attentions=True)
    >>> loss = matcher(s.hidden_states, t.hidden_states, batch["attention_mask"],  # doctest: +SKIP
    ...                s.attentions, t.attentions)
    """

    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        student_layers: int,
        teacher_layers: int,
        layer_map: str | Sequence[tuple[int, int]] = "uniform",
        loss: str = "mse",
        project: bool = True,
        *,
        bias: bool = True,
        share_projection: bool = False,
        layer_weights: Sequence[float] | None = None,
        reduction: str = "mean",
        attention: str | None = None,
        attention_weight: float = 1.0,
        eps: float = DEFAULT_EPS,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (
            ("student_hidden", student_hidden),
            ("teacher_hidden", teacher_hidden),
            ("student_layers", student_layers),
            ("teacher_layers", teacher_layers),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
        if reduction not in REDUCTIONS or reduction == "none":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if attention is not None and attention not in ATTENTION_LOSSES:
            raise ValueError(f"attention must be None or one of {ATTENTION_LOSSES}, got {attention!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        if (
            isinstance(attention_weight, bool)
            or not isinstance(attention_weight, (int, float))
            or not (math.isfinite(attention_weight) and attention_weight >= 0)
        ):
            raise ValueError(f"attention_weight must be a finite number >= 0, got {attention_weight!r}")
        if not project and student_hidden != teacher_hidden:
            raise ValueError(
                f"project=False needs equal widths, got student_hidden={student_hidden} and "
                f"teacher_hidden={teacher_hidden}; use project=True"
            )
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.pairs: list[tuple[int, int]] = self._resolve_map(layer_map)
        if layer_weights is not None:
            try:
                layer_weights = [float(x) for x in layer_weights]
            except (TypeError, ValueError):
                raise TypeError(f"layer_weights must be a sequence of numbers, got {layer_weights!r}") from None
            if not all(math.isfinite(x) for x in layer_weights):
                raise ValueError(f"layer_weights must be finite, got {layer_weights}")
            if len(layer_weights) != len(self.pairs):
                raise ValueError(
                    f"layer_weights must have one weight per mapped pair ({len(self.pairs)}), got {len(layer_weights)}"
                )
        self.layer_weights = layer_weights
        self.loss, self.reduction, self.eps, self.backend = loss, reduction, eps, backend
        self.attention, self.attention_weight = attention, float(attention_weight)
        self.attention_pairs = [(s, t) for s, t in self.pairs if s > 0 and t > 0]
        if attention is not None and not self.attention_pairs:
            raise ValueError("attention matching needs a layer_map pair of transformer layers (index >= 1)")
        P = len(self.pairs)
        kw = {"device": device, "dtype": dtype}
        if project:
            wshape = (teacher_hidden, student_hidden) if share_projection else (P, teacher_hidden, student_hidden)
            self.weight = torch.nn.Parameter(torch.empty(wshape, **kw))
            bshape = (teacher_hidden,) if share_projection else (P, teacher_hidden)
            self.bias = torch.nn.Parameter(torch.empty(bshape, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _resolve_map(self, layer_map) -> list[tuple[int, int]]:
        Ls, Lt = self.student_layers, self.teacher_layers
        if isinstance(layer_map, str):
            if layer_map == "uniform":
                return uniform_layer_map(Ls, Lt)
            if layer_map == "last":
                return [(Ls, Lt)]
            raise ValueError(
                f"layer_map must be one of {LAYER_MAPS} or a list of (student, teacher) pairs, got {layer_map!r}"
            )
        try:
            pairs = [(int(s), int(t)) for s, t in layer_map]
        except (TypeError, ValueError):
            raise ValueError(
                f"layer_map must be one of {LAYER_MAPS} or a list of (student, teacher) index pairs, got {layer_map!r}"
            ) from None
        if not pairs:
            raise ValueError("layer_map must hold at least one (student, teacher) pair")
        for s, t in pairs:
            if not (0 <= s <= Ls and 0 <= t <= Lt):
                raise ValueError(
                    f"layer_map pair {(s, t)} is out of range: student indices are 0..{Ls}, teacher indices 0..{Lt} "
                    f"(0 = embeddings output)"
                )
        return pairs

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, per projection: U(-1/sqrt(Hs), 1/sqrt(Hs))."""
        if self.weight is None:
            return
        bound = 1.0 / math.sqrt(self.student_hidden)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @staticmethod
    def _check_tuple(states, name: str, layers: int) -> None:
        if not isinstance(states, (list, tuple)):
            raise TypeError(f"{name} must be the tuple of hidden states of the model, got {type(states).__name__}")
        if len(states) != layers + 1:
            raise ValueError(
                f"{name} must hold {layers + 1} entries (embeddings output + {layers} layers), got {len(states)}"
            )

    def hidden_loss(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The hidden-state term over the mapped pairs."""
        self._check_tuple(student_hidden_states, "student_hidden_states", self.student_layers)
        self._check_tuple(teacher_hidden_states, "teacher_hidden_states", self.teacher_layers)
        s = [student_hidden_states[i] for i, _ in self.pairs]
        t = [teacher_hidden_states[j] for _, j in self.pairs]
        return hidden_match(
            s, t, self.weight, self.bias, loss=self.loss, mask=attention_mask, layer_weights=self.layer_weights,
            reduction=self.reduction, eps=self.eps, backend=self.backend,
        )  # fmt: skip

    def attention_loss(
        self,
        student_attentions: Sequence[Tensor],
        teacher_attentions: Sequence[Tensor],
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The attention term over the mapped transformer layers (``attention`` must be set)."""
        if self.attention is None:
            raise ValueError("attention_loss needs attention='kl' or 'mse' at construction")
        for name, x, n in (
            ("student_attentions", student_attentions, self.student_layers),
            ("teacher_attentions", teacher_attentions, self.teacher_layers),
        ):
            if not isinstance(x, (list, tuple)) or len(x) != n:
                raise ValueError(
                    f"{name} must be the model's tuple of {n} attention tensors [B, heads, T, T] "
                    f"(output_attentions=True), got "
                    f"{len(x) if isinstance(x, (list, tuple)) else type(x).__name__}"
                )
        s = torch.stack([student_attentions[i - 1] for i, _ in self.attention_pairs])
        t = torch.stack([teacher_attentions[j - 1] for _, j in self.attention_pairs])
        if s.dim() != 5 or s.shape != t.shape:
            raise ValueError(
                f"student_attentions and teacher_attentions must be [B, heads, T, T] with the same shape (the same "
                f"number of heads), got {tuple(s.shape[1:])} and {tuple(t.shape[1:])}"
            )
        A, B, heads, T = s.shape[0], s.shape[1], s.shape[2], s.shape[3]
        keep = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must be [B, T] = {(B, T)}, got {tuple(attention_mask.shape)}")
            keep = (attention_mask != 0)[:, None, :].expand(B, heads, T)
        if self.attention == "kl":
            # log-probabilities are valid logits: softmax(log p) = p. The floor keeps a probability
            # that underflowed to 0 in the student finite; masked keys (0 in both) stay negligible.
            tiny = torch.finfo(s.dtype).tiny
            s_log = s.clamp_min(tiny).log()
            t_log = t.clamp_min(tiny).log()
            mask = None if keep is None else keep[None].expand(A, B, heads, T)
            return distill_loss(
                s_log, t_log, temperature=1.0, divergence="kl", reduction="batchmean", mask=mask, backend=self.backend
            )
        # "mse": each attention row [T keys] is a state to match, without projection
        return hidden_match(
            s.reshape(A, B * heads, T, T), t.reshape(A, B * heads, T, T), loss="mse",
            mask=None if keep is None else keep.reshape(B * heads, T), reduction="mean", backend=self.backend,
        )  # fmt: skip

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        attention_mask: Tensor | None = None,
        student_attentions: Sequence[Tensor] | None = None,
        teacher_attentions: Sequence[Tensor] | None = None,
    ) -> Tensor:
        loss = self.hidden_loss(student_hidden_states, teacher_hidden_states, attention_mask)
        if self.attention is not None:
            if student_attentions is None or teacher_attentions is None:
                raise ValueError(
                    f"attention={self.attention!r} needs student_attentions and teacher_attentions (run both models "
                    f"with output_attentions=True)"
                )
            loss = loss + self.attention_weight * self.attention_loss(
                student_attentions, teacher_attentions, attention_mask
            )
        return loss

    def extra_repr(self) -> str:
        return (
            f"student_hidden={self.student_hidden}, teacher_hidden={self.teacher_hidden}, pairs={self.pairs}, "
            f"loss={self.loss!r}, project={self.weight is not None}, attention={self.attention!r}"
        )
