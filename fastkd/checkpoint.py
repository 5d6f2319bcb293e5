"""Checkpoints of a distillation run: crash-safe at every instant, verified on resume, no pickle.

Layout inside the run's output folder::

    checkpoints/step-00000200/student.safetensors   the student's weights
                              trainer.safetensors   optimizer, matcher and method tensors
                              state.json            step, history, wall time, the configuration,
                                                    the non-tensor trainer state (JSON)
                              manifest.json         SHA-256 of each file above, written last
    checkpoints/LATEST                              the name of the newest complete folder

How a checkpoint is written (:func:`save`): the files go into ``step-N.tmp``, each is flushed and
fsync'ed, the manifest last; the folder is renamed to ``step-N`` and the parent fsync'ed; then
``LATEST`` is replaced atomically (written to a temporary file, fsync'ed, ``os.replace``d);
only then are older folders removed. A crash at any instant leaves at least one complete
checkpoint: the previous one (still named by ``LATEST`` and still on disk) or the new one.

How a checkpoint is found (:func:`find_latest`): every ``step-N`` folder (and the folders of the
older single-folder layout: ``checkpoint``, ``checkpoint.old``, ``checkpoint.tmp``) whose manifest
verifies is a candidate; the one with the highest step wins, so a pointer that lags behind or a
half-written folder costs nothing. A folder whose files do not match their checksums is skipped
with a warning; if no candidate verifies, resuming is a :class:`fastkd.errors.CheckpointError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Any

from torch import Tensor, nn

from fastkd.errors import CheckpointError

__all__ = ["CHECKPOINTS", "Checkpoint", "CheckpointError", "find_latest", "load", "remove_all", "save"]

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
MANIFEST = "manifest.json"
FILES = ("student.safetensors", "trainer.safetensors", "state.json")
LEGACY = ("checkpoint", "checkpoint.old", "checkpoint.tmp")  # the layout before versioned folders
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Checkpoint(dict):
    """What :func:`load` returns: ``trainer`` (the trainer state) plus the saved info keys."""


# ------------------------------------------------------------------------------------------------
# File operations (module functions so that tests can inject a crash between any two of them)
# ------------------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(src: str, dst: str) -> None:
    os.replace(src, dst)


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Trainer state: tensors go to safetensors, the rest to JSON
# ------------------------------------------------------------------------------------------------
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------
def save(
    out_dir: str, student: nn.Module, trainer_state: dict[str, Any], info: dict[str, Any], *, keep: int = 1
) -> str:
    """Write the checkpoint of step ``info["step"]`` under ``out_dir/checkpoints``; returns its folder.

    ``keep``: how many complete checkpoints to keep (the newest ones); at least 1.
    """
    from safetensors.torch import save as st_save

    step = int(info["step"])
    root = os.path.join(out_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    _rmtree(tmp)
    os.makedirs(tmp)

    tensors: dict[str, Tensor] = {}
    tree = _flatten(trainer_state, "t", tensors)
    student_state = {k: v.detach().cpu().contiguous() for k, v in _unique_state(student).items()}
    payload = {
        "student.safetensors": st_save(student_state),
        "trainer.safetensors": st_save(tensors),
        "state.json": json.dumps({**info, "trainer": tree}, indent=1).encode(),
    }
    for fname, data in payload.items():
        _write_bytes(os.path.join(tmp, fname), data)
    manifest = {"step": step, "files": {f: _sha256(d) for f, d in payload.items()}}
    _write_bytes(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if os.path.isdir(final):  # a checkpoint of the same step (a resumed run saving again)
        _rmtree(final)
    _replace(tmp, final)
    _fsync_dir(root)
    pointer_tmp = os.path.join(root, LATEST + ".tmp")
    _write_bytes(pointer_tmp, (name + "\n").encode())
    _replace(pointer_tmp, os.path.join(root, LATEST))
    _fsync_dir(root)
    for old in sorted(_step_dirs(root), reverse=True)[max(1, keep) :]:
        _rmtree(os.path.join(root, f"step-{old:08d}"))
    for legacy in LEGACY:
        _rmtree(os.path.join(out_dir, legacy))
    return final


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    # tied weights (e.g. decoder = embeddings) are stored once, as safetensors' save_model does
    seen: set[tuple] = set()
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape))
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def _step_dirs(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return [int(m.group(1)) for n in os.listdir(root) if (m := _STEP_DIR.match(n))]


# ------------------------------------------------------------------------------------------------
# Find, verify, load
# ------------------------------------------------------------------------------------------------
def _verify(folder: str) -> tuple[int | None, str]:
    """``(step, "")`` when ``folder`` is a complete checkpoint whose files match the manifest, else
    ``(None, reason)``. Folders of the older layout (no manifest) only need parseable files."""
    if not os.path.isfile(os.path.join(folder, "state.json")):
        return None, "no state.json"
    mpath = os.path.join(folder, MANIFEST)
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"unreadable manifest ({e.__class__.__name__})"
        for fname, digest in files.items():
            try:
                with open(os.path.join(folder, fname), "rb") as f:
                    if _sha256(f.read()) != digest:
                        return None, f"{fname} does not match its checksum"
            except OSError:
                return None, f"{fname} is missing"
    elif not all(os.path.isfile(os.path.join(folder, f)) for f in FILES):
        return None, "files missing"
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        return int(state["step"]), ""
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"invalid state.json ({e.__class__.__name__})"


def _candidates(out_dir: str) -> list[str]:
    root = os.path.join(out_dir, CHECKPOINTS)
    found = [os.path.join(root, f"step-{s:08d}") for s in _step_dirs(root)]
    found += [os.path.join(out_dir, n) for n in LEGACY if os.path.isdir(os.path.join(out_dir, n))]
    return found


def exists(out_dir: str) -> bool:
    """Whether ``out_dir`` holds anything that looks like a checkpoint (complete or not)."""
    return bool(_candidates(out_dir))


def scan(out_dir: str) -> tuple[str | None, list[str]]:
    """``(newest verified checkpoint folder or None, problems)``: one line per folder that was skipped."""
    best: tuple[int, str] | None = None
    problems = []
    for folder in _candidates(out_dir):
        step, reason = _verify(folder)
        if step is None:
            problems.append(f"{os.path.basename(folder)}: {reason}")
        elif best is None or step > best[0]:
            best = (step, folder)
    return (best[1] if best else None), problems


def find_latest(out_dir: str) -> str | None:
    """The newest complete, verified checkpoint folder in ``out_dir`` (None when there is none).

    Corrupt folders that were skipped while a good one exists are reported with a warning.
    """
    best, problems = scan(out_dir)
    if best is not None and problems:
        warnings.warn(f"fastkd: skipped checkpoint(s) {'; '.join(problems)}", stacklevel=2)
    return best


def read_info(folder: str) -> dict[str, Any]:
    """The saved info of a checkpoint folder (step, history, config, ...) without its tensors."""
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder!r}: unreadable state.json ({e.__class__.__name__}: {e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        raise CheckpointError(f"checkpoint {folder!r}: state.json has no integer 'step'")
    info.pop("trainer", None)
    return info


def load(folder: str, student: nn.Module) -> Checkpoint:
    """Load the student weights in place; return the info with the trainer state under ``trainer``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    step, reason = _verify(folder)
    if step is None:
        raise CheckpointError(f"checkpoint {folder!r} is incomplete or corrupt: {reason}")
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            info = json.load(f)
        weights = load_file(os.path.join(folder, "student.safetensors"))
        tensors = load_file(os.path.join(folder, "trainer.safetensors"))
        trainer = _unflatten(info.pop("trainer"), tensors)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {folder!r} is corrupt: {e.__class__.__name__}: {e}") from None
    expected = student.state_dict()
    missing = [k for k in expected if k not in weights]
    # tied weights are stored once: fill them from their twin by identity of storage
    if missing:
        by_ptr = {}
        for k, v in expected.items():
            by_ptr.setdefault((v.data_ptr(), v.dtype, tuple(v.shape)), []).append(k)
        for k in list(missing):
            v = expected[k]
            for twin in by_ptr.get((v.data_ptr(), v.dtype, tuple(v.shape)), []):
                if twin in weights:
                    weights[k] = weights[twin]
                    missing.remove(k)
                    break
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder!r} does not fit this student (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    try:
        student.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {folder!r} does not fit this student: {str(e).splitlines()[0]}") from None
    return Checkpoint(trainer=trainer, **info)


def remove_all(out_dir: str) -> None:
    """Delete every checkpoint in ``out_dir`` (``--overwrite``)."""
    _rmtree(os.path.join(out_dir, CHECKPOINTS))
    for legacy in LEGACY:
        _rmtree(os.path.join(out_dir, legacy))
