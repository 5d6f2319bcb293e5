"""Build a student from a teacher sequence classifier, and map teacher embeddings to the student.

Two ways, chosen by the size you ask for (:func:`build_student`):

* **Fewer layers, same width** (DistilBERT-style): the student is the teacher's architecture with
  ``layers`` transformer blocks; embeddings, the kept blocks (evenly spaced, first and last
  included), pooler and classifier are copied from the teacher.
* **A size config** (``hidden``, ``heads``, ``intermediate`` smaller than the teacher's): the
  word / position / segment embeddings start as the teacher's, projected onto their top ``hidden``
  principal directions (an SVD of the teacher's embedding matrix), which keeps the lexical knowledge
  that the vocabulary-sized matrix holds (most of a small student's parameters); the blocks, pooler
  and classifier start from the teacher's kept blocks, projected through the same basis, with the
  strongest heads and feed-forward neurons kept (BERT / RoBERTa / ELECTRA / DistilBERT layouts; other
  tensors start random). Hidden-state matching then learns projections between the widths
  (:class:`fastkd.nn.HiddenStateMatcher`).

Both keep the teacher's tokenizer, labels and model class, so the student is saved with
``save_pretrained`` and loads anywhere the teacher does (``transformers.pipeline`` included).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fastkd.errors import StudentConfigError

INIT_CHOICES = ("auto", "teacher", "embeddings", "random")
_INTERMEDIATE_NAMES = ("intermediate_size", "hidden_dim", "ffn_dim", "n_inner")
_LAYER_KEY = re.compile(r"\.(layer|layers|h|block|blocks)\.(\d+)\.")


def _intermediate_name(config: Any) -> str | None:
    for n in _INTERMEDIATE_NAMES:
        if getattr(config, n, None) is not None:
            return n
    return None


def model_dims(config: Any) -> dict[str, int]:
    """``{"layers", "hidden", "heads", "intermediate"}`` of a transformers config (0 if unknown)."""
    name = _intermediate_name(config)
    return {
        "layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "hidden": int(getattr(config, "hidden_size", 0) or 0),
        "heads": int(getattr(config, "num_attention_heads", 0) or 0),
        "intermediate": int(getattr(config, name, 0) or 0) if name else 0,
    }


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def select_layers(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layers a shallower student copies: evenly spaced, first and last included.

    6 -> 3 gives [0, 2, 5]; 12 -> 6 gives [0, 2, 4, 7, 9, 11]; a one-layer student takes the last.
    """
    if n_student >= n_teacher:
        return list(range(n_student))
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_dims(
    teacher_config: Any,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    intermediate: int | None = None,
) -> dict[str, int]:
    """The student's dimensions, with defaults filled in and checked against the teacher's.

    Defaults: half the teacher's layers (at least 1); the teacher's width; heads that keep the
    teacher's head size; the teacher's intermediate/hidden ratio.
    """
    t = model_dims(teacher_config)
    if not t["layers"] or not t["hidden"] or not t["heads"]:
        raise StudentConfigError(
            f"cannot read layers/hidden/heads from the teacher config ({type(teacher_config).__name__}); "
            "fastkd builds students for encoder classifiers (BERT, RoBERTa, DistilBERT, ELECTRA, ...)"
        )
    for name, v in (("layers", layers), ("hidden", hidden), ("heads", heads), ("intermediate", intermediate)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise StudentConfigError(f"student {name} must be a positive integer, got {v!r}")
    s_layers = layers if layers is not None else max(1, t["layers"] // 2)
    s_hidden = hidden if hidden is not None else t["hidden"]
    head_size = t["hidden"] // t["heads"]
    if heads is None:
        heads = t["heads"] if s_hidden == t["hidden"] else max(1, s_hidden // head_size)
        while s_hidden % heads:
            heads -= 1
    if s_hidden % heads:
        raise StudentConfigError(f"student hidden size {s_hidden} must be divisible by its heads {heads}")
    if intermediate is None:
        ratio = (t["intermediate"] / t["hidden"]) if t["intermediate"] else 4.0
        intermediate = t["intermediate"] if s_hidden == t["hidden"] and t["intermediate"] else int(ratio * s_hidden)
    dims = {"layers": s_layers, "hidden": s_hidden, "heads": heads, "intermediate": intermediate}
    keys = [k for k in dims if t[k]]
    if all(dims[k] >= t[k] for k in keys):
        raise StudentConfigError(
            "the student is not smaller than the teacher in any dimension "
            f"(student {dims}, teacher {t}); give fewer layers (--student-layers) or a narrower hidden size "
            "(--student-hidden)"
        )
    return dims


def _remap_layer_key(key: str, mapping: list[int]) -> str | None:
    m = _LAYER_KEY.search(key)
    if m is None:
        return key
    i = int(m.group(2))
    if i >= len(mapping):
        return None
    return key[: m.start(2)] + str(mapping[i]) + key[m.end(2) :]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small dense linear algebra (a few hundred rows) on one thread: multi-threaded LAPACK on a busy
    2-core machine was measured 300x slower (15 s instead of 0.05 s for a 384 x 384 eigh)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pca_basis(matrix: Tensor, k: int) -> Tensor:
    """``[H, k]`` orthonormal top-k right singular vectors of ``matrix`` ``[V, H]`` (float64 eigh)."""
    m = matrix.detach().double()
    gram = m.T @ m
    with _one_thread():
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    basis = evecs[:, torch.argsort(evals, descending=True)[:k]]
    # fix the sign of each direction (eigh's signs are arbitrary): largest component positive
    signs = torch.sign(basis[basis.abs().argmax(0), torch.arange(k)])
    signs[signs == 0] = 1
    return (basis * signs).to(matrix.dtype)


def _named_embeddings(model: nn.Module) -> dict[str, nn.Embedding]:
    """The model's embedding tables keyed by role: word, position, token_type."""
    out: dict[str, nn.Embedding] = {}
    word = model.get_input_embeddings()
    if isinstance(word, nn.Embedding):
        out["word"] = word
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Embedding) or mod is word:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "position" in leaf and "position" not in out:
            out["position"] = mod
        elif ("token_type" in leaf or "segment" in leaf) and "token_type" not in out:
            out["token_type"] = mod
    return out


# Roles of a transformer block's tensors, by name (BERT / RoBERTa / ELECTRA / MiniLM and DistilBERT):
# "qkv" reads the residual stream and writes heads, "attn_out" the reverse, "ffn_in" / "ffn_out" the
# same for the feed-forward neurons, "norm" is a LayerNorm over the residual stream.
_BLOCK_ROLES: tuple[tuple[str, str], ...] = (
    ("attention.self.query", "qkv"), ("attention.self.key", "qkv"), ("attention.self.value", "qkv"),
    ("attention.q_lin", "qkv"), ("attention.k_lin", "qkv"), ("attention.v_lin", "qkv"),
    ("attention.output.dense", "attn_out"), ("attention.out_lin", "attn_out"),
    ("attention.output.LayerNorm", "norm"), ("sa_layer_norm", "norm"),
    ("intermediate.dense", "ffn_in"), ("ffn.lin1", "ffn_in"),
    ("output.dense", "ffn_out"), ("ffn.lin2", "ffn_out"),
    ("output.LayerNorm", "norm"), ("output_layer_norm", "norm"),
)  # fmt: skip
_NORM_NAMES = ("layernorm", "layer_norm")


def _block_role(key: str) -> tuple[str, str] | None:
    """(role, "weight" | "bias") of a block tensor's state-dict key, or None."""
    m = _LAYER_KEY.search(key)
    if m is None:
        return None
    rest = key[m.end() :]
    for suffix, role in _BLOCK_ROLES:
        if rest in (suffix + ".weight", suffix + ".bias"):
            return role, rest.rsplit(".", 1)[1]
    return None


def _block_tensor(block: dict[str, Tensor], suffixes: tuple[str, ...]) -> Tensor | None:
    for suffix in suffixes:
        if suffix + ".weight" in block:
            return block[suffix + ".weight"]
    return None


@torch.no_grad()
def _project_layers(teacher: nn.Module, student: nn.Module, basis: Tensor, mapping: list[int]) -> int:
    """Initialise a narrower student's other tensors from the teacher's through ``basis`` ``[Ht, Hs]``.

    The residual stream is mapped by the orthonormal ``basis`` (the teacher's word-embedding principal
    directions): a matrix that reads it is multiplied by ``basis`` on the input side, one that writes it
    by ``basis.T`` on the output side. Each student block ``i`` takes teacher block ``mapping[i]`` and
    keeps its attention heads and feed-forward neurons with the largest weight norms (read x write);
    head selection needs the teacher's head size. LayerNorm gains are projected and rescaled by
    ``sqrt(Ht / Hs * kept energy)``: a LayerNorm over the ``Hs`` projected coordinates divides by a
    smaller standard deviation. An approximation (LayerNorm and GELU do not commute with the
    projection), so the student does not start equal to the teacher, but from its weights: on the
    MiniLM sentiment teacher a 2 x 128 student started this way was at 70% dev accuracy after 50
    OOD-KD steps, against 51% with random blocks. Tensors whose role is not recognised stay random.
    Returns the number of tensors set.
    """
    t_cfg, s_cfg = teacher.config, student.config
    ht, hs = int(t_cfg.hidden_size), int(s_cfg.hidden_size)
    hd_t = ht // int(t_cfg.num_attention_heads)
    heads_s = int(s_cfg.num_attention_heads)
    iname = _intermediate_name(s_cfg)
    inter_s = int(getattr(s_cfg, iname)) if iname else 0
    word = teacher.get_input_embeddings().weight.detach()
    p = basis.to(word.dtype)
    gain = math.sqrt(ht / hs) * float((word @ p).norm() / word.norm().clamp_min(1e-12))
    t_state, s_state = teacher.state_dict(), student.state_dict()

    # the teacher's blocks by index, tensors keyed by their name inside the block
    t_blocks: dict[int, dict[str, Tensor]] = {}
    for key, value in t_state.items():
        m = _LAYER_KEY.search(key)
        if m is not None:
            t_blocks.setdefault(int(m.group(2)), {})[key[m.end() :]] = value
    heads: dict[int, Tensor] = {}  # student block -> kept rows of the teacher's attention projections
    neurons: dict[int, Tensor] = {}  # student block -> kept feed-forward neurons
    for i, j in enumerate(mapping):
        block = t_blocks.get(j, {})
        w_v = _block_tensor(block, ("attention.self.value", "attention.v_lin"))
        w_o = _block_tensor(block, ("attention.output.dense", "attention.out_lin"))
        if hs // heads_s == hd_t and w_v is not None and w_o is not None:
            n_heads = w_o.shape[1] // hd_t
            score = torch.stack([w_o[:, h * hd_t : (h + 1) * hd_t].norm() * w_v[h * hd_t : (h + 1) * hd_t].norm()
                                 for h in range(n_heads)])  # fmt: skip
            keep = torch.argsort(score, descending=True)[:heads_s].sort().values.tolist()
            heads[i] = torch.cat([torch.arange(h * hd_t, (h + 1) * hd_t) for h in keep])
        w_1 = _block_tensor(block, ("intermediate.dense", "ffn.lin1"))
        w_2 = _block_tensor(block, ("output.dense", "ffn.lin2"))
        if inter_s and w_1 is not None and w_2 is not None:
            score = w_1.norm(dim=1) * w_2.norm(dim=0)
            neurons[i] = torch.argsort(score, descending=True)[:inter_s].sort().values

    done = 0
    for key, value in s_state.items():
        t = t_state.get(_remap_layer_key(key, mapping) or "")
        if t is None:
            continue
        new: Tensor | None = None
        role = _block_role(key)
        if role is not None:
            m = _LAYER_KEY.search(key)
            assert m is not None
            kind = role[1]
            sel = heads.get(int(m.group(2))) if role[0] in ("qkv", "attn_out") else neurons.get(int(m.group(2)))
            if role[0] in ("qkv", "ffn_in") and sel is not None:
                new = t[sel] @ p if kind == "weight" else t[sel]
            elif role[0] in ("attn_out", "ffn_out") and sel is not None:
                new = p.T @ t[:, sel] if kind == "weight" else p.T @ t
            elif role[0] == "norm":
                new = (p * p).T @ t * gain if kind == "weight" else p.T @ t
        elif _LAYER_KEY.search(key) is None:
            if t.shape == value.shape:
                if not ("embeddings." in key and t.dim() == 2):  # embeddings are set already
                    new = t  # e.g. the classifier bias
            elif t.dim() == 1 and t.shape[0] == ht:
                is_norm = any(n in key.lower() for n in _NORM_NAMES) and key.endswith("weight")
                new = (p * p).T @ t * gain if is_norm else p.T @ t
            elif t.dim() == 2 and t.shape == (ht, ht):
                new = p.T @ t @ p  # e.g. the pooler
            elif t.dim() == 2 and t.shape[1] == ht and "embeddings." not in key:
                new = t @ p  # e.g. the classifier
        if new is not None and new.shape == value.shape:
            value.copy_(new)
            done += 1
    return done


@torch.no_grad()
def build_student(
    teacher: nn.Module,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    intermediate: int | None = None,
    init: str = "auto",
    seed: int = 0,
) -> nn.Module:
    """A smaller sequence classifier of the teacher's class, initialised from the teacher.

    Args:
        teacher: a ``transformers`` sequence-classification model (its config gives the defaults).
        layers, hidden, heads, intermediate: the student's size; see :func:`student_dims`.
        init: ``"auto"`` (copy the kept layers when the width is the teacher's, else project the
            teacher's embeddings and kept blocks onto the narrower width; see the module doc),
            ``"teacher"`` (the same, but an error when nothing can be taken from the teacher),
            ``"embeddings"`` (only the embeddings from the teacher, projected when narrower; random
            blocks: an ablation), ``"random"`` (the architecture's own random initialisation).
        seed: seeds the random initialisation.

    Returns the student in training mode on the teacher's device, with ``fastkd_init`` (a short
    description of what was copied) attached to its config.
    """
    if init not in INIT_CHOICES:
        raise StudentConfigError(f"student init must be one of {INIT_CHOICES}, got {init!r}")
    from transformers import AutoModelForSequenceClassification

    dims = student_dims(teacher.config, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate)
    t_dims = model_dims(teacher.config)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = dims["layers"]
    cfg.hidden_size = dims["hidden"]
    cfg.num_attention_heads = dims["heads"]
    iname = _intermediate_name(cfg)
    if iname is not None:
        setattr(cfg, iname, dims["intermediate"])
    if getattr(cfg, "head_dim", None) is not None and dims["hidden"] != t_dims["hidden"]:
        cfg.head_dim = dims["hidden"] // dims["heads"]
    if hasattr(cfg, "_name_or_path"):
        cfg._name_or_path = ""
    devstate = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        student = AutoModelForSequenceClassification.from_config(cfg)
    finally:
        torch.random.set_rng_state(devstate)
    param = next(teacher.parameters())
    student.to(device=param.device, dtype=param.dtype)

    same_width = all(dims[k] == t_dims[k] for k in ("hidden", "heads", "intermediate") if t_dims[k])
    description = "random"
    mapping = select_layers(t_dims["layers"], dims["layers"])
    if init in ("auto", "teacher") and same_width:
        t_state = teacher.state_dict()
        copied = 0
        for key, value in student.state_dict().items():
            tkey = _remap_layer_key(key, mapping)
            if tkey is not None and tkey in t_state and t_state[tkey].shape == value.shape:
                value.copy_(t_state[tkey])
                copied += 1
        if copied == 0:
            raise StudentConfigError("no teacher weights could be copied into the student (unknown layout)")
        description = f"teacher layers {mapping}"
    elif init != "random":
        t_emb, s_emb = _named_embeddings(teacher), _named_embeddings(student)
        if "word" not in t_emb or "word" not in s_emb:
            if init == "teacher":
                raise StudentConfigError("the teacher has no word-embedding table to project")
        else:
            t_word = t_emb["word"].weight
            if t_word.shape[1] == dims["hidden"]:
                basis = torch.eye(dims["hidden"], dtype=t_word.dtype, device=t_word.device)
                description = "embeddings copied from the teacher"
            else:
                basis = _pca_basis(t_word, dims["hidden"])
                description = f"embeddings projected onto the teacher's top-{dims['hidden']} principal directions"
            for role, t_mod in t_emb.items():
                s_mod = s_emb.get(role)
                if s_mod is not None and s_mod.weight.shape[0] == t_mod.weight.shape[0]:
                    s_mod.weight.copy_(t_mod.weight @ basis)
            if init != "embeddings":
                projected = _project_layers(teacher, student, basis, mapping)
                if projected:
                    description += f"; {projected} other tensors projected likewise (top heads and neurons kept)"
    student.config.fastkd_init = description
    student.train()
    return student


class EmbeddingBridge:
    """Maps teacher-space input embeddings ``[..., Ht]`` to the student's input space ``[..., Hs]``.

    Pseudo and adversarial embeddings (AS-DFD, Zero-shot KD's embedding variant) live in the
    teacher's embedding space. The student reads them through ``x @ M`` where ``M = s * Q`` is the
    scaled orthogonal map (orthogonal Procrustes: ``Q`` with orthonormal columns, ``s`` a scalar)
    that best sends the teacher's word embeddings to the student's own, over a fixed sample of the
    vocabulary, refit from the student's current embeddings at each :meth:`refit`. ``M`` is the
    identity while the student holds the teacher's embeddings and the projection basis when
    :func:`build_student` initialised them by SVD projection. The orthogonality bounds the map's gain:
    an unconstrained least-squares map amplifies directions in which the teacher's embeddings vary
    little, and an adversary (which ascends the student's loss through the map) finds them. No
    gradient reaches ``M``; gradients flow through it to the teacher-space embeddings.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, sample: int = 8192) -> None:
        self.teacher_weight = teacher.get_input_embeddings().weight
        self.student_emb = student.get_input_embeddings()
        v = self.teacher_weight.shape[0]
        if self.student_emb.weight.shape[0] != v:
            raise ValueError(
                f"teacher and student vocabularies differ ({v} vs {self.student_emb.weight.shape[0]}): the student "
                "must use the teacher's tokenizer"
            )
        if self.student_emb.weight.shape[1] > self.teacher_weight.shape[1]:
            raise ValueError("the student's embeddings are wider than the teacher's; no orthogonal map exists")
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(v, generator=g)[: min(sample, v)].sort().values
        self.index = idx.to(self.teacher_weight.device)
        self._a = self.teacher_weight.detach()[self.index].double()
        self._gram = self._a.T @ self._a
        self.matrix: Tensor | None = None
        self.basis: Tensor | None = None
        self.refit()

    @torch.no_grad()
    def refit(self) -> None:
        b = self.student_emb.weight.detach()[self.index].double()
        cross = self._a.T @ b  # [Ht, Hs]
        with _one_thread():
            u, sv, vh = torch.linalg.svd(cross, full_matrices=False)
        q = u @ vh  # [Ht, Hs], orthonormal columns
        # least-squares scale for the fixed q: <A q, B> / |A q|^2
        scale = float(sv.sum()) / max(float((q * (self._gram @ q)).sum()), 1e-12)
        self.matrix = (scale * q).to(self.student_emb.weight.dtype)
        self.basis = q.to(self.student_emb.weight.dtype)

    def visible(self, teacher_vectors: Tensor) -> Tensor:
        """The part of teacher-space vectors the student can see: the projection onto the span of
        ``M``. Gradients are projected with it before pseudo or adversarial embeddings are updated,
        so that the changes that make the teacher respond are ones the student receives (a narrow
        student's map drops the other directions); the identity for a student of the teacher's width."""
        q = self.basis.to(teacher_vectors.dtype)
        if q.shape[0] == q.shape[1]:
            return teacher_vectors
        return (teacher_vectors @ q) @ q.T

    def __call__(self, teacher_embeds: Tensor) -> Tensor:
        assert self.matrix is not None
        return teacher_embeds @ self.matrix.to(teacher_embeds.dtype)
