"""Shared machinery of fastkd's benchmark suite (used by ``benchmarks/conftest.py`` and every
``benchmarks/bench_<op>.py``).

What a benchmark file uses:

* :data:`DEVICE` / :func:`device_label` — where the suite runs (CUDA when visible, else CPU; the
  ``FASTKD_BENCH_DEVICE`` environment variable overrides) and a human name for it.
* :func:`size_set` — ``quick`` (smoke run), ``default`` or ``full`` from ``FASTKD_BENCH_SIZES``;
  :func:`case_param` turns a shape into a pytest param that skips, with the reason, where it does
  not belong (GPU-only case on CPU, size set not selected); :func:`case_params` does it for a table
  of case tuples that end with (devices, size sets).
* :func:`provider_params` — the providers of an op as pytest params: ``eager``, ``compile``,
  ``fastkd-<backend>`` for each backend that can run here, ``liger`` where the op has one and
  Liger-Kernel is installed and a GPU is used; the rest are skipped with the reason.
  :func:`provider_fn` gives the function a provider times.
* :class:`InputCache` and :func:`randn` — the random inputs of a case (the same numbers for every
  dtype), kept for the providers and modes of that case only.
* :func:`require_fit` — the memory probe: skip a case that would not fit, with the numbers.
* :func:`run_case` — warms up, measures the peak memory of one call, calibrates the rounds and
  times the case with ``benchmark.pedantic``, and fills ``benchmark.extra_info`` with the fields
  the report reads (listed in benchmarks/README.md, "Writing bench_<op>.py").

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
what was allocated before the call. CPU: the process's resident-set high-water mark. Before the
call we run the garbage collector and ``malloc_trim(0)`` (so that freed heap memory is given back
to the kernel and any reuse of it shows up as new resident pages), read ``VmRSS``, reset the
high-water mark by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), run the call once,
and read ``VmHWM``. ``VmHWM - VmRSS`` is the peak of memory the call touched above what was
resident before it: every tensor the call allocates and writes is counted at page granularity,
whether PyTorch, Inductor's generated code or fastkd's C++ allocated it; memory freed and reused
inside the call is not double counted. This is faithful because the warm-up call (outside the
measure) has already paid one-time costs (library loading, compilation, oneDNN kernel caches).
Where ``clear_refs`` cannot be written the peak is reported as missing (None), never estimated.
``peak_mem_bytes`` is that peak above what was allocated before the call (the inputs, and in
``backward`` mode what the forward saved); ``input_bytes`` is the inputs' size.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest
import torch

# --------------------------------------------------------------------------------------------
# Where we run, and with what.
# --------------------------------------------------------------------------------------------
PROVIDERS: tuple[str, ...] = ("eager", "compile", "fastkd-cuda", "fastkd-triton", "fastkd-cpu", "liger")
MODES: tuple[str, ...] = ("forward", "backward", "full")
SIZE_SETS: tuple[str, ...] = ("quick", "default", "full")
# For case_param: the devices a case runs on and the size sets it belongs to.
CPU, GPU, ANY = ("cpu",), ("cuda",), ("cpu", "cuda")
QUICK, DEFAULT_FULL, FULL = ("quick",), ("default", "full"), ("full",)
f32, bf16 = torch.float32, torch.bfloat16

ENV_DEVICE = "FASTKD_BENCH_DEVICE"  # "cpu" or "cuda"; default: cuda when visible
ENV_THREADS = "FASTKD_BENCH_THREADS"  # torch threads on CPU; default 2 (the issues' CPU targets)
ENV_SIZES = "FASTKD_BENCH_SIZES"  # quick | default | full
ENV_PROVIDERS = "FASTKD_BENCH_PROVIDERS"  # comma list to restrict providers, e.g. "eager,fastkd-cpu"
ENV_TIME = "FASTKD_BENCH_TIME"  # seconds of timed rounds per case (default 1.0 on CPU, 0.5 on GPU)
ENV_MIN_ROUNDS = "FASTKD_BENCH_MIN_ROUNDS"  # default 3 on CPU, 10 on GPU
# Cases faster than this (ms per call) are also timed against the eager baseline interleaved (see
# paired_ratio); 0 turns the paired timing off.
ENV_PAIR_BELOW_MS = "FASTKD_BENCH_PAIR_BELOW_MS"  # default 2.0
DEFAULT_CPU_THREADS = 2


def _pick_device() -> torch.device:
    name = os.environ.get(ENV_DEVICE, "").strip().lower()
    if name:
        if name not in ("cpu", "cuda"):
            raise ValueError(f"{ENV_DEVICE} must be 'cpu' or 'cuda', got {name!r}")
        if name == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{ENV_DEVICE}=cuda but torch sees no CUDA device")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE: torch.device = _pick_device()
IS_CUDA: bool = DEVICE.type == "cuda"


def setup_threads() -> int:
    """Pin torch's intra-op threads on CPU (default 2, ``FASTKD_BENCH_THREADS`` overrides)."""
    env = os.environ.get(ENV_THREADS, "").strip()
    if env:
        torch.set_num_threads(int(env))
    elif not IS_CUDA:
        torch.set_num_threads(DEFAULT_CPU_THREADS)
    return torch.get_num_threads()


def size_set() -> str:
    s = os.environ.get(ENV_SIZES, "default").strip().lower() or "default"
    if s not in SIZE_SETS:
        raise ValueError(f"{ENV_SIZES} must be one of {SIZE_SETS}, got {s!r}")
    return s


def _cpuinfo_field(key: str) -> str | None:
    """The first ``key : value`` line's value in /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _short_cpu_name(name: str) -> str:
    name = re.sub(r"\((R|TM|tm|r)\)", "", name)
    name = re.sub(r"\bCPU\b|@.*$", "", name)
    return re.sub(r"\s+", " ", name).strip()


@functools.cache
def device_label() -> str:
    """Human name of the benchmark device, e.g. ``NVIDIA H100 80GB HBM3`` or
    ``CPU Intel Xeon Processor, 2 threads``."""
    if IS_CUDA:
        return torch.cuda.get_device_name(DEVICE)
    return f"CPU {_short_cpu_name(cpu_model())}, {torch.get_num_threads()} threads"


def slugify(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


@functools.cache
def cpu_host_isa() -> str:
    """The widest vector level this CPU offers (``avx512``, ``avx2``, ``default``), from /proc/cpuinfo's
    flags, whatever level a run is forced to: it is part of the results folder's name, because one
    model name covers CPUs of different widths (an "AMD EPYC" VM is a Zen 3 with AVX2 on one host and a
    Zen 5 with AVX-512 on another)."""
    flags_line = _cpuinfo_field("flags")
    if flags_line is None:
        return "unknown"
    flags = set(flags_line.split())
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


def device_slug() -> str:
    """Folder name under ``benchmarks/results/``: ``nvidia-h100-80gb-hbm3``, ``cpu-intel-xeon-processor-f6-avx512-2t``
    (CPU model, CPU family, the CPU's widest vector level, torch threads). A VM's model name is often
    generic ("AMD EPYC"): family and width tell apart Zen 3 (f25, avx2), Zen 4 (f25, avx512) and Zen 5
    (f26, avx512), whose speeds differ too much to share a folder."""
    if IS_CUDA:
        return slugify(device_label())
    family = _cpuinfo_field("cpu family")
    fam = f"f{family}-" if family and family.isdigit() else ""
    return f"cpu-{slugify(_short_cpu_name(cpu_model()))}-{fam}{cpu_host_isa()}-{torch.get_num_threads()}t"


@functools.cache
def versions() -> dict[str, str]:
    import fastkd

    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    cuda = torch.version.cuda or "none"
    return {"torch": torch.__version__, "cuda": cuda, "triton": triton_v, "fastkd": fastkd.__version__}


@functools.cache
def load_at_start() -> float | None:
    """The 1-minute load average when the session started: above the core count, other processes
    compete for the cores and CPU timings (OpenMP threads especially) are distorted."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@functools.cache
def cpu_isa() -> str:
    """The instruction-set level fastkd's C++ CPU kernels run at (``default``, ``avx2``, ``avx512``;
    ``""`` without ``fastkd._C``), recorded in every row: a run forced to a lower level with
    ``FASTKD_CPU_CAPABILITY`` is told apart from one at the CPU's best."""
    from fastkd import _ext

    try:
        return _ext.cpu_capability()
    except ValueError:
        return ""


def session_info() -> dict:
    """What the JSON's ``machine_info['fastkd_bench']`` holds (and each case's defaults)."""
    return {
        "load_avg": load_at_start(),
        "cpu_count": os.cpu_count(),
        "device": device_label(),
        "device_slug": device_slug(),
        "device_type": DEVICE.type,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa(),
        "sizes": size_set(),
        **versions(),
    }


# --------------------------------------------------------------------------------------------
# Parametrisation helpers.
# --------------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def case_param(value, *, id: str, devices: Iterable[str] = ("cpu", "cuda"), sizes: Iterable[str] = SIZE_SETS):
    """A pytest param for one case, skipped with the reason when it does not run here.

    ``devices``: device types the case is meant for; ``sizes``: size sets it belongs to.
    """
    devices, sizes = tuple(devices), tuple(sizes)
    marks = []
    if DEVICE.type not in devices:
        if devices == ("cuda",):
            reason = "GPU case: needs a CUDA device"
        else:
            reason = f"{'/'.join(devices)} case, this run is on {DEVICE.type} ({ENV_DEVICE}={devices[0]} runs it)"
        marks.append(pytest.mark.skip(reason=reason))
    elif size_set() not in sizes:
        marks.append(
            pytest.mark.skip(
                reason=f"not in the {size_set()!r} size set on {DEVICE.type} ({ENV_SIZES}={'|'.join(sizes)} runs it)"
            )
        )
    return pytest.param(value, id=id, marks=marks)


def case_params(cases: Iterable[tuple], case_id: Callable[[tuple], str]) -> list:
    """:func:`case_param` for each case tuple of a table; a tuple's last two fields are its devices
    and size sets, ``case_id(case)`` its pytest id."""
    return [case_param(c, id=case_id(c), devices=c[-2], sizes=c[-1]) for c in cases]


def _provider_filter() -> set[str] | None:
    env = os.environ.get(ENV_PROVIDERS, "").strip()
    if not env:
        return None
    wanted = {p.strip() for p in env.split(",") if p.strip()}
    unknown = wanted - set(PROVIDERS)
    if unknown:
        raise ValueError(f"{ENV_PROVIDERS}: unknown provider(s) {sorted(unknown)}; known: {PROVIDERS}")
    return wanted


def fastkd_backend_status(backend: str, ops: Sequence = ()) -> tuple[bool, str]:
    """Whether fastkd's ``backend`` can be timed here for all of ``ops`` (``fastkd.backends.Op``)."""
    from fastkd.backends import backend_status, backend_supports_device, triton_interpret

    if backend == "triton" and triton_interpret():
        return False, "TRITON_INTERPRET=1 is set: the Triton interpreter is exact but slow, not a timing provider"
    if backend == "cuda" and not IS_CUDA:
        return False, "needs a CUDA device (GPU provider)"
    if backend == "triton" and not IS_CUDA:
        return False, "the Triton interpreter on CPU is exact but slow: not a timing provider (GPU only)"
    for op in ops:
        ok, reason = op.usable(backend, DEVICE)
        if not ok:
            return False, reason
    if not ops:
        ok, reason = backend_status(backend)
        if ok:
            ok, reason = backend_supports_device(backend, DEVICE)
        if not ok:
            return False, reason
    return True, ""


@functools.cache
def liger_status() -> tuple[bool, str]:
    if not IS_CUDA:
        return False, "Liger-Kernel runs on GPU only (Triton kernels)"
    try:
        import liger_kernel  # noqa: F401
    except Exception as e:
        return False, f"liger_kernel is not installed ({e.__class__.__name__})"
    return True, ""


def provider_params(ops: Sequence = (), *, compile: bool = True, liger: bool = False, eager: bool = True) -> list:
    """pytest params for the providers of an op; those that cannot run here skip with the reason.

    ``ops``: the ``fastkd.backends.Op`` registries the fastkd providers need (each backend must be
    usable for all of them); ``liger``: whether the op has a Liger-Kernel counterpart.
    """
    wanted = _provider_filter()
    params = []

    def add(name: str, ok: bool, reason: str) -> None:
        marks = []
        if wanted is not None and name not in wanted:
            ok, reason = False, f"not selected by {ENV_PROVIDERS}"
        if not ok:
            marks.append(pytest.mark.skip(reason=f"provider {name}: {reason}"))
        params.append(pytest.param(name, id=name, marks=marks))

    if eager:
        add("eager", True, "")
    if compile:
        add("compile", True, "")
    for backend in ("cuda", "triton", "cpu"):
        if ops and not any(backend in op.impls for op in ops):
            continue
        if backend == "cpu" and IS_CUDA:
            continue  # the CPU kernels are not timed against GPU providers
        ok, reason = fastkd_backend_status(backend, ops)
        add(f"fastkd-{backend}", ok, reason)
    if liger:
        ok, reason = liger_status()
        add("liger", ok, reason)
    return params


def backend_of(provider: str) -> str | None:
    """``fastkd-cpu`` -> ``cpu``; None for non-fastkd providers."""
    return provider.removeprefix("fastkd-") if provider.startswith("fastkd-") else None


def provider_fn(
    provider: str,
    *,
    eager: Callable,
    key: tuple,
    fastkd: Callable[[str], Callable],
    liger: Callable[[], Callable] | None = None,
) -> Callable:
    """The function ``provider`` times: ``eager`` itself, ``compiled(eager, key)``, ``liger()``, or
    ``fastkd(backend)`` for a ``fastkd-<backend>`` provider."""
    if provider == "eager":
        return eager
    if provider == "compile":
        return compiled(eager, key)
    if provider == "liger" and liger is not None:
        return liger()
    backend = backend_of(provider)
    assert backend is not None, provider
    return fastkd(backend)


# --------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------
def seeded_generator(seed: int = 0) -> torch.Generator:
    """A random generator on :data:`DEVICE`, seeded."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, generator: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Normal numbers drawn in float32 on :data:`DEVICE` (the same for every dtype), times ``scale``,
    cast to ``dtype``."""
    x = torch.randn(*shape, generator=generator, device=DEVICE, dtype=torch.float32)
    return (x if scale == 1 else scale * x).to(dtype)


class InputCache:
    """The inputs of one case, reused by its providers and modes (creating 2 x 1 GiB of random
    logits costs seconds on CPU); only the last case's inputs are kept."""

    def __init__(self) -> None:
        self._held: dict = {}

    def holds(self, key) -> bool:
        """Whether ``key``'s inputs are held; if not, the previous case's are freed (call it before
        the memory probe, so they do not count against this case)."""
        if key in self._held:
            return True
        self._held.clear()
        return False

    def get(self, key, make: Callable[[torch.Generator], tuple]) -> tuple:
        """``key``'s inputs; when not held, ``make(seeded_generator())`` creates them (seed 0)."""
        if not self.holds(key):
            self._held[key] = make(seeded_generator())
        return self._held[key]


# --------------------------------------------------------------------------------------------
# torch.compile, warmed up outside the timing.
# --------------------------------------------------------------------------------------------
_COMPILED: dict = {}


def _raise_recompile_limit() -> None:
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 256:
            setattr(cfg, name, 256)
    if hasattr(cfg, "accumulated_recompile_limit") and cfg.accumulated_recompile_limit < 4096:
        cfg.accumulated_recompile_limit = 4096


def compiled(fn: Callable, key: tuple) -> Callable:
    """``torch.compile(fn, dynamic=False, fullgraph=True)``, one compiled wrapper per ``key``
    (e.g. shape and dtype), so that every mode of a case reuses the same compiled graph. A graph
    break raises instead of silently timing partly-eager code."""
    k = (fn, *key)
    if k not in _COMPILED:
        _raise_recompile_limit()
        _COMPILED[k] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[k]


# --------------------------------------------------------------------------------------------
# Memory: probe (skip what would not fit) and peak measure.
# --------------------------------------------------------------------------------------------
GiB = 1024**3


def _cgroup_free() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="utf-8") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="utf-8") as f:
            used = int(f.read().strip())
        return int(limit) - used
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device = DEVICE) -> int:
    """Memory a case can still take: CUDA free + cached-but-unused; CPU MemAvailable (and the cgroup)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    avail = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    cg = _cgroup_free()
    vals = [v for v in (avail, cg) if v is not None]
    return min(vals) if vals else 1 << 62


MEM_FRACTION = 0.8  # leave headroom: other processes, allocator slack, the estimate's error


def require_fit(need_bytes: int, what: str = "this case") -> None:
    """Skip (with the numbers) when ``need_bytes`` would not fit in the device's free memory."""
    avail = available_bytes()
    if need_bytes > MEM_FRACTION * avail:
        pytest.skip(
            f"memory probe: {what} needs about {need_bytes / GiB:.1f} GiB on {DEVICE.type}, "
            f"{avail / GiB:.1f} GiB available (x{MEM_FRACTION} headroom)"
        )


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemResult:
    extra_bytes: int | None  # peak above what was allocated/resident before the call
    method: str
    seconds: float  # how long the measured call took (used to calibrate the rounds)


def measure_peak(setup: Callable[[], tuple] | None, target: Callable, teardown: Callable | None = None) -> MemResult:
    """Run ``target(*setup())`` once and measure its peak extra memory (see the module docstring)."""
    args = setup()[0] if setup is not None else ()
    if IS_CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        target(*args)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        extra = torch.cuda.max_memory_allocated() - base
        method = "cuda max_memory_allocated"
    else:
        gc.collect()
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        base = _proc_status_bytes("VmRSS:")
        ok = base is not None and _reset_hwm()
        t0 = time.perf_counter()
        target(*args)
        dt = time.perf_counter() - t0
        hwm = _proc_status_bytes("VmHWM:") if ok else None
        if ok and hwm is not None:
            extra, method = max(hwm - base, 0), "cpu VmHWM-VmRSS (clear_refs reset, malloc_trim)"
        else:
            extra, method = None, "unavailable (/proc/self/clear_refs not writable)"
    if teardown is not None:
        teardown(*args)
    return MemResult(extra, method, dt)


# --------------------------------------------------------------------------------------------
# Device rates: copy bandwidth and matmul rate, measured once per session.
# --------------------------------------------------------------------------------------------
def _sync() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


def _best_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    _sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = 1 * GiB if IS_CUDA else 256 * 1024**2
    nbytes = int(min(nbytes, available_bytes() / 4))
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    y = torch.empty_like(x)
    t = _best_time(lambda: y.copy_(x), reps=20 if IS_CUDA else 5)  # x, y are freed on return
    return 2 * nbytes / t / 1e9


@functools.cache
def matmul_tflops(dtype_str: str) -> float:
    """Measured dense matmul rate in TFLOP/s for ``dtype_str`` (e.g. ``bfloat16``) on the device."""
    dtype = getattr(torch, dtype_str)
    n = 8192 if IS_CUDA else (2048 if dtype in (torch.float32, torch.float64) else 1024)
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    t = _best_time(lambda: a @ b, reps=10 if IS_CUDA else 3)
    return 2 * n**3 / t / 1e12


MEASURED_RATES: dict = {}  # what device_rates measured this session (for the JSON's machine_info)


def device_rates(dtype: torch.dtype | str) -> dict[str, float]:
    """``{"copy_gbps": ..., "matmul_tflops": ...}`` (matmul in ``dtype``), measured once per session."""
    d = dtype if isinstance(dtype, str) else dtype_name(dtype)
    # "bfloat16-autocast" and the like: the matmul rate of the dtype named in the label
    d = next((k for k in ("bfloat16", "float16", "float64") if k in d), "float32")
    rates = {"copy_gbps": round(copy_bandwidth_gbps(), 2), "matmul_tflops": round(matmul_tflops(d), 4)}
    MEASURED_RATES["copy_gbps"] = rates["copy_gbps"]
    MEASURED_RATES.setdefault("matmul_tflops", {})[d] = rates["matmul_tflops"]
    return rates


# --------------------------------------------------------------------------------------------
# Timing one case.
# --------------------------------------------------------------------------------------------
def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_case(
    benchmark,
    *,
    op: str,
    provider: str,
    mode: str,
    shape: str,
    dtype: str | torch.dtype,
    fwd: Callable[[], torch.Tensor | None],
    leaves: Sequence[torch.Tensor] = (),
    input_bytes: int | None = None,
    floor_bytes: int | None = None,
    floor_flops: int | None = None,
    variant: str | None = None,
    extra: dict | None = None,
    baseline: Callable[[], torch.Tensor | None] | None = None,
) -> None:
    """Time one (op, provider, mode, shape, dtype) case and record it for the report.

    ``fwd()`` runs the forward pass (inputs captured by the closure) and returns what backward
    starts from (a scalar, or any tensor: backward then uses ones). ``mode``:

    * ``forward``  — time ``fwd()`` (for ops that are not differentiated, the whole op);
    * ``backward`` — ``fwd()`` in an untimed setup, time the backward alone;
    * ``full``     — time ``fwd()`` then backward.

    ``leaves``: tensors whose ``.grad`` is cleared before each run, so gradients are written, not
    accumulated. On GPU every timed call ends with ``torch.cuda.synchronize()``.

    ``baseline``: the eager provider's ``fwd`` on the same inputs. When given (forward and full modes,
    fastkd providers) and one call takes under ``FASTKD_BENCH_PAIR_BELOW_MS``, the case is also timed interleaved with
    it (:func:`paired_ratio`) and ``extra_info["paired_vs_eager"]`` records eager time / this
    provider's time, which the report prefers to the ratio of two separate medians.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dtype_s = dtype if isinstance(dtype, str) else dtype_name(dtype)
    benchmark.group = f"{op}{'[' + variant + ']' if variant else ''} {shape} {dtype_s}"
    info = {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "dtype": dtype_s,
        "device": device_label(),
        "device_slug": device_slug(),
        "floor_bytes": floor_bytes,
        "floor_flops": floor_flops,
        "input_bytes": input_bytes,
        "threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa(),
        **versions(),
    }
    if variant:
        info["variant"] = variant
    info.update(extra or {})
    benchmark.extra_info.update(info)

    def clear() -> None:
        for x in leaves:
            x.grad = None

    def backward_of(out) -> None:
        if out is None:
            return
        if out.numel() == 1:
            out.backward()
        else:
            out.backward(torch.ones_like(out))

    setup = None
    if mode == "forward":

        def target() -> None:
            clear()
            fwd()
            _sync()

    elif mode == "full":

        def target() -> None:
            clear()
            backward_of(fwd())
            _sync()

    else:

        def setup():
            clear()
            out = fwd()
            _sync()
            return (out,), {}

        def target(out) -> None:
            backward_of(out)
            _sync()

    try:
        # Warm-up (compilation, autotuning, first-touch of the allocator), then one measured call
        # that also gives the peak memory and the time per call for calibration.
        if setup is not None:
            target(*setup()[0])
        else:
            target()
        clear()  # the warm-up's gradients must not count as memory held before the measured call
        mem = measure_peak(setup, target, teardown=lambda *a: clear())
    except Exception as e:
        if _is_oom(e):
            clear()
            if IS_CUDA:
                torch.cuda.empty_cache()
            pytest.skip(f"out of memory on {DEVICE.type} during warm-up: {str(e).splitlines()[0][:200]}")
        raise
    benchmark.extra_info["peak_mem_bytes"] = mem.extra_bytes  # above the inputs
    benchmark.extra_info["mem_method"] = mem.method
    benchmark.extra_info.update(device_rates(dtype_s))  # measured once per session

    budget = _env_float(ENV_TIME, 0.5 if IS_CUDA else 1.0)
    min_rounds = int(_env_float(ENV_MIN_ROUNDS, 10 if IS_CUDA else 3))
    t = max(mem.seconds, 1e-7)
    iterations = 1 if setup is not None else max(1, math.ceil(50e-6 / t))  # rounds of >= 50 us
    per_round = t * iterations
    if setup is not None:
        # backward mode: every round runs the (untimed) forward first; count it in the budget, or a
        # fast backward behind a slow forward asks for 1000 forwards (minutes on a 2-core CPU)
        t0 = time.perf_counter()
        args, kwargs = setup()
        per_round += time.perf_counter() - t0
        clear()
        del args, kwargs
    rounds = int(min(max(min_rounds, budget / per_round), 1000))
    benchmark.pedantic(
        target,
        setup=setup,
        teardown=lambda *a: clear(),
        rounds=rounds,
        iterations=iterations,
        warmup_rounds=0,
    )
    clear()
    below = _env_float(ENV_PAIR_BELOW_MS, 2.0) * 1e-3
    # fastkd's rows only: the report shows the ratio in the "fastkd vs eager" column
    if baseline is not None and provider.startswith("fastkd-") and setup is None and t < below:

        def base_target() -> None:
            clear()
            if mode == "full":
                backward_of(baseline())
            else:
                baseline()
            _sync()

        base_target()  # warm-up
        ratio, lo, hi, n = paired_ratio(target, base_target, budget_s=2 * budget)
        clear()
        benchmark.extra_info.update(paired_vs_eager=ratio, paired_p20=lo, paired_p80=hi, paired_blocks=n)


def paired_ratio(
    target: Callable[[], None],
    baseline: Callable[[], None],
    *,
    budget_s: float = 2.0,
    block_s: float = 0.01,
    max_blocks: int = 400,
) -> tuple[float, float, float, int]:
    """Time ``baseline`` against ``target`` interleaved: blocks of k calls of each in turn (the one
    that goes first alternates), k chosen so a block lasts about ``block_s``, as many blocks as fit
    ``budget_s`` (at least 20). Returns the median, 20th and 80th percentile over blocks of
    baseline time / target time, and the number of blocks. pytest-benchmark times all rounds of
    one provider and then the next; on a machine whose speed drifts (a VM, frequency scaling) the
    drift between the two runs can exceed the difference measured at ~100 us a call, while within
    one block pair both sides see the same machine."""
    t0 = time.perf_counter()
    target()
    baseline()
    per_pair = max(time.perf_counter() - t0, 1e-7)
    k = max(1, round(block_s / (per_pair / 2)))
    blocks = int(min(max(20, budget_s / (per_pair * k)), max_blocks))
    ratios = []
    for b in range(blocks):
        order = (target, baseline) if b % 2 == 0 else (baseline, target)
        took = []
        for fn in order:
            t1 = time.perf_counter()
            for _ in range(k):
                fn()
            took.append(time.perf_counter() - t1)
        tt, tb = (took[0], took[1]) if b % 2 == 0 else (took[1], took[0])
        ratios.append(tb / tt)
    p20, _, _, p80 = statistics.quantiles(ratios, n=5, method="inclusive")
    return statistics.median(ratios), p20, p80, blocks
