"""The package imports only downward (README, "Layout"): no import cycle, function-level imports included, and
no module imports one from a higher layer. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "locality"

# The first matching prefix decides a module's layer (1 = bottom).
LAYERS = [
    ("locality.measure.update_ratios", 4),
    ("locality.measure.callback", 4),
    ("locality.measure.update_core", 3),
    ("locality.measure.lora_ratios", 3),
    ("locality.measure.ntk_profile", 4),
    ("locality.measure", 3),
    ("locality.controls", 4),
    ("locality.backbones", 2),
    ("locality.data", 2),
    ("locality.objectives", 3),
    ("locality.analysis", 5),
    *[
        (f"locality.{name}", 1)
        for name in (
            "errors",
            "paths",
            "identity",
            "config",
            "taxonomy",
            "quiet",
            "provenance",
            "pooling",
            "optim_groups",
            "components",
            "results",
        )
    ],
    *[(f"locality.{name}", 3) for name in ("schedules", "rundir", "resume", "faults", "sharding")],
    *[(f"locality.{name}", 4) for name in ("module", "checks", "loggers", "trainer", "assembly", "launch")],
    *[(f"locality.{name}", 5) for name in ("train", "pretrain", "ntk", "plan", "sweep", "analyze")],
    ("locality", 1),  # the package's own __init__
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locality"):
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                graph[name] |= {t if t in known else node.module for t in targets}
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.startswith("locality")}
        graph[name] = {t for t in graph[name] if t in known and t != name and not name.startswith(t + ".")}
        graph[name] |= {
            package  # importing a.b.c runs a.b's __init__ first, unless the importer is inside a.b already
            for target in graph[name]
            for package in _packages(target)
            if package in known and package != name and not name.startswith(package + ".")
        }
    return graph


def _packages(module: str) -> list[str]:
    """The packages whose __init__ runs when `module` is imported (below the root package)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def layer(module: str) -> int:
    return next(rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + "."))


def test_no_import_cycle():
    try:
        tuple(graphlib.TopologicalSorter(imports()).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def test_every_import_goes_down_or_sideways():
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in imports().items()
        for target in sorted(targets)
        if layer(target) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_validating_a_config_imports_no_torch():
    code = (
        "import sys, locality.config, locality.identity, locality.components;"
        "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'torchmetrics') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_cycle_is_caught(tmp_path, monkeypatch):
    """The cycle check itself can fail: two modules importing each other inside functions."""
    package = tmp_path / "locality"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("def f():\n    from locality import paths\n")
    (package / "paths.py").write_text("def g():\n    from locality.errors import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
