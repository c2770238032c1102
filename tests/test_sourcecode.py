"""Style, types and layering are checked by the test run itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The bus core knows no device; front and back ends never import each other.
FORBIDDEN = {
    "vmbus": ("vmbus.protocols", "vsp", "vsc"),
    "vmbus.protocols": ("vsp", "vsc"),
    "vsp": ("vsc",),
    "vsc": ("vsp",),
    "app": (),  # the command line and the demo sit on top of everything
}
APP_MODULES = ("vmbus.cli", "demo.parent", "benchmarks.bench", "vmbus.__main__")


def run_tool(*args: str) -> None:
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint() -> None:
    run_tool("ruff", "check", ".")


def test_ruff_format() -> None:
    run_tool("ruff", "format", "--check", ".")


def test_mypy() -> None:
    run_tool("mypy")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def layer_of(module: str) -> str:
    if module in APP_MODULES:
        return "app"
    return "vmbus.protocols" if module.startswith("vmbus.protocols") else module.split(".")[0]


SOURCES = sorted(
    path
    for package in ("vmbus", "vsp", "vsc")
    for path in (ROOT / package).rglob("*.py*")
    if path.suffix in (".py", ".pyx") and "testing" not in path.parts
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path: Path) -> None:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    banned = FORBIDDEN[layer_of(module)]
    if path.suffix == ".pyx":
        text = path.read_text()
        bad = [b for b in banned if f"from {b}" in text or f"import {b}" in text]
    else:
        bad = [
            name
            for name in imported_modules(path)
            if any(name == b or name.startswith(b + ".") for b in banned)
        ]
    assert not bad, f"{module} may not import {bad}"
