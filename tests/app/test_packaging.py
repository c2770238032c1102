"""`pip install .` gives a working library: the wheel of this checkout, installed
into a fresh virtual environment outside it, runs `vmbus info` and the echo
example, and holds every subpackage of the library and none of the checkout's
application code."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a source checkout has that a build must not see: its caches, its
# virtual environment, earlier builds and the extension built in place.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "__pycache__",
    "*.so",
    "*.egg-info",
    ".*_cache",
    ".hypothesis",
    ".benchmarks",
    ".cache",
)
LIBRARY = ("vmbus", "vsp", "vsc")
CHECKOUT_ONLY = ("demo", "benchmarks", "tests", "examples")
IMPORTED = ("vmbus.protocols.storage", "vmbus.testing", "vsp.storage", "vsc.net")


def missing_toolchain() -> str | None:
    for module in ("setuptools", "wheel", "Cython", "numpy"):
        if importlib.util.find_spec(module) is None:
            return f"the build needs {module}, which this environment lacks"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "the build needs a C compiler"
    return None


def clean_env() -> dict[str, str]:
    """The environment without anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the wheel, the python of a fresh venv it is installed in)."""
    reason = missing_toolchain()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("packaging")
    # Build from a copy, so nothing is written into the checkout (other work
    # builds there at the same time) and nothing built in place leaks in.
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    dist = tmp / "dist"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--no-cache-dir",
        "-q",
        "-w",
        dist,
        source,
        cwd=tmp,
    )
    (wheel,) = dist.glob("vmbus-*.whl")

    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "--no-cache-dir",
        "-q",
        wheel,
        cwd=tmp,
    )
    # The runtime dependencies come from this environment (no download): their
    # directories go on the new venv's path after its own site-packages. The
    # .pth files there (this checkout's editable install) are not processed.
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp)
    dependencies = {
        str(Path(spec.origin).parent.parent)
        for name in ("numpy", "pyroute2")
        if (spec := importlib.util.find_spec(name)) is not None and spec.origin
    }
    (Path(site.stdout.strip()) / "dependencies.pth").write_text("\n".join(sorted(dependencies)))
    yield wheel, python


def test_the_wheel_holds_the_library_and_no_application(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == set(LIBRARY), tops
    for package in LIBRARY:  # every subpackage of the checkout, whatever is added later
        for init in (ROOT / package).rglob("__init__.py"):
            assert init.relative_to(ROOT).as_posix() in names
    assert "vmbus/py.typed" in names
    assert "vmbus/_cring.pyi" in names
    assert any(name.startswith("vmbus/_cring.") and name.endswith(".so") for name in names)
    assert not [name for name in names if name.endswith(".c")]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vmbus = vmbus.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_library_imports_from_the_venv(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, python = installed
    venv = python.parent.parent
    probe = (
        "import importlib, importlib.util\n"
        f"for name in {(*LIBRARY, *IMPORTED)!r}:\n"
        "    print(name, importlib.import_module(name).__file__)\n"
        f"for name in {CHECKOUT_ONLY!r}:\n"
        "    print(name, importlib.util.find_spec(name))\n"
    )
    out = run(python, "-c", probe, cwd=tmp_path).stdout
    found = dict(line.split(" ", 1) for line in out.splitlines())
    for name in (*LIBRARY, *IMPORTED):
        assert Path(found[name]).is_relative_to(venv), (name, found[name])
    for name in CHECKOUT_ONLY:
        assert found[name] == "None", (name, found[name])


def test_the_console_script_runs(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, python = installed
    out = run(python.parent / "vmbus", "info", cwd=tmp_path).stdout
    assert "vmbus 0.1.0, cython ring" in out
    assert "VMBus versions (host): 2.4, 3.0, 4.0, 4.1, 5.0, 5.1, 5.2, 5.3" in out
    for device in ("storage", "network", "keyboard", "mouse", "video"):
        assert f"  {device} " in out


CHECKOUT_COMMANDS = {
    "demo": "vmbus demo: the demo ships with the source checkout: run ./run demo there",
    "demo --ring-only": "vmbus demo: the demo ships with the source checkout: run ./run demo there",
    "bench": "vmbus bench: the benchmarks ship with the source checkout: run ./run bench there",
}


@pytest.mark.parametrize("command", sorted(CHECKOUT_COMMANDS))
def test_checkout_commands_say_where_they_run(
    installed: tuple[Path, Path], tmp_path: Path, command: str
) -> None:
    _, python = installed
    result = subprocess.run(
        [str(python.parent / "vmbus"), *command.split()],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (2, CHECKOUT_COMMANDS[command] + "\n")


def test_the_echo_example_runs_from_the_wheel(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, python = installed
    example = tmp_path / "echo_partition.py"  # away from the checkout, so it cannot import it
    shutil.copy(ROOT / "examples" / "echo_partition.py", example)
    out = run(python, example, cwd=tmp_path, timeout=60).stdout
    assert "child: echo came back" in out
    assert "parent: child exit code 0" in out


def test_the_management_service_runs_from_the_wheel(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """vmbus serve and vmbus ctl as a user of the wheel runs them: a VM
    defined in TOML starts, serves verified disk traffic, answers KVP and
    shuts down when asked."""
    _, python = installed
    vmbus = python.parent / "vmbus"
    socket = tmp_path / "vmms.sock"
    (tmp_path / "vm.toml").write_text(
        'name = "w"\nargs = ["traffic"]\n'
        '[[devices]]\nkind = "ramdisk"\nsize_mb = 4\n[[devices]]\nkind = "integration"\n'
    )
    service = subprocess.Popen(
        [str(vmbus), "serve", "--socket", str(socket)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stdout is not None
        assert "API on" in service.stdout.readline()

        def ctl(*args: str) -> str:
            return run(vmbus, "ctl", "--socket", socket, *args, cwd=tmp_path).stdout

        ctl("create", "vm.toml")
        assert "w: running" in ctl("start", "w")
        ctl("kvp", "w", "set", "from", "wheel")
        assert '"value": "wheel"' in ctl("kvp", "w", "get", "from")
        assert '"accepted": true' in ctl("shutdown", "w")
        assert '"exitcode": 0' in ctl("--json", "status", "w")
    finally:
        service.terminate()
        service.wait(60)
