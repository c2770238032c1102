"""Style, types and layering are checked by the test run itself.

The layering rules, checked on every import of every module of the library
(an AST scan of each .py, lazy imports inside functions included; a scan of
the import lines of each .pyx):

- the bus core (`vmbus.*` but `vmbus.protocols`, `vmbus.testing` and the
  app modules) imports no device, no test support, no application;
- `vmbus.protocols.<dev>` imports the core and its own device's protocol
  only, never `vmbus.partition` or `vmbus.testing`;
- `vmbus.testing` imports the core, itself, the standard library and
  Hypothesis;
- `vsp` and `vsc` never import each other; VSPs never import the process
  layer (`vmbus.partition`, `vmbus.worker`, `vmbus._worker`,
  `vmbus._zygote`), VSCs neither it nor the host's control plane
  (`vmbus.host`);
- a device's VSP or VSC imports only its own device's protocol;
- the library never imports `demo`, `benchmarks` or `tests` (the command
  line, an app module, runs the first two from a source checkout);
- every package of the library says what it exports (`__all__`).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LIBRARY = ("vmbus", "vsp", "vsc")
# The command line and the management service sit on top of everything.
APP_MODULES = {"vmbus.cli", "vmbus.__main__", "vmbus.vmms"}
OUTSIDE = ("demo", "benchmarks", "tests")  # the source checkout, not the library
# A device protocol may import another device's protocol only here:
# synthvid frames its messages with the HID pipe header, declared once in input.
SHARED_PROTOCOLS = {"video": {"input"}}


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


# --- What each module imports ---------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_imports(path: Path, module: str) -> set[str]:
    """Every module `path` imports; `from a import b` counts as a and a.b
    (b may be a submodule), relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


PYX_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))", re.M)


def pyx_imports(path: Path) -> set[str]:
    return {a or b for a, b in PYX_IMPORT.findall(path.read_text())}


def within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def device_of(module: str, prefix: str) -> str | None:
    """`net` for vmbus.protocols.net.wire (prefix "vmbus.protocols"), or vsp.net."""
    rest = module[len(prefix) + 1 :].split(".") if within(module, prefix) else []
    return rest[0] if rest and rest[0] else None


def is_core(name: str) -> bool:
    return (
        within(name, "vmbus")
        and not within(name, "vmbus.protocols", "vmbus.testing")
        and not within(name, *APP_MODULES)
    )


def violations(module: str, imports: set[str]) -> Iterator[str]:
    """The layering rules broken by `module` importing `imports`."""
    if within(module, *APP_MODULES):
        return
    for name in sorted(imports):
        if within(name, *OUTSIDE):
            yield f"the library imports {name}"
        if within(name, *APP_MODULES):
            yield f"{name} is the application"
    if is_core(module):
        for name in imports:
            if within(name, "vmbus.protocols", "vmbus.testing", "vsp", "vsc"):
                yield f"the bus core imports {name}"
    elif within(module, "vmbus.protocols"):
        device = device_of(module, "vmbus.protocols")
        allowed = {device, *SHARED_PROTOCOLS.get(device or "", ())}
        for name in imports:
            if within(name, "vsp", "vsc", "vmbus.testing", "vmbus.partition"):
                yield f"a protocol imports {name}"
            elif device_of(name, "vmbus.protocols") not in allowed | {None}:
                yield f"a protocol imports another device's {name}"
    elif within(module, "vmbus.testing"):
        for name in imports:
            top = name.split(".")[0]
            ours = is_core(name) or within(name, "vmbus.testing")
            if not (ours or top in sys.stdlib_module_names or top == "hypothesis"):
                yield f"vmbus.testing imports {name}, not the core"
    else:
        side = module.split(".")[0]  # vsp or vsc
        other = {"vsp": "vsc", "vsc": "vsp"}[side]
        # A VSP sees its worker only through OpenContext, wherever it runs.
        workers = ("vmbus.partition", "vmbus.worker", "vmbus._worker", "vmbus._zygote")
        banned = workers if side == "vsp" else (*workers, "vmbus.host")
        for name in imports:
            if within(name, other, *banned):
                yield f"{side} imports {name}"
            elif device_of(name, "vmbus.protocols") not in {None, device_of(module, side)}:
                yield f"{module} imports another device's protocol {name}"


SOURCES = sorted(
    path
    for package in LIBRARY
    for path in (ROOT / package).rglob("*")
    if path.suffix in (".py", ".pyx")
)
PACKAGES = sorted(path for path in SOURCES if path.name == "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path: Path) -> None:
    module = module_name(path)
    imports = pyx_imports(path) if path.suffix == ".pyx" else python_imports(path, module)
    bad = sorted(set(violations(module, imports)))
    assert not bad, f"{module}: " + "; ".join(bad)


@pytest.mark.parametrize("path", PACKAGES, ids=lambda p: str(p.relative_to(ROOT).parent))
def test_every_package_defines_all(path: Path) -> None:
    tree = ast.parse(path.read_text())
    targets = [
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    ]
    assert "__all__" in targets, f"{module_name(path)} has no __all__"


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("vmbus.channel", "vmbus.protocols.echo"),
        ("vmbus.ring", "vsp.echo"),
        ("vmbus.protocols.net.wire", "vmbus.protocols.storage.wire"),
        ("vmbus.protocols.input.vsp", "vmbus.partition"),
        ("vmbus.testing.harness", "vmbus.protocols.echo"),
        ("vmbus.testing.harness", "numpy"),
        ("vsp.net.device", "vsc.net"),
        ("vsp.net.device", "vmbus.partition"),
        ("vsc.net.device", "vmbus.host"),
        ("vsp.net.device", "vmbus.protocols.storage"),
        ("vsc.echo", "demo.parent"),
    ],
)
def test_layering_rules_catch(module: str, name: str) -> None:
    assert list(violations(module, {name}))


def test_layering_rules_allow_the_shape() -> None:
    allowed = {
        "vmbus.partition": {"vmbus.device", "vmbus.host", "logging"},
        "vmbus.protocols.video.wire": {"vmbus.protocols.input", "vmbus.wire"},
        "vmbus.protocols.net.vsp": {"vmbus.protocols.net.wire", "vmbus.errors"},
        "vmbus.testing.strategies": {"hypothesis", "vmbus.messages", "vmbus.testing.rings"},
        "vsp.net.device": {"vmbus.protocols.net", "vmbus.device", "vmbus.host"},
        "vsc.net.device": {"vmbus.protocols.net.wire", "vmbus.guest"},
        "vmbus.cli": {"demo.parent", "benchmarks.bench", "vsp.echo"},
    }
    for module, imports in allowed.items():
        assert not list(violations(module, imports)), module
