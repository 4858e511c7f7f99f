"""The package's layout is part of its design: these tests keep the layers from growing back together.

Layers, bottom up: ``errors`` and ``log`` (import nothing of ours); ``ledger/``;
``metrics/`` and ``wm/`` (each on the ledger); ``sinks/`` (on metrics, wm and the
configuration); the top-level modules, which wire them together. Nothing imports
upward across a package boundary, and every exception type lives in ``errors``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import ccos_obsd

PACKAGE = Path(ccos_obsd.__file__).parent

ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "log": set(),
    "ledger": {"ledger", "errors"},
    "metrics": {"metrics", "ledger", "errors"},
    "wm": {"wm", "ledger", "errors"},
    "sinks": {"sinks", "wm", "metrics", "ledger", "errors", "log", "config"},
}
"""For each layer, the layers its modules may import (top-level modules may import any)."""


def _layer(module: str) -> str:
    """``ccos_obsd.ledger.store`` -> ``ledger``; ``ccos_obsd.ops`` -> ``ops``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _our_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ccos_obsd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ccos_obsd"):
            if node.module == "ccos_obsd":  # from ccos_obsd import x: x is a module or the version
                found.update(f"ccos_obsd.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return found


def _modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        modules.append((".".join(relative.parts).removesuffix(".__init__"), path))
    return modules


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_no_module_imports_upward(module: str, path: Path) -> None:
    layer = _layer(module)
    allowed = ALLOWED.get(layer)
    if allowed is None:  # a top-level module: wires the layers together
        return
    upward = {name for name in _our_imports(path) if _layer(name) not in allowed and name != "ccos_obsd.__version__"}
    assert not upward, f"{module} ({layer}) imports {sorted(upward)}; {layer} may import only {sorted(allowed)}"


def test_every_exception_type_lives_in_errors() -> None:
    elsewhere = []
    for info in pkgutil.walk_packages(ccos_obsd.__path__, "ccos_obsd."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == info.name and info.name != "ccos_obsd.errors"):
                elsewhere.append(f"{info.name}.{name}")
    assert not elsewhere, f"exception types outside ccos_obsd.errors: {elsewhere}"


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from ccos_obsd.ops import Ops\nfrom ccos_obsd.ledger import store\n", encoding="utf-8")
    imports = _our_imports(bad)
    assert {_layer(name) for name in imports} - ALLOWED["ledger"] == {"ops"}
