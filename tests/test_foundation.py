"""The foundation: backend registry, compiled-library loading, info, packaging."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd import _ext
from fastkd.backends import BACKENDS, BackendUnavailableError, Op, backend_status
from fastkd.ops.distill_loss import OP as DISTILL_OP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT, timeout=300)


def test_compiled_library_loaded():
    assert _ext.available(), _ext.unavailable_reason()
    assert hasattr(torch.ops.fastkd, "distill_loss")


def test_auto_choice_on_cpu_is_compiled_cpu(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert DISTILL_OP.select(torch.device("cpu")) == "cpu"


def test_auto_choice_never_picks_interpreted_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert DISTILL_OP.select(torch.device("cpu")) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_named_unavailable_backend_raises_with_reason():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        DISTILL_OP.select(torch.device("cpu"), "cuda")
    x = torch.randn(2, 5)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run"):
        fastkd.distill_loss(x, x, backend="cuda")


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    ok, reason = backend_status("triton")
    assert not ok and "TRITON_INTERPRET" in reason
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        DISTILL_OP.select(torch.device("cpu"), "triton")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert DISTILL_OP.select(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTKD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTKD_BACKEND must be one of"):
        DISTILL_OP.select(torch.device("cpu"))


def test_unknown_backend_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.distill_loss(x, x, backend="tpu")


def test_op_without_implementation_raises_when_named():
    op = Op("dummy")
    op.register("torch")(lambda: None)
    with pytest.raises(BackendUnavailableError, match="no 'cpu' implementation"):
        op.select(torch.device("cpu"), "cpu")
    assert op.select(torch.device("cpu")) == "torch"


def test_info_lists_backends():
    r = _run("import fastkd.info as i; i.main()", env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"torch   {torch.__version__}" in out and "triton" in out and "fastkd  " in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in BACKENDS}
    assert set(rows) == set(BACKENDS)
    assert rows["cpu"].split()[1] == "yes" and rows["torch"].split()[1] == "yes"
    assert rows["triton"].split()[1] == "yes"
    if not torch.cuda.is_available():
        assert rows["cuda"].split()[1] == "no" and len(rows["cuda"].split()) > 2  # with its reason


def test_import_does_not_initialise_cuda():
    r = _run(
        "import torch, fastkd; x = torch.randn(3, 4); fastkd.distill_loss(x, x); print(torch.cuda.is_initialized())"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_missing_library_warns_once_and_reference_works(tmp_path):
    # A build made for another torch: fastkd must not load it, warn once with the reason, and work.
    code = (
        "import json, warnings, torch\n"
        "from fastkd import _ext\n"
        f"_ext.BUILD_INFO_PATH = {str(tmp_path / 'info.json')!r}\n"
        f"json.dump({{'torch': '1.0.0'}}, open(_ext.BUILD_INFO_PATH, 'w'))\n"
        "_ext.build_info.cache_clear(); _ext._load.cache_clear()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    _ext.library(); _ext.library()\n"
        "msgs = [str(x.message) for x in w]\n"
        "assert len(msgs) == 1 and 'built for torch 1.0.0' in msgs[0], msgs\n"
        "from fastkd.backends import backend_status\n"
        "ok, reason = backend_status('cpu'); assert not ok and '1.0.0' in reason, reason\n"
        "print('ok')\n"
    )
    r = _run(code, env={"FASTKD_NO_EXT_WARNING": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_pure_python_import_without_extension(tmp_path):
    # Simulate a pure-Python install: hide fastkd._C. import fastkd works and the reference runs.
    code = (
        "import sys, warnings\n"
        "sys.modules['fastkd._C'] = None\n"  # makes `from fastkd import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastkd, torch\n"
        "    x = torch.randn(4, 7)\n"
        "    print(float(fastkd.distill_loss(x, x + 1)))\n"
        "assert any('compiled kernels unavailable' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "from fastkd.ops.distill_loss import OP\n"
        "assert OP.select(torch.device('cpu')) == 'torch'\n"
    )
    r = _run(code, env={"FASTKD_NO_EXT_WARNING": "0"})
    assert r.returncode == 0, r.stderr


def test_build_info_matches_torch():
    info = json.load(open(_ext.BUILD_INFO_PATH))
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_kernels_package_importable():
    import fastkd.kernels
    import fastkd.kernels.distill_loss as k

    assert hasattr(k, "distill_loss_kernel")
    assert any(os.path.basename(p) == "kernels" for p in fastkd.kernels.__path__)


def test_kernels_folder_does_not_shadow_an_installed_kernels_package():
    """The checkout's root is on sys.path under pytest: a regular package kernels/ there would hide
    Hugging Face's ``kernels``, which transformers imports when it is installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__)))
    assert not os.path.exists(os.path.join(root, "kernels", "__init__.py"))


# --------------------------------------------------------------------------------------------
# The registry: supports(), the cached choice
# --------------------------------------------------------------------------------------------
def _op_with_supports(name: str) -> tuple[Op, list]:
    calls: list = []
    op = Op(name)
    op.register("torch")(lambda x, k: ("torch", x, k))
    op.register("cpu", supports=lambda x, k: calls.append(k) or (None if k <= 4 else f"k = {k} > 4"))(
        lambda x, k: ("cpu", x, k)
    )
    return op, calls


def test_supports_named_backend_raises_with_the_reason(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    if not _ext.available():
        pytest.skip("needs the compiled cpu backend")
    op, _ = _op_with_supports("dummy_supports_named")
    cpu = torch.device("cpu")
    assert op.pick(cpu, "cpu", (None, 4)) == "cpu"
    with pytest.raises(BackendUnavailableError, match=r"backend 'cpu' cannot run these inputs: k = 5 > 4"):
        op.pick(cpu, "cpu", (None, 5))
    monkeypatch.setenv("FASTKD_BACKEND", "cpu")  # named through the environment: the same
    with pytest.raises(BackendUnavailableError, match="k = 5 > 4"):
        op.pick(cpu, None, (None, 5))


def test_supports_automatic_choice_skips(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    if not _ext.available():
        pytest.skip("needs the compiled cpu backend")
    op, calls = _op_with_supports("dummy_supports_auto")
    cpu = torch.device("cpu")
    assert op.pick(cpu, None, (None, 3)) == "cpu"
    assert op.pick(cpu, None, (None, 9)) == "torch"
    assert calls == [3, 9]  # asked on every call: the inputs differ


def test_supports_failing_everywhere_raises():
    op = Op("dummy_supports_none")
    op.register("torch", supports=lambda k: "never")(lambda k: k)
    with pytest.raises(BackendUnavailableError, match="cannot run these inputs: never"):
        op.pick(torch.device("cpu"), "torch", (1,))


def test_choice_is_cached_and_keyed_on_the_environment(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    op = Op("dummy_cached")
    op.register("torch")(lambda: "torch")
    op.register("cpu")(lambda: "cpu")
    cpu = torch.device("cpu")
    resolved = []
    real = op.candidates
    monkeypatch.setattr(op, "candidates", lambda *a: resolved.append(a) or real(*a))
    first = op.pick(cpu)
    assert op.pick(cpu) == first and len(resolved) == 1  # the second call is a look-up
    monkeypatch.setenv("FASTKD_BACKEND", "torch")  # a new environment: a new key, resolved again
    assert op.pick(cpu) == "torch" and len(resolved) == 2
    monkeypatch.setenv("FASTKD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTKD_BACKEND must be one of"):
        op.pick(cpu)
    monkeypatch.delenv("FASTKD_BACKEND")
    assert op.pick(cpu) == first and len(resolved) == 3
    assert op.pick(cpu, "torch") == "torch" and len(resolved) == 4  # the backend argument is part of the key


def test_triton_choice_keyed_on_triton_interpret(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert DISTILL_OP.pick(cpu, "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        DISTILL_OP.pick(cpu, "triton")


def test_register_keeps_the_old_signature():
    op = Op("dummy_compat")
    op.register("torch")(lambda x: x + 1)
    op.register("cpu", "cuda", prepare=lambda: None)(lambda x: x + 2)
    assert op(op.pick(torch.device("cpu"), "torch"), 1) == 2
    assert op.select(torch.device("cpu"), "torch") == "torch"


def test_no_private_torch_c_calls_in_the_op_layer():
    # scale_grad_ is a torch.library.custom_op with mutates_args; nothing in the op layer reaches
    # into torch._C (private and unversioned).
    roots = [os.path.join(ROOT, "fastkd", "ops"), os.path.join(ROOT, "fastkd", "nn")]
    files = [os.path.join(r, f) for r in roots for f in os.listdir(r) if f.endswith(".py")]
    files.append(os.path.join(ROOT, "fastkd", "backends.py"))
    offenders = [f for f in files if "torch._C" in open(f, encoding="utf-8").read()]
    assert not offenders


def test_hidden_match_does_not_reach_into_distill_loss():
    src = open(os.path.join(ROOT, "fastkd", "ops", "hidden_match.py"), encoding="utf-8").read()
    assert "from fastkd.ops import distill_loss" not in src and "fastkd.ops.distill_loss" not in src
    assert "from fastkd.ops.scale_grad import scale_saved_grads" in src
