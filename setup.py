"""Build of fastkd and its compiled library ``fastkd._C``.

Switches (environment variables):

* ``FASTKD_CUDA``       ``auto`` (default): build the CUDA kernels when a CUDA toolkit and a CUDA
                        build of torch are present; ``1``: require them; ``0``: skip them.
* ``FASTKD_CUDA_ARCH``  CUDA architectures, e.g. ``"9.0"`` or ``"8.0;9.0"`` (default: the visible GPUs,
                        else ``8.0;9.0``); sets ``TORCH_CUDA_ARCH_LIST``.
* ``FASTKD_CPU_ARCH``   ``-march`` value for the CPU kernels (default ``native``: a source build is
                        tuned for the machine it runs on; use e.g. ``x86-64-v3`` for portable wheels).
* ``FASTKD_NO_EXT=1``   pure-Python install (the reference and Triton backends only).
* ``MAX_JOBS``          parallel compile jobs (default: one per 4 GiB of free memory, at most the cores).

Build without isolation so the extension is compiled against the torch you run:
``pip install --no-build-isolation .``
"""

from __future__ import annotations

import glob
import json
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "fastkd", "_build_info.json")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _default_max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    try:
        with open("/proc/meminfo") as f:
            free_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        jobs = max(1, min(os.cpu_count() or 1, free_kb // (4 * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        jobs = 1
    os.environ["MAX_JOBS"] = str(jobs)


def _extensions():
    if _env("FASTKD_NO_EXT", "0") == "1":
        print("fastkd: FASTKD_NO_EXT=1, building without fastkd._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "fastkd: torch is not importable in the build environment, building without fastkd._C "
            "(use `pip install --no-build-isolation .` with torch installed)",
            file=sys.stderr,
        )
        return [], {}

    _default_max_jobs()
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))

    mode = _env("FASTKD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTKD_CUDA must be auto, 0 or 1, got {mode!r}")
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not have_cuda:
        raise SystemExit(
            f"FASTKD_CUDA=1 but CUDA cannot be built: torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    with_cuda = have_cuda and mode != "0"

    march = _env("FASTKD_CPU_ARCH", "native")
    cxx = ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
    if march:
        cxx.append(f"-march={march}")
    # at::parallel_for uses the OpenMP backend in the official wheels.
    cxx.append("-fopenmp")
    macros: list = []
    if with_cuda:
        arch = _env("FASTKD_CUDA_ARCH", "")
        if arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        elif "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        macros.append(("FASTKD_WITH_CUDA", None))
        ext = CUDAExtension(
            "fastkd._C",
            cpp_sources + cu_sources,
            define_macros=macros,
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastkd._C",
            cpp_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )

    info = {
        "torch": torch.__version__,
        "cuda": bool(with_cuda),
        "cuda_arch": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
        "cpu_arch": march,
        "python": sys.version.split()[0],
    }
    os.makedirs(os.path.dirname(BUILD_INFO), exist_ok=True)
    with open(BUILD_INFO, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    print(
        f"fastkd: building fastkd._C ({'CPU + CUDA' if with_cuda else 'CPU only'}) for torch {torch.__version__}",
        file=sys.stderr,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    # The Triton kernels live in the top-level kernels/ folder (the design card's layout) and ship
    # as the subpackage fastkd.kernels.
    packages=find_packages(include=["fastkd", "fastkd.*"]) + ["fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
    package_data={"fastkd": ["_build_info.json", "py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
