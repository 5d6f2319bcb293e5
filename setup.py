"""Build of fastkd and its compiled library ``fastkd._C``.

Switches (environment variables):

* ``FASTKD_CUDA``       ``auto`` (default): build the CUDA kernels when a CUDA toolkit and a CUDA
                        build of torch are present; ``1``: require them; ``0``: skip them.
* ``FASTKD_CUDA_ARCH``  CUDA architectures, e.g. ``"9.0"`` or ``"8.0;9.0"`` (default: the visible GPUs,
                        else ``8.0;9.0``); sets ``TORCH_CUDA_ARCH_LIST``.
* ``FASTKD_CPU_ARCH``   ``-march`` of the baseline the whole library is compiled for (default: none,
                        the compiler's portable x86-64 baseline). The CPU kernels are compiled once per
                        instruction-set level on top of it (see FASTKD_CPU_LEVELS) and the level is
                        chosen at run time from the CPU, so the default build runs at full width on any
                        x86-64 host. ``native`` (the default before run-time dispatch) still works but
                        makes a library that may die with an illegal instruction on another host.
* ``FASTKD_CPU_LEVELS`` the instruction-set levels to compile the CPU kernels for, a comma list of
                        ``default``, ``avx2`` (AVX2 + FMA + F16C), ``avx512`` (F, BW, DQ, VL); default
                        all three on x86-64, ``default`` elsewhere. ``default`` is always built.
                        At run time ``FASTKD_CPU_CAPABILITY=default|avx2|avx512`` forces a lower level
                        than the best the CPU supports; ``python -m fastkd.info`` names the level in use.
* ``FASTKD_NO_EXT=1``   pure-Python install (the reference and Triton backends only).
* ``MAX_JOBS``          parallel compile jobs (default: one per 4 GiB of free memory, at most the cores).

How a C++ file joins the multi-level build (details in csrc/cpu_dispatch.h): put the line
``// fastkd:cpu-dispatch`` in its first 40 lines, its code in ``namespace fastkd::CPU_CAPABILITY``,
``FASTKD_CPU_KERNEL(entry)`` after it and the op registration under ``#ifdef FASTKD_CPU_BASE`` with
``FASTKD_CPU_DISPATCH(entry)``. Such files are compiled once per level (the -m flags below), all of a
level's files as one translation unit (build/fastkd_cpu_units/, generated), and linked after the
baseline objects; every other csrc/*.cpp is compiled once.

Build without isolation so the extension is compiled against the torch you run:
``pip install --no-build-isolation .``
"""

from __future__ import annotations

import glob
import json
import os
import platform
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


DISPATCH_MARKER = "// fastkd:cpu-dispatch"
# Compiler flags and macros of each instruction-set level (the run-time check in
# csrc/cpu_dispatch.cpp asks the CPU for exactly these extensions).
CPU_LEVELS = {
    "default": {
        "flags": [],
        "macros": [("CPU_CAPABILITY", "DEFAULT"), ("CPU_CAPABILITY_DEFAULT", None), ("FASTKD_CPU_BASE", None)],
    },
    "avx2": {
        "flags": ["-mavx2", "-mfma", "-mf16c"],
        "macros": [("CPU_CAPABILITY", "AVX2"), ("CPU_CAPABILITY_AVX2", None)],
    },
    "avx512": {
        "flags": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
        "macros": [("CPU_CAPABILITY", "AVX512"), ("CPU_CAPABILITY_AVX512", None)],
    },
}


def _is_dispatched(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        return any(line.strip() == DISPATCH_MARKER for _, line in zip(range(40), f))


def _cpu_levels() -> list:
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    raw = _env("FASTKD_CPU_LEVELS", "default,avx2,avx512" if x86 else "default")
    levels = [x.strip().lower() for x in raw.split(",") if x.strip()]
    bad = [x for x in levels if x not in CPU_LEVELS]
    if bad:
        raise SystemExit(f"FASTKD_CPU_LEVELS: unknown level(s) {bad}; use a comma list of {list(CPU_LEVELS)}")
    if not x86 and levels != ["default"]:
        raise SystemExit(f"FASTKD_CPU_LEVELS={raw}: avx2/avx512 need an x86-64 host, this is {platform.machine()}")
    return [lv for lv in CPU_LEVELS if lv in levels or lv == "default"]


def _unity_source(level: str, sources: list) -> str:
    """One generated translation unit per level that includes every dispatched file: the torch
    headers, most of a file's compile time, are parsed once per level instead of once per file and
    level. (Each dispatched file keeps its code in a namespace of its own for this.) Rewritten only
    when its text changes, so an unchanged build stays up to date."""
    path = os.path.join("build", "fastkd_cpu_units", f"fastkd_cpu_{level}.cpp")
    text = f"// Generated by setup.py: the CPU kernels at level {level}, as one translation unit.\n" + "".join(
        f'#include "{os.path.abspath(src)}"\n' for src in sources
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, encoding="utf-8") as f:
            same = f.read() == text
    except OSError:
        same = False
    if not same:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def _build_ext_class(base):
    """``base`` (torch's BuildExtension) that also compiles the dispatched sources once per level."""
    try:
        from setuptools.modified import newer_group
    except ImportError:  # setuptools < 69
        from setuptools.dep_util import newer_group

    class BuildExt(base):
        def build_extension(self, ext):
            levels = getattr(ext, "fastkd_levels", None)
            if levels:
                ext_path = self.get_ext_fullpath(ext.name)
                deps = list(ext.sources) + list(ext.depends)
                if self.force or newer_group(deps, ext_path, "newer"):
                    cflags = ext.extra_compile_args
                    cxx = list(cflags["cxx"] if isinstance(cflags, dict) else cflags)
                    objects = []
                    for level, sources in levels:
                        spec = CPU_LEVELS[level]
                        out = os.path.join(self.build_temp, f"cpu_{level}")
                        post = {"cxx": cxx + spec["flags"]} if isinstance(cflags, dict) else cxx + spec["flags"]
                        if isinstance(cflags, dict) and "nvcc" in cflags:
                            post["nvcc"] = cflags["nvcc"]
                        objects += self.compiler.compile(
                            [_unity_source(level, sources)],
                            output_dir=out,
                            macros=list(ext.define_macros) + spec["macros"],
                            include_dirs=list(ext.include_dirs) + [os.path.join(ROOT, "csrc")],
                            debug=self.debug,
                            extra_postargs=post,
                            depends=ext.depends,
                        )
                    # Linked after the baseline objects: the linker keeps the first copy of an inline
                    # function emitted in several objects, so shared helpers are the baseline's.
                    ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return BuildExt


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
    all_cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    dispatched = [p for p in all_cpp if _is_dispatched(p)]
    cpp_sources = [p for p in all_cpp if p not in dispatched]
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    depends = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh"))) + dispatched
    levels = _cpu_levels()

    mode = _env("FASTKD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTKD_CUDA must be auto, 0 or 1, got {mode!r}")
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not have_cuda:
        raise SystemExit(
            f"FASTKD_CUDA=1 but CUDA cannot be built: torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    with_cuda = have_cuda and mode != "0"

    march = _env("FASTKD_CPU_ARCH", "")
    cxx = ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
    if march:
        cxx.append(f"-march={march}")
    # at::parallel_for uses the OpenMP backend in the official wheels.
    cxx.append("-fopenmp")
    macros: list = [(f"FASTKD_BUILT_{lv.upper()}", None) for lv in levels]
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
            # libstdc++ first among the libraries (torch's CUDAExtension appends c10, torch, cudart,
            # c10_cuda, torch_cuda after these), so that the dynamic linker finds the C++ runtime's
            # symbols there before any CUDA library that carries its own copy. On the H200 image of
            # 2026-12-04 every C++ exception thrown in a CUDA build crashed the process unless
            # libstdc++ was preloaded (benchmarks/results/nvidia-h200/NOTES.md): this is the
            # link-time form of that preload, not yet verified on a GPU.
            libraries=["stdc++"],
            extra_link_args=["-fopenmp"],
            depends=depends,
        )
    else:
        ext = CppExtension(
            "fastkd._C",
            cpp_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            depends=depends,
        )
    ext.fastkd_levels = [(lv, dispatched) for lv in levels] if dispatched else []

    info = {
        "torch": torch.__version__,
        "cuda": bool(with_cuda),
        "cuda_arch": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
        "cpu_arch": march,
        "cpu_levels": levels,
        "python": sys.version.split()[0],
    }
    os.makedirs(os.path.dirname(BUILD_INFO), exist_ok=True)
    with open(BUILD_INFO, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    print(
        f"fastkd: building fastkd._C ({'CPU + CUDA' if with_cuda else 'CPU only'}) for torch {torch.__version__}",
        file=sys.stderr,
    )
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


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
