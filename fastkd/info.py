"""``python -m fastkd.info``: versions, and each backend's availability with the reason when not."""

from __future__ import annotations

import os
import platform
import sys


def report() -> str:
    os.environ.setdefault("FASTKD_NO_EXT_WARNING", "1")  # the reason is printed below instead
    import torch

    import fastkd
    from fastkd import _ext
    from fastkd.backends import BACKENDS, backend_status

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"not available ({e.__class__.__name__}: {e})"
    lines = [
        f"fastkd  {fastkd.__version__}  ({os.path.dirname(fastkd.__file__)})",
        f"torch   {torch.__version__}  (CUDA {torch.version.cuda or 'none'})",
        f"triton  {triton_version}",
        f"python  {sys.version.split()[0]}  {platform.machine()}",
    ]
    info = _ext.build_info()
    if _ext.available():
        lib = _ext.library()
        lines.append(
            f"fastkd._C built for torch {info.get('torch', '?')}, CUDA kernels: {'yes' if lib.cuda_built() else 'no'}, "
            f"threads: {torch.get_num_threads()}"
        )
        lines.append(_ext.cpu_capability_line())
    lines.append(
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  FASTKD_BACKEND={os.environ.get('FASTKD_BACKEND', '')}"
    )
    lines.append("")
    lines.append("backend  available  reason")
    for name in BACKENDS:
        ok, reason = backend_status(name)
        lines.append(f"{name:<8} {'yes' if ok else 'no':<10} {reason}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
