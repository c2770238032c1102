"""Builds the Cython extensions only; metadata lives in pyproject.toml.

Every `.pyx` file in the library's packages is one extension module named
after its path (vmbus/_cring.pyx is vmbus._cring), so a compiled fast path
added beside a device (vsp/storage/, vsp/net/, ...) is built without an
entry here. Headers it includes are looked up beside it and in vmbus/ (a
module that cimports the ring, vmbus/_cring.pxd, compiles in its atomics).
"""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
PACKAGES = ("vmbus", "vsp", "vsc")


def extensions() -> list[Extension]:
    sources = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.pyx"))
    found = []
    for source in sources:
        relative = source.relative_to(ROOT)
        found.append(
            Extension(
                ".".join(relative.with_suffix("").parts),
                [relative.as_posix()],
                include_dirs=[relative.parent.as_posix(), "vmbus"],
                extra_compile_args=["-O3"],
            )
        )
    return found


setup(
    ext_modules=cythonize(
        extensions(),
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    ),
)
