"""The package's layers (docs: DESIGN.md, "Layout"): a module imports only from its own layer or below.

storage < config < model | data < train < launch < bench < cli. ``config`` is a leaf (it imports nothing else of
the package); ``model`` and ``data`` are side by side and never import each other; ``model`` imports only torch,
einops, the standard library, ``config`` and itself. Every import counts: at module level and inside functions
(a lazy import is still a dependency, and still a circle when the other side imports back).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import mirasol_ray

PACKAGE = Path(mirasol_ray.__file__).parent

RANK = {"root": 0, "storage": 0, "config": 1, "model": 2, "data": 2, "train": 3, "launch": 4, "bench": 5, "cli": 6}
"""Each layer's height; a module may import from a layer of its height or lower (but see SIDE_BY_SIDE)."""
SIDE_BY_SIDE = {("model", "data"), ("data", "model")}
"""Layers of the same height that must not import each other."""
MODEL_THIRD_PARTY = {"torch", "einops"}


def layer_of(module: str) -> str:
    """``mirasol_ray.train.step`` -> ``train``; ``mirasol_ray.configs`` belongs to ``config``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    head = parts[1].removesuffix(".py")
    return "config" if head == "configs" else head


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in module ``name``'s source, relative imports resolved, ``from pkg import
    sub`` naming the submodule when ``sub`` is one."""
    package = name if is_package else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_sub = base.startswith("mirasol_ray") and (
                    (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                    or (PACKAGE.parent / Path(*sub.split("."))).is_dir())
                out.append((node.lineno, sub if is_sub else base))
    return sorted(set(out))


def violations(source: str, name: str, shown: str, is_package: bool = False) -> list[str]:
    """One line per import of module ``name`` (shown as ``shown``) that its layer does not allow."""
    own = layer_of(name)
    bad = []
    for line, target in imported_modules(source, name, is_package):
        top = target.split(".")[0]
        where = f"{shown}:{line} imports {target}"
        if top != "mirasol_ray":
            if own == "model" and top not in MODEL_THIRD_PARTY and top not in sys.stdlib_module_names:
                bad.append(f"{where}: model imports only torch, einops and the standard library")
            continue
        other = layer_of(target)
        if other == own or other == "root":
            continue
        if own == "config":
            bad.append(f"{where}: config is a leaf (it imports nothing else of the package)")
        elif own == "model" and other != "config":
            bad.append(f"{where}: model imports only mirasol_ray.config and mirasol_ray.model")
        elif (own, other) in SIDE_BY_SIDE:
            bad.append(f"{where}: {own} and {other} are side by side and do not import each other")
        elif RANK[other] > RANK[own]:
            bad.append(f"{where}: {other} is above {own}")
    return bad


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    unknown = sorted({layer_of(module_name(p)) for p in MODULES} - set(RANK))
    assert not unknown, f"modules outside the known layers: {unknown}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_from_own_layer_or_below(path):
    bad = violations(path.read_text(), module_name(path), str(path.relative_to(PACKAGE.parent)),
                     path.name == "__init__.py")
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import():
    """The checker itself: a model module that reaches into train, data or storage, a lazy import included."""
    source = ("import numpy\nimport torch\nfrom mirasol_ray.config import Config\nfrom mirasol_ray.model import layers\n"
              "\n\ndef f():\n    from mirasol_ray.train import checkpoint\n    from mirasol_ray import storage\n"
              "    from ..data.text import Tokenizer\n")
    bad = violations(source, "mirasol_ray.model.probe", "probe.py")
    assert [b.split(" imports ")[1].split(":")[0] for b in bad] == [
        "numpy", "mirasol_ray.train.checkpoint", "mirasol_ray.storage", "mirasol_ray.data.text"]
    assert violations("from mirasol_ray.train.step import f\n", "mirasol_ray.data.rows", "rows.py") == [
        "rows.py:1 imports mirasol_ray.train.step: train is above data"]
    assert violations("from mirasol_ray.model.config import ModelConfig\n", "mirasol_ray.config", "config.py")
    assert not violations("from mirasol_ray.launch import console\n", "mirasol_ray.bench.data", "data.py")


LAZY_ALLOWED = {
    ("mirasol_ray/cli.py", None): "each command's modules load when that command runs (fast --help; see build_parser)",
    ("mirasol_ray/train/parallel.py", "torch._dynamo"): "the compiler, loaded only with train.compile",
    ("mirasol_ray/train/sharded.py", "torch.distributed.checkpoint._fsspec_filesystem.FsspecReader"):
        "a private torch module, needed only for s3:// checkpoints",
}
"""Where an import may sit inside a function on purpose (the README's Layout says why); anywhere else it goes at
the top of the module, so the imports show the structure. Imports guarded by ``try`` (optional or private APIs
that may be absent) are allowed too."""


def lazy_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function that no ``try`` guards."""
    tree = ast.parse(source)
    out = []

    def visit(node: ast.AST, in_function: bool, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function and not guarded:
                name = child.names[0].name
                out.append((child.lineno, f"{child.module}.{name}" if isinstance(child, ast.ImportFrom) else name))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)),
                  guarded or isinstance(child, ast.Try))

    visit(tree, False, False)
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_sit_at_module_level(path):
    shown = str(path.relative_to(PACKAGE.parent))
    if (shown, None) in LAZY_ALLOWED:
        return
    bad = [f"{shown}:{line} imports {mod} inside a function" for line, mod in lazy_imports(path.read_text())
           if (shown, mod) not in LAZY_ALLOWED]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    """Module-level imports of the package form no cycle (a cycle only works while one side imports lazily)."""
    graph = {module_name(p): {t for _, t in imported_modules(p.read_text(), module_name(p), p.name == "__init__.py")
                              if t.startswith("mirasol_ray.")} for p in MODULES}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, []):
            break
    assert not cycle, "import circle: " + " -> ".join(dict.fromkeys(cycle)) + f" -> {cycle[-1]}"


def test_the_lazy_import_check_catches_one():
    src = "import os\n\ndef f():\n    import json\n    try:\n        import yaml\n    except ImportError:\n        pass\n"
    assert lazy_imports(src) == [(4, "json")]
    assert lazy_imports("def f():\n    from torch import _dynamo\n") == [(2, "torch._dynamo")]
