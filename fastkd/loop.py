"""The distillation loop: one readable file, top to bottom.

    result = fastkd.loop.distill(DistillConfig(teacher="path/to/teacher", method="zskd",
                                               ood="wordnet", eval="dev.csv", max_steps=500))

What happens, in order (each step is a section below):

1. check the configuration, then load the teacher (frozen, eval mode), its tokenizer and the data
   the method is allowed to see: data-free methods read the OOD source and, for evaluation only,
   the eval split; only ``supervised`` reads the training split;
2. build the student from the teacher (:mod:`fastkd.student`), the optional hidden-state matcher,
   the method (:mod:`fastkd.methods`) and AdamW with linear warmup and decay;
3. resume from ``out_dir/checkpoint`` when asked (safetensors + JSON, no pickle);
4. for each optimizer step: reseed every RNG from (seed, step, rank); let the method prepare
   (generator updates); for each micro-batch let the method produce views, run the teacher under
   no_grad and the student, add KD (+ hidden matching, + the method's own term), backward;
   average gradients across ranks; clip; step;
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
step (after gradient accumulation, as DDP's ``no_sync`` would); rank 0 evaluates, logs and saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd import data as fdata
from fastkd.metrics import classification_metrics

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
SCHEDULES = ("linear", "cosine", "constant")
DIVERGENCES = ("kl", "reverse_kl", "jsd")
HIDDEN_LOSSES = ("mse", "cosine", "nmse")


class DistillError(ValueError):
    """A configuration, input or checkpoint problem found before (or instead of) training."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help, "default": default})


@dataclass
class DistillConfig:
    """Every option of ``fastkd distill`` (the same names, with ``-`` for ``_``, on the command line).

    Loadable from YAML or JSON with :meth:`from_file`; unknown keys are errors.
    """

    teacher: str = _f("", "fine-tuned teacher: a local folder or hub id of a sequence classifier (required)")
    method: str = _f("zskd", "distillation method: zskd, asdfd, t3, random, ood or supervised")
    ood: str | None = _f(None, "out-of-domain text: file, folder, datasets name or named source (zskd, t3, ood)")
    train: str | None = _f(None, "labeled training data; read only by the supervised upper bound")
    eval: str | None = _f(None, "labeled evaluation data (CSV/TSV/JSONL, dataset or named source)")
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
    hidden_weight: float | None = _f(None, "weight of hidden-state matching (default: 1.0 for asdfd, else 0)")
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
    resume: bool = _f(False, "continue from out_dir/checkpoint (the configuration must match)")
    overwrite: bool = _f(False, "start afresh even if out_dir holds a checkpoint")
    stop_after: int | None = _f(None, "stop (with a checkpoint) after this many steps in this run")
    progress: bool = _f(True, "show a progress bar")

    # options that do not change what is trained; a resumed run may change them
    _RUNTIME = frozenset(
        {
            "out_dir", "eval", "eval_every", "eval_batch_size", "eval_max_rows", "save_every", "log_every", "device",
            "threads", "resume", "overwrite", "stop_after", "progress",
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
    except OSError as e:
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
# Models and evaluation
# --------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DistillError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"device {name!r} requested but CUDA is not available")
    return dev


def _looks_like_path(s: str) -> bool:
    # hub ids look like "name" or "org/name"; anything else that does not exist is a missing path
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s or os.path.splitdrive(s)[0] != ""


def load_classifier(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """Load a fine-tuned sequence classifier and its tokenizer (folder or hub id), with clear errors."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if not path:
        raise DistillError("no teacher given (--teacher PATH_OR_HUB_ID)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise DistillError(f"teacher {path!r} is a file; give the folder that holds config.json and the weights")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise DistillError(f"teacher folder {path!r} has no config.json (is it a transformers model folder?)")
    if not os.path.exists(path) and _looks_like_path(path):
        raise DistillError(f"teacher path {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise DistillError(f"cannot load teacher {path!r}: {e.__class__.__name__}: {e}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise DistillError(
            f"teacher {path!r} is not a sequence classifier (architectures: {archs or 'none'}); fine-tune one "
            "first, e.g. with `fastkd teacher`"
        )
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise DistillError(f"cannot load teacher {path!r}: {e.__class__.__name__}: {e}") from None
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise DistillError(f"teacher {path!r} lacks trained weights for {missing[:6]}; is it fine-tuned?")
    return model.to(device), tokenizer


def _batches(rows: Sequence[dict], size: int) -> Iterator[list[dict]]:
    for i in range(0, len(rows), size):
        yield list(rows[i : i + size])


@torch.no_grad()
def predict_logits(
    model: nn.Module, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 64, max_length: int = 128,
    device: torch.device | str | None = None,
) -> Tensor:  # fmt: skip
    """``[N, num_labels]`` float32 logits for labeled (or unlabeled) rows, in their order."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]) + len(rows[i].get("text_pair") or ""))
    chunks: list[Tensor] = []
    try:
        for chunk in _batches([rows[i] for i in order], batch_size):
            pairs = [r.get("text_pair") for r in chunk]
            enc = fdata.encode(
                tokenizer, [r["text"] for r in chunk], pairs if any(p is not None for p in pairs) else None,
                max_length=max_length, device=device,
            )  # fmt: skip
            chunks.append(model(**enc).logits.float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    ordered = torch.cat(chunks)
    logits = torch.empty_like(ordered)
    logits[torch.tensor(order)] = ordered
    return logits


def evaluate(
    model: nn.Module, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 64, max_length: int = 128,
    device: torch.device | str | None = None,
) -> dict[str, float]:  # fmt: skip
    """Accuracy, macro-F1 and MCC of a sequence classifier on labeled rows (see fastkd.metrics)."""
    logits = predict_logits(model, tokenizer, rows, batch_size=batch_size, max_length=max_length, device=device)
    return classification_metrics(logits.argmax(-1), [r["label"] for r in rows])


# --------------------------------------------------------------------------------------------
# Checkpoints: tensors in safetensors, everything else in JSON (never pickle)
# --------------------------------------------------------------------------------------------
CHECKPOINT = "checkpoint"


def _flatten(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON tree for ``obj`` with tensors moved into ``tensors`` (referenced by key)."""
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, f"{key}.{i}", tensors)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key!r} (only tensors and JSON values)")


def _unflatten(tree: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__items__"}:
            return {(tuple(k) if isinstance(k, list) else k): _unflatten(v, tensors) for k, v in tree["__items__"]}
        if set(tree) == {"__tuple__"}:
            return tuple(_unflatten(v, tensors) for v in tree["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    return tree


def save_checkpoint(path: str, student: nn.Module, trainer_state: dict[str, Any], info: dict[str, Any]) -> None:
    """Write ``path`` atomically: student.safetensors, trainer.safetensors, state.json."""
    from safetensors.torch import save_file, save_model

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(student, os.path.join(tmp, "student.safetensors"))
    tensors: dict[str, Tensor] = {}
    tree = _flatten(trainer_state, "t", tensors)
    save_file(tensors, os.path.join(tmp, "trainer.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump({**info, "trainer": tree}, f, indent=1)
    old = path + ".old"
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str, student: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the student weights in place; return (trainer_state, info) from a checkpoint folder."""
    from safetensors.torch import load_file, load_model

    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        info = json.load(f)
    load_model(student, os.path.join(path, "student.safetensors"))
    tensors = load_file(os.path.join(path, "trainer.safetensors"))
    trainer = _unflatten(info.pop("trainer"), tensors)
    return trainer, info


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
def check_config(cfg: DistillConfig) -> tuple[type, Any]:
    """Validate options (types, ranges, method and its options); returns (method class, options)."""
    from fastkd.methods import get_method
    from fastkd.methods.base import OptionError

    def positive(name: str, allow_zero: bool = False) -> None:
        v = getattr(cfg, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
        if not ok:
            raise DistillError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {v!r}")

    for name in ("max_steps", "batch_size", "grad_accum", "max_length", "eval_batch_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise DistillError(f"{name} must be a positive integer, got {v!r}")
    for name in ("lr", "temperature"):
        positive(name)
    for name in ("weight_decay", "max_grad_norm", "kd_weight", "ce_weight", "eval_every", "save_every", "log_every"):
        positive(name, allow_zero=True)
    if cfg.hidden_weight is not None:
        positive("hidden_weight", allow_zero=True)
    if cfg.schedule not in SCHEDULES:
        raise DistillError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.divergence not in DIVERGENCES:
        raise DistillError(f"divergence must be one of {DIVERGENCES}, got {cfg.divergence!r}")
    if cfg.hidden_loss not in HIDDEN_LOSSES:
        raise DistillError(f"hidden_loss must be one of {HIDDEN_LOSSES}, got {cfg.hidden_loss!r}")
    if cfg.student_init not in ("auto", "teacher", "embeddings", "random"):
        raise DistillError(f"student_init must be auto, teacher, embeddings or random, got {cfg.student_init!r}")
    if cfg.stop_after is not None and (isinstance(cfg.stop_after, bool) or cfg.stop_after < 0):
        raise DistillError(f"stop_after must be >= 0, got {cfg.stop_after!r}")
    if cfg.resume and cfg.overwrite:
        raise DistillError("resume and overwrite exclude each other")
    if not isinstance(cfg.method_options, dict):
        raise DistillError("method_options must be a mapping of option names to values")
    try:
        method_cls = get_method(cfg.method)
        options = method_cls.parse_options(cfg.method_options)
    except (OptionError, ValueError) as e:
        raise DistillError(str(e)) from None
    if method_cls.needs_ood and not cfg.ood:
        raise DistillError(f"method {cfg.method!r} needs out-of-domain text: give --ood (a file, folder or source)")
    if not method_cls.data_free and not cfg.train:
        raise DistillError(f"method {cfg.method!r} needs the labeled training data: give --train")
    return method_cls, options


def _prepare_out_dir(cfg: DistillConfig, rank: int) -> str | None:
    """The checkpoint to resume from (or None), after checking out_dir against resume/overwrite."""
    ckpt = os.path.join(cfg.out_dir, CHECKPOINT)
    has = os.path.isfile(os.path.join(ckpt, "state.json"))
    if has and not cfg.resume and not cfg.overwrite:
        raise DistillError(
            f"{cfg.out_dir!r} already holds a checkpoint; pass --resume to continue it or --overwrite to start again"
        )
    if has and cfg.overwrite and rank == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cfg.out_dir, "metrics.jsonl"))
        return None
    if has and cfg.resume:
        with open(os.path.join(ckpt, "state.json"), encoding="utf-8") as f:
            saved = json.load(f).get("config", {})
        now = json.loads(json.dumps(cfg.fingerprint()))
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise DistillError(
                f"cannot resume {ckpt!r}: it was written with a different configuration ({details}); "
                "use the same options, another --out-dir, or --overwrite"
            )
        return ckpt
    return None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def distill(config: DistillConfig, *, teacher: nn.Module | None = None, tokenizer: Any = None) -> DistillResult:
    """Distil ``config.teacher`` into a smaller student with ``config.method``; see the module doc.

    ``teacher`` / ``tokenizer`` may be given as objects instead of ``config.teacher`` (the teacher is
    then frozen in place: ``requires_grad_(False)`` and ``eval()``; its weights are not modified).
    """
    from fastkd.methods.base import MethodContext, StepInfo
    from fastkd.student import EmbeddingBridge, build_student, count_parameters, model_dims, student_dims

    cfg = config
    # ---- 1. checks, teacher, data ---------------------------------------------------------------
    method_cls, options = check_config(cfg)
    rank, world, device, our_group = _dist_setup(cfg.device)
    threads_before = torch.get_num_threads()
    try:
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
        num_labels = int(teacher.config.num_labels)
        label2id = {str(k): int(v) for k, v in (getattr(teacher.config, "label2id", None) or {}).items()}
        t_dims = model_dims(teacher.config)
        try:
            s_dims = student_dims(
                teacher.config, layers=cfg.student_layers, hidden=cfg.student_hidden, heads=cfg.student_heads,
                intermediate=cfg.student_intermediate,
            )  # fmt: skip
        except ValueError as e:
            raise DistillError(str(e)) from None

        eval_rows: list[dict] = []
        if cfg.eval:
            eval_rows = _load("eval", lambda: fdata.load_labeled(cfg.eval, label2id=label2id))
            if cfg.eval_max_rows:
                eval_rows = eval_rows[: cfg.eval_max_rows]
            bad = sorted({r["label"] for r in eval_rows if not 0 <= r["label"] < num_labels})
            if bad:
                raise DistillError(
                    f"eval data {cfg.eval!r} has labels {bad[:10]} but the teacher has {num_labels} classes "
                    f"(0..{num_labels - 1}); is it the teacher's task?"
                )
        ood_texts = _load("ood", lambda: fdata.load_text(cfg.ood)) if method_cls.needs_ood else None
        train_rows = None
        if not method_cls.data_free:  # only the supervised upper bound reads the training split
            train_rows = _load("train", lambda: fdata.load_labeled(cfg.train, label2id=label2id))
            bad = sorted({r["label"] for r in train_rows if not 0 <= r["label"] < num_labels})
            if bad:
                raise DistillError(f"train data has labels {bad[:10]} outside the teacher's 0..{num_labels - 1}")
        pair_task = any(r.get("text_pair") for r in (train_rows or eval_rows))
        resume_from = _prepare_out_dir(cfg, rank)

        # ---- 2. student, matcher, method, optimizer ----------------------------------------------
        student = build_student(
            teacher, layers=s_dims["layers"], hidden=s_dims["hidden"], heads=s_dims["heads"],
            intermediate=s_dims["intermediate"], init=cfg.student_init, seed=cfg.seed,
        )  # fmt: skip
        hidden_weight = cfg.hidden_weight if cfg.hidden_weight is not None else method_cls.default_hidden_weight
        matcher = None
        if hidden_weight > 0:
            import fastkd.nn as knn

            if not hasattr(knn, "HiddenStateMatcher"):
                raise DistillError("hidden_weight > 0 needs fastkd.nn.HiddenStateMatcher (not in this fastkd build)")
            matcher = knn.HiddenStateMatcher(
                s_dims["hidden"], t_dims["hidden"], s_dims["layers"], t_dims["layers"], layer_map="uniform",
                loss=cfg.hidden_loss, project=s_dims["hidden"] != t_dims["hidden"],
            ).to(device)  # fmt: skip
        autocast_on = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast("cuda", dtype=torch.bfloat16) if autocast_on else contextlib.nullcontext()

        ctx = MethodContext(
            teacher=teacher, student=student, tokenizer=tokenizer, device=device, num_labels=num_labels,
            pair_task=pair_task, max_length=cfg.max_length, temperature=cfg.temperature, divergence=cfg.divergence,
            seed=cfg.seed, micro_batch_size=micro, rank=rank, world=world, ood_texts=ood_texts,
            train_rows=train_rows, bridge=EmbeddingBridge(teacher, student), autocast=autocast,
            all_reduce=lambda ts: _all_reduce_mean(ts, world), progress=cfg.progress and rank == 0,
        )  # fmt: skip
        method = method_cls(ctx, options)
        try:
            method.setup()
        except ValueError as e:  # e.g. a generator that cannot be loaded, a tokenizer without [MASK]
            raise DistillError(f"method {cfg.method!r}: {e}") from None

        modules: list[nn.Module] = [student] + ([matcher] if matcher is not None else [])
        extra_params = method.student_parameters()
        decay, no_decay = [], []
        for mod in modules:
            for name, p in mod.named_parameters():
                if p.requires_grad:
                    (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        for p in extra_params:
            (no_decay if p.ndim < 2 else decay).append(p)
        params = decay + no_decay
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
        )  # fmt: skip

        # ---- 3. resume -------------------------------------------------------------------------------
        step, history, wall_before = 0, [], 0.0
        if resume_from is not None:
            trainer, info = load_checkpoint(resume_from, student)
            optimizer.load_state_dict(trainer["optimizer"])
            if matcher is not None:
                matcher.load_state_dict(trainer["matcher"])
            method.load_state_dict(trainer["method"])
            step, history, wall_before = int(info["step"]), list(info["history"]), float(info["wall_s"])
        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            _trim_metrics(metrics_path, step)

        teacher_logits_eval = None
        teacher_metrics: dict[str, float] = {}
        if eval_rows and rank == 0:
            teacher_logits_eval = predict_logits(
                teacher, tokenizer, eval_rows, batch_size=cfg.eval_batch_size, max_length=cfg.max_length, device=device
            )
            teacher_metrics = classification_metrics(teacher_logits_eval.argmax(-1), [r["label"] for r in eval_rows])

        def run_eval(at: int) -> dict[str, float]:
            logits = predict_logits(
                student, tokenizer, eval_rows, batch_size=cfg.eval_batch_size, max_length=cfg.max_length, device=device
            )
            m = classification_metrics(logits.argmax(-1), [r["label"] for r in eval_rows])
            assert teacher_logits_eval is not None
            m["agreement"] = float((logits.argmax(-1) == teacher_logits_eval.argmax(-1)).float().mean())
            m["kl_to_teacher"] = float(
                F.kl_div(
                    logits.log_softmax(-1), teacher_logits_eval.log_softmax(-1), log_target=True, reduction="batchmean"
                )
            )
            return m

        def trainer_state() -> dict[str, Any]:
            return {
                "optimizer": optimizer.state_dict(),
                "matcher": matcher.state_dict() if matcher is not None else {},
                "method": method.state_dict(),
            }

        def checkpoint(at: int, wall: float) -> None:
            if rank == 0:
                info = {"step": at, "history": history, "wall_s": wall, "config": cfg.fingerprint()}
                save_checkpoint(os.path.join(cfg.out_dir, CHECKPOINT), student, trainer_state(), info)

        def log_line(rec: dict[str, Any]) -> None:
            if rank == 0:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")

        # ---- 4. train ------------------------------------------------------------------------------
        student.train()
        last_loss = float("nan")
        uses_embeds = getattr(method, "uses_embeddings", False)
        stop_at = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, step + cfg.stop_after)
        start_step, t_run = step, time.perf_counter()
        interrupted = False
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.max_steps, initial=step, desc=f"distill {cfg.method}", dynamic_ncols=True,
            disable=not (cfg.progress and rank == 0), unit="step",
        )  # fmt: skip
        window: list[float] = []
        t_window = time.perf_counter()
        with _GracefulStop() as stop:
            while step < stop_at:
                _seed_step(cfg.seed, step, rank)
                logs = method.before_step(step, torch.Generator().manual_seed(fdata.mix_seed(cfg.seed, step, rank, 1)))
                if uses_embeds:
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
                    views = method.batch(info)
                    loss = torch.zeros((), device=device)
                    for view in views:
                        with torch.no_grad():
                            t_out = ctx.forward(teacher, view, "teacher", hidden=matcher is not None)
                        s_out = ctx.forward(student, view, "student", hidden=matcher is not None)
                        kd = ctx.kd(s_out.logits, t_out.logits)
                        term = cfg.kd_weight * kd
                        _acc(parts, f"kd_{view.name}", kd / cfg.grad_accum)
                        if matcher is not None:
                            hm = matcher(s_out.hidden_states, t_out.hidden_states, view.attention_mask)
                            term = term + hidden_weight * hm
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
                    (loss / cfg.grad_accum).backward()
                    total += loss.detach() / cfg.grad_accum
                if world > 1:
                    grads = []
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        grads.append(p.grad)
                    _all_reduce_mean(grads, world)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                last_loss = float(total)  # host sync: once per step, for the progress bar and the log
                window.append(last_loss)

                # ---- 5. log, evaluate, checkpoint ------------------------------------------------
                if rank == 0:
                    elapsed = time.perf_counter() - t_window
                    rate = cfg.batch_size * len(window) / max(elapsed, 1e-9)
                    bar.set_postfix(loss=f"{last_loss:.4f}", rows_s=f"{rate:.1f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)
                    if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
                        rec = {"step": step, "loss": sum(window) / len(window), "lr": lr, "rows_per_s": rate}
                        rec.update({k: round(float(v), 6) for k, v in parts.items()})
                        rec.update(logs)
                        rec["wall_s"] = wall_before + time.perf_counter() - t_run
                        log_line(rec)
                        window, t_window = [], time.perf_counter()
                    if eval_rows and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                        m_eval = run_eval(step)
                        rec = {"step": step, "loss": last_loss, **m_eval}
                        rec["wall_s"] = wall_before + time.perf_counter() - t_run
                        history.append(rec)
                        log_line({"eval": True, **rec})
                        bar.write(_fmt_eval(rec))
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    checkpoint(step, wall_before + time.perf_counter() - t_run)
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
            if eval_rows:
                final = run_eval(step)
                if not history or history[-1]["step"] != step:
                    rec = {"step": step, "loss": last_loss, **final, "wall_s": wall}
                    history.append(rec)
                    log_line({"eval": True, **rec})
                if cfg.progress:
                    print(_fmt_eval({"step": step, **final}), flush=True)
            student_dir = os.path.join(cfg.out_dir, "student")
            student.save_pretrained(student_dir)
            tokenizer.save_pretrained(student_dir)
        result = DistillResult(
            student_dir=student_dir, history=history, final=final, wall_time_s=wall,
            teacher_params=count_parameters(teacher), student_params=count_parameters(student), steps=step,
            method=cfg.method, out_dir=cfg.out_dir, teacher_metrics=teacher_metrics,
            interrupted=interrupted or step < cfg.max_steps, student_dims=s_dims,
        )  # fmt: skip
        if rank == 0:
            with open(os.path.join(cfg.out_dir, "result.json"), "w", encoding="utf-8") as f:
                json.dump({**dataclasses.asdict(result), "config": cfg.to_dict()}, f, indent=1)
        return result
    finally:
        torch.set_num_threads(threads_before)
        if our_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _load(option: str, read: Any) -> Any:
    try:
        return read()
    except fdata.DataError as e:
        raise DistillError(f"--{option}: {e}") from None


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
