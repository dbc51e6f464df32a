"""fastcnn's layers depend one way (README.md, Structure): the helpers under everything, the
backends (cpu/, triton/), the ops, the modules, what is built from them. Every import inside
fastcnn/, at module level or inside a function, goes down or sideways, and none closes a
circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastcnn"

# Bottom to top; a module may import its own layer and the ones below it.
LAYERS = [
    ("fastcnn.common", "fastcnn._trace", "fastcnn._extension", "fastcnn._backend",
     "fastcnn.reference"),
    ("fastcnn.cpu", "fastcnn.triton"),
    ("fastcnn.ops",),
    ("fastcnn.nn",),
    ("fastcnn.models", "fastcnn.report", "fastcnn.cuda_graphs", "fastcnn.optimize",
     "fastcnn.quantize", "fastcnn.caches"),
    ("fastcnn", "fastcnn.bench", "fastcnn.collect_env", "fastcnn.build"),
    ("fastcnn.ray",),  # builds on the public API only
]  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastcnn modules `name` imports anywhere in its file (an imported attribute counts as
    its module; an import of a package's submodule as that submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    """The index in LAYERS of the longest prefix that names module's place (the package itself,
    "fastcnn", names only itself: a new module must be given a layer)."""
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            within = module.startswith(prefix + ".") and prefix != "fastcnn"
            if (module == prefix or within) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        pytest.fail(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return rank


def test_every_import_goes_down_or_sideways():
    upward = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, targets in sorted(_graph().items())
        for b in sorted(targets)
        if _layer(b) > _layer(a)
    ]
    assert upward == []


def test_no_import_circle():
    graph = _graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert circles == []


def test_a_module_in_no_layer_is_named():
    with pytest.raises(pytest.fail.Exception, match=r"fastcnn\.brand_new is in no layer"):
        _layer("fastcnn.brand_new")


def test_the_graph_sees_function_level_imports():
    """The checker itself: ops/conv_bn_act.py imports fastcnn.cpu only inside functions."""
    graph = _graph()
    assert "fastcnn.cpu.onednn" in graph["fastcnn.ops.conv_bn_act"]
    assert "fastcnn.common.alloc" in graph["fastcnn.ops.conv_bn_act"]
