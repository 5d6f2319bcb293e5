"""pytest setup of the benchmark suite (``pytest benchmarks --benchmark-only``).

* Collects ``benchmarks/bench_*.py`` (the project's ``python_files`` stays ``test_*.py`` and
  ``testpaths`` is ``tests``, so ``pytest`` / ``pytest tests`` never collect benchmarks).
* Pins torch to 2 threads on CPU (``FASTKD_BENCH_THREADS`` overrides) before any case runs.
* Adds the device, versions, thread count, size set and the measured device rates to the JSON's
  ``machine_info["fastkd_bench"]``, and the same device/version fields to every case's
  ``extra_info`` (a benchmark file's own ``extra_info.update`` wins).
* Prints the device, versions and the size set in the pytest header.

The helpers themselves (providers, memory probe, peak memory, timing) are in
``benchmarks/common.py``; its docstring says how peak memory is measured.
"""

from __future__ import annotations

import os

import pytest

# Benchmarks never run the Triton interpreter; it is only for tests (tests/conftest.py sets it).
# Leave a user's explicit setting alone: the fastkd-triton provider then skips with the reason.
os.environ.setdefault("FASTKD_NO_EXT_WARNING", "0")

from benchmarks import common

THREADS = common.setup_threads()


def pytest_collect_file(file_path, parent):
    # bench_*.py are benchmark modules; a file named on the command line is collected by pytest
    # itself whatever its name, so only add the ones found by walking a directory.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    info = common.session_info()
    busy = []
    if (
        info["load_avg"] is not None
        and info["device_type"] == "cpu"
        and info["load_avg"] > 0.5 * (info["cpu_count"] or 1)
    ):
        busy = [
            f"fastkd bench: WARNING: load average {info['load_avg']} on {info['cpu_count']} cores: other processes "
            "compete for the CPU and distort the timings; run on a quiet machine for results"
        ]
    return busy + [
        f"fastkd bench: device {info['device']} (results folder {info['device_slug']}), "
        f"size set {info['sizes']!r} ({common.ENV_SIZES}), threads {info['threads']}",
        f"fastkd bench: torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, fastkd {info['fastkd']}",
    ]


def pytest_benchmark_update_machine_info(config, machine_info):
    # The device rates (measured once per session; here at the latest, so that the report can give
    # every case with a floor its achieved fraction, whichever helper wrote the case).
    common.device_rates("float32")
    if common.IS_CUDA:
        common.device_rates("bfloat16")
    machine_info["fastkd_bench"] = {**common.session_info(), **common.MEASURED_RATES}


@pytest.fixture(autouse=True)
def _bench_defaults(request):
    """Every benchmark case starts with the device and version fields in its extra_info."""
    if "benchmark" in request.fixturenames:
        bm = request.getfixturevalue("benchmark")
        info = common.session_info()
        for key in ("device", "device_slug", "threads", "torch", "cuda", "triton", "fastkd"):
            bm.extra_info.setdefault(key, info[key])
    yield
