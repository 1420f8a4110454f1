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

# One row per folder, bottom (1) to top: a module's layer is its folder's. The package root holds the command
# lines (train, analyze, plan, pretrain, ntk), above everything; its __init__ is at the bottom.
FOLDERS = {
    "core": 1,
    "backbones": 2,
    "data": 2,
    "objectives": 3,
    "measure": 4,
    "controls": 5,
    "instrument": 6,
    "run": 7,
    "analysis": 8,
}
COMMANDS = 9


def test_every_folder_has_a_layer_and_the_root_holds_only_commands():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FOLDERS), "a folder without a layer (or a layer without a folder)"
    root = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert root == {"train", "analyze", "plan", "pretrain", "ntk"}, "the package root is for command lines"


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
    parts = module.split(".")
    if len(parts) == 1:
        return 1  # the package's own __init__
    return FOLDERS[parts[1]] if parts[1] in FOLDERS else COMMANDS


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
        "import sys, locality.core.config, locality.core.identity, locality.core.components;"
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


def test_an_upward_import_is_caught(tmp_path, monkeypatch):
    """The layer check itself can fail: a module in core/ importing one in run/ inside a function."""
    package = tmp_path / "locality"
    for folder in FOLDERS:
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "errors.py").write_text("def f():\n    from locality.run.rundir import RunDir\n")
    (package / "run" / "rundir.py").write_text("class RunDir: ...\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with pytest.raises(
        AssertionError, match=r"locality.core.errors \(layer 1\) imports locality.run.rundir \(layer 7\)"
    ):
        test_every_import_goes_down_or_sideways()


def test_every_command_line_is_a_console_script():
    import tomllib

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    commands = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert scripts == {f"locality-{name}": f"locality.{name}:main" for name in commands}


def test_names_resolved_at_run_time_follow_the_layers_too():
    """A rule may name a constant as "module:NAME" (imported when checked): such a name is an import."""
    import re

    upward = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found = re.fullmatch(r"(locality(?:\.\w+)+):\w+", node.value)
                if found and layer(found.group(1)) > layer(name):
                    upward.append(f"{name} names {node.value}")
    assert not upward, "\n".join(upward)
