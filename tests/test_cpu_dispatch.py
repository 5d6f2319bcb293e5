"""Run-time instruction-set dispatch of the C++ CPU kernels (csrc/cpu_dispatch.h).

Every CPU kernel is compiled for the levels ``default``, ``avx2`` and ``avx512`` and picked at load
time from the CPU; ``FASTKD_CPU_CAPABILITY`` forces a lower level. These tests run each fused op at
every level this host supports against the float64 reference (levels the host lacks are skipped
with the reason), check the environment variable and its errors in a fresh process, and check the
library's disassembly: code outside the avx2 / avx512 copies must not use their instructions, or a
library built on one host would die with an illegal instruction on an older one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastkd import _ext

LEVELS = ["default", "avx2", "avx512"]

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastkd._C unavailable: {_ext.unavailable_reason()}")


def _lib():
    return _ext.library()


def _level_params():
    params = []
    if not _ext.available():
        return [pytest.param(lv, id=lv) for lv in LEVELS]
    lib = _lib()
    if not hasattr(lib, "cpu_built_capabilities"):
        reason = "fastkd._C predates run-time dispatch: rebuild it"
        return [pytest.param(lv, marks=pytest.mark.skip(reason=reason), id=lv) for lv in LEVELS]
    built = lib.cpu_built_capabilities()
    best = lib.cpu_best_capability()
    for lv in LEVELS:
        marks = []
        if lv not in built:
            marks = [pytest.mark.skip(reason=f"level {lv} not compiled into fastkd._C (built: {built})")]
        elif LEVELS.index(lv) > LEVELS.index(best):
            marks = [pytest.mark.skip(reason=f"this CPU supports up to {best}, not {lv}")]
        params.append(pytest.param(lv, marks=marks, id=lv))
    return params


@pytest.fixture(params=_level_params())
def level(request):
    lib = _lib()
    old = lib.set_cpu_capability(request.param)
    try:
        assert lib.cpu_capability() == request.param
        yield request.param
    finally:
        lib.set_cpu_capability(old)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_distill_loss_every_level(level, divergence, dtype):
    import fastkd

    # V = 1000 + 37: full vectors, a partial block and a scalar tail at every width.
    g = torch.Generator().manual_seed(3)
    s = (2 * torch.randn(7, 1037, generator=g)).to(dtype)
    t = (2 * torch.randn(7, 1037, generator=g)).to(dtype)
    s[2, ::5] = float("-inf")
    t[2, ::5] = float("-inf")
    kw = {"temperature": 1.7, "divergence": divergence, "beta": 0.3}
    s1, t1 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = fastkd.distill_loss(s1, t1, backend="cpu", **kw)
    loss.backward()
    s64, t64 = s.double().requires_grad_(True), t.double().requires_grad_(True)
    ref = fastkd.reference_distill_loss(s64, t64, **kw)
    ref.backward()
    tol = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
    assert abs(loss.item() - ref.item()) <= (1e-10 if dtype == torch.float64 else 2e-6) * abs(ref.item())
    assert _rel(s1.grad, s64.grad) <= tol
    assert _rel(t1.grad, t64.grad) <= tol


def test_hidden_match_every_level(level):
    import fastkd

    g = torch.Generator().manual_seed(4)
    S = torch.randn(2, 33, 21, generator=g)
    T = torch.randn(2, 33, 19, generator=g)
    W = torch.randn(19, 21, generator=g) * 0.2
    for loss in ("mse", "cosine"):
        a = fastkd.hidden_match(S, T, W, loss=loss, backend="cpu")
        b = fastkd.hidden_match(S.double(), T.double(), W.double(), loss=loss, backend="torch")
        assert abs(a.item() - b.item()) <= 1e-5 * max(1.0, abs(b.item())), (loss, a.item(), b.item())


def test_nearest_tokens_every_level(level):
    import fastkd

    g = torch.Generator().manual_seed(5)
    E = torch.randn(40, 24, generator=g)
    Wm = torch.randn(700, 24, generator=g)
    ids, scores = fastkd.nearest_tokens(E, Wm, k=3, metric="cosine", backend="cpu")
    ref = torch.nn.functional.normalize(E.double(), dim=-1) @ torch.nn.functional.normalize(Wm.double(), dim=-1).T
    top = ref.topk(3, dim=-1)
    assert torch.allclose(scores.double(), top.values, atol=1e-5)
    assert torch.equal(ids, top.indices)


def test_embedding_ascent_every_level(level):
    import fastkd

    g = torch.Generator().manual_seed(6)
    e = torch.randn(5, 37, generator=g)
    grad = torch.randn(5, 37, generator=g)
    a, b = e.clone(), e.clone()
    fastkd.embedding_ascent_(a, grad, step_size=0.1, backend="cpu")
    fastkd.embedding_ascent_(b, grad, step_size=0.1, backend="torch")
    assert torch.allclose(a, b, atol=1e-6)


def test_set_capability_rejects_unknown_and_unsupported():
    lib = _lib()
    with pytest.raises(ValueError, match="not a CPU capability; use one of default, avx2, avx512"):
        lib.set_cpu_capability("sse9")
    best = lib.cpu_best_capability()
    if best == "avx512":
        pytest.skip("this CPU supports every level; the 'more than this CPU supports' error cannot be provoked here")
    above = LEVELS[LEVELS.index(best) + 1]
    with pytest.raises(ValueError, match=f"more than this CPU supports \\(it supports: .*{best}\\)"):
        lib.set_cpu_capability(above)


def _info(env_level: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTKD_CPU_CAPABILITY", None)
    if env_level is not None:
        env["FASTKD_CPU_CAPABILITY"] = env_level
    code = "from fastkd import _C; print(_C.cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("forced", LEVELS)
def test_env_forces_a_level(forced):
    lib = _lib()
    best = lib.cpu_best_capability()
    r = _info(forced)
    if LEVELS.index(forced) <= LEVELS.index(best) and forced in lib.cpu_built_capabilities():
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == forced
    else:
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "FASTKD_CPU_CAPABILITY=" + forced in last and ("supports" in last or "compiled" in last), last


def test_env_default_is_the_best_level():
    lib = _lib()
    r = _info(None)
    assert r.returncode == 0, r.stderr
    built = lib.cpu_built_capabilities()
    best = lib.cpu_best_capability()
    expect = best if best in built else built[-1]
    assert r.stdout.strip() == expect


def test_env_bad_value_is_one_line_error():
    r = _info("avx9000")
    assert r.returncode != 0
    assert "ValueError: fastkd: FASTKD_CPU_CAPABILITY=avx9000 is not a CPU capability" in r.stderr


def test_info_names_the_level():
    r = subprocess.run([sys.executable, "-m", "fastkd.info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lib = _lib()
    assert f"CPU kernels: {lib.cpu_capability()}" in r.stdout


def _functions_using(so_path: str, pattern: str) -> set[str]:
    objdump = shutil.which("objdump")
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", so_path], capture_output=True, text=True).stdout
    found, current = set(), None
    reg = re.compile(pattern)
    for line in out.splitlines():
        if line.endswith(">:") and "<" in line:
            current = line[line.index("<") + 1 : -2]
        elif current is not None and reg.search(line):
            found.add(current)
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is needed to read the disassembly")
def test_baseline_code_uses_no_avx2_or_avx512_instructions():
    """Only the avx2 / avx512 copies of the kernels may use ymm / zmm registers (or FMA, AVX2 ints)."""
    import fastkd._C as C

    lib = _lib()
    if "avx2" not in lib.cpu_built_capabilities():
        pytest.skip("built without the avx2/avx512 levels")
    # ymm/zmm registers or VEX-encoded instructions; libgomp / libc stubs are not in this file.
    users = _functions_using(C.__file__, r"%[yz]mm\d|\bv(fmadd|fmsub|fnmadd|broadcast|perm|gather|pmov|pbroadcast)")
    # the level copies live in namespaces AVX2 / AVX512 (also in mangled names, e.g. OpenMP's outlined
    # ._omp_fn copies that objdump leaves mangled). Compiler-made clones ("[clone .constprop.0]",
    # .isra, .part) are local to the object that made them, so only that copy's code calls them.
    allowed = re.compile(r"AVX2|AVX512|\[clone \.")
    bad = sorted(f for f in users if not allowed.search(f))
    assert not bad, f"{len(bad)} baseline functions use AVX instructions, e.g. {bad[:8]}"
