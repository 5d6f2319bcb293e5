"""The shape of the package: no import circles, one error hierarchy, one stack for each job."""

from __future__ import annotations

import ast
import inspect
import os
import pkgutil

import pytest

import fastkd
import fastkd.errors

PKG = os.path.dirname(fastkd.__file__)


def _modules() -> dict[str, str]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for root, dirs, files in os.walk(PKG):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or inside functions).

    ``from fastkd.x import y`` counts as an import of ``fastkd.x.y`` when that is a module, else of
    ``fastkd.x``; importing a submodule does not count as importing its parent package's
    ``__init__`` (Python runs it, but it is not the module's own dependency).
    """
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    # leaves that are not .py files of the package: the compiled extension and the Triton kernels
    # (top-level kernels/ in a checkout, aliased as fastkd.kernels); they import no fastkd module
    kernels = os.path.join(os.path.dirname(PKG), "kernels")
    leaves = {"fastkd._C", "fastkd.kernels"} | {
        f"fastkd.kernels.{f[:-3]}" for f in (os.listdir(kernels) if os.path.isdir(kernels) else []) if f.endswith(".py")
    }
    known = set(mods) | leaves
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                t = target
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != name and t in mods:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_known_edges():
    g = import_graph()
    assert "fastkd.errors" in g["fastkd.data"]
    assert "fastkd.data" in g["fastkd.assets"]
    assert "fastkd.checkpoint" in g["fastkd.loop"] and "fastkd.models" in g["fastkd.loop"]
    assert "fastkd.ops.distill_loss" in g["fastkd"]


def test_no_module_imports_one_that_imports_it_back():
    cycles = _cycles(import_graph())
    assert cycles == [], f"import circles: {cycles}"


def test_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_data_is_below_assets():
    g = import_graph()
    assert "fastkd.assets" not in g["fastkd.data"]


def _fastkd_exception_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(fastkd.__path__, "fastkd."):
        if info.name.startswith(("fastkd.kernels", "fastkd._C", "fastkd.__main__")):
            continue
        try:
            module = __import__(info.name, fromlist=["_"])
        except ImportError:
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("fastkd"):
                found.append(obj)
    return sorted(set(found), key=lambda c: c.__name__)


def test_every_fastkd_exception_derives_from_fastkd_error():
    classes = _fastkd_exception_classes()
    assert len(classes) >= 8
    assert all(issubclass(c, fastkd.FastKDError) for c in classes), [
        c for c in classes if not issubclass(c, fastkd.FastKDError)
    ]


@pytest.mark.parametrize(
    ("cls", "kind"),
    [
        (fastkd.errors.DataError, ValueError),
        (fastkd.errors.DistillError, ValueError),
        (fastkd.errors.OptionError, ValueError),
        (fastkd.errors.CheckpointError, ValueError),
        (fastkd.errors.AssetError, RuntimeError),
        (fastkd.errors.BackendUnavailableError, RuntimeError),
        (fastkd.errors.TrainingDivergedError, RuntimeError),
    ],
)
def test_errors_keep_their_builtin_kind(cls, kind):
    assert issubclass(cls, kind) and issubclass(cls, fastkd.FastKDError)


def test_no_probes_for_features_missing_from_the_build():
    hits = []
    for root in (PKG, os.path.join(os.path.dirname(PKG), "tests"), os.path.join(os.path.dirname(PKG), "benchmarks")):
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py") and f != os.path.basename(__file__):
                    with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                        text = fh.read()
                    if "not in this build" in text or "not in this fastkd" in text:
                        hits.append(f)
    assert hits == []
