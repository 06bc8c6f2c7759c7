"""What of Python goes into the image: Debian's interpreter and stdlib, the venv's wheels, ukgpu.

Choices (measured, see docs/benchmarks/image.md):
- Interpreter and stdlib: Debian's python3.11 debs, minus what a server never
  imports (tests, idlelib, tkinter, ensurepip, distutils, sqlite3, curses, ...).
- numpy: the build venv's numpy 2.x wheel files (OpenBLAS bundled in
  numpy.libs) rather than Debian's python3-numpy 1.24 with the reference BLAS:
  the same numpy the CPU reference is tested with, and a fast BLAS.  Its
  x86-64-v2+ kernels need `-cpu max` under TCG.
- HTTP stack and gguf: copied from the venv's site-packages, per installed
  distribution (its RECORD), so `importlib.metadata` works in the guest too.
- numba/llvmlite (NUMBA_DISTS): ~190 MB, shipped unless the build says
  `numba=False`; their kernel cache is filled at build time (stage.py), since
  JIT compiling under TCG would take minutes.
- ukgpu: only what the guest's PID 1 can import (the static import closure of
  `ukgpu.kernel.guest.init`, see guest_closure.py) plus the data those modules
  read (ptx_kernels/build/): no image builder, QEMU launcher, Triton generator,
  VFIO host setup or CLI, and editing those does not change the image.

Guest layout is merged-/usr: every /lib, /bin path of a deb lands under /usr.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ukgpu.kernel.image.guest_closure import guest_files
from ukgpu.llama_core.errors import UkgpuError

PYTHON_DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")
LIB_DEBS = ("libc6", "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5",
            "libuuid1", "libcrypt1", "libgcc-s1", "libstdc++6")
GUEST_DISTS = ("numpy", "starlette", "uvicorn", "h11", "anyio", "sniffio", "idna", "click",
               "jinja2", "markupsafe", "gguf", "pyyaml", "typing_extensions", "tqdm", "llguidance")
NUMBA_DISTS = ("numba", "llvmlite")

STDLIB = "/usr/lib/python3.11"
SITE = "/usr/lib/python3/dist-packages"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")

_STDLIB_SKIP_TOP = {
    "test", "idlelib", "ensurepip", "tkinter", "turtledemo", "lib2to3", "pydoc_data",
    "distutils", "venv", "sqlite3", "dbm", "curses", "__phello__", "turtle.py",
    "antigravity.py", "this.py", "__hello__.py", "LICENSE.txt", "config-3.11-x86_64-linux-gnu",
}
_DYNLOAD_SKIP = ("_test", "_xx", "xxlimited", "_ctypes_test", "_sqlite3", "_dbm", "_curses",
                 "readline", "nis", "ossaudiodev")
_SITE_SKIP_DIRS = {"tests", "test", "__pycache__", "f2py", "_pyinstaller", "include",
                   "_examples", "distutils"}
_SITE_SKIP_PREFIXES = ("numpy/_core/lib/", "numpy/_core/_simd.", "numpy/_core/_multiarray_tests.",
                       "numpy/_core/_rational_tests.", "numpy/_core/_umath_tests.",
                       "numpy/_core/_struct_ufunc_tests.", "numpy/_core/_operand_flag_tests.",
                       "numba/np/ufunc/tbbpool.", "numba/np/ufunc/omppool.")
_SKIP_SUFFIXES = (".pyi", ".pyc", ".a", ".h", ".c", ".pxd", ".pyx")


class PythonLayoutError(UkgpuError):
    """The Python runtime for the image cannot be assembled."""


@dataclass
class Layout:
    """{guest path: host file} plus {guest path: symlink target}."""

    files: dict[str, Path] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)

    def update(self, other: Layout) -> None:
        self.files.update(other.files)
        self.links.update(other.links)


def guest_path(deb_path: str) -> str:
    """Merged /usr: /lib/x -> /usr/lib/x, /bin/x -> /usr/bin/x."""
    parts = PurePosixPath("/", deb_path).parts
    if len(parts) > 1 and parts[1] in ("lib", "lib64", "bin", "sbin"):
        return str(PurePosixPath("/usr", *parts[1:]))
    return str(PurePosixPath("/", deb_path))


def _walk(root: Path, below: str) -> list[tuple[str, Path]]:
    base = root / below.lstrip("/")
    if not base.exists():
        return []
    return [(guest_path("/" + p.relative_to(root).as_posix()), p)
            for p in sorted(base.rglob("*")) if p.is_file() or p.is_symlink()]


def _keep_stdlib(guest: str) -> bool:
    rel = PurePosixPath(guest).relative_to(STDLIB).parts
    if rel[0] in _STDLIB_SKIP_TOP or any(p in ("test", "tests", "__pycache__") for p in rel):
        return False
    if rel[0] == "lib-dynload":
        return not rel[-1].startswith(_DYNLOAD_SKIP)
    return True


def python_layout(deb_roots: list[Path]) -> Layout:
    """The interpreter, its stdlib and /etc/python3.11 from the unpacked Python debs."""
    out = Layout()
    for root in deb_roots:
        for guest, host in _walk(root, "usr/lib/python3.11") + _walk(root, "etc/python3.11"):
            if guest.startswith(STDLIB) and not _keep_stdlib(guest):
                continue
            _put(out, guest, host)
        for guest, host in _walk(root, "usr/bin"):
            _put(out, guest, host)
    if "/usr/bin/python3.11" not in out.files:
        raise PythonLayoutError("python3.11-minimal did not provide /usr/bin/python3.11")
    out.links["/usr/bin/python3"] = "python3.11"
    return out


def _put(out: Layout, guest: str, host: Path) -> None:
    if host.is_symlink():
        out.links[guest] = str(host.readlink())
    else:
        out.files[guest] = host


def lib_pool(deb_roots: list[Path]) -> dict[str, Path]:
    """Every shared library of the library debs: {guest path: host file (links followed)}."""
    pool: dict[str, Path] = {}
    for root in deb_roots:
        for sub in ("lib", "lib64", "usr/lib", "usr/lib64"):
            for guest, host in _walk(root, sub):
                name = PurePosixPath(guest).name
                if ".so" in name and host.resolve().is_file() and "/gconv/" not in guest:
                    pool[guest] = host.resolve()
    return pool


def site_layout(dists: tuple[str, ...] = GUEST_DISTS) -> tuple[Layout, dict[str, str]]:
    """The installed files of `dists` from this interpreter's site-packages.

    Returns the layout and {distribution: version} (a build input).
    """
    out = Layout()
    versions: dict[str, str] = {}
    for name in dists:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as exc:
            raise PythonLayoutError(f"{name} is not installed in {Path(md.__file__).parents[2]}: "
                                    "install ukgpu's dependencies into the build venv "
                                    "(pip install -e .)") from exc
        versions[dist.metadata["Name"]] = dist.version
        for rel in dist.files or ():
            if _keep_site(rel.parts):
                host = Path(dist.locate_file(rel))
                if host.is_file():
                    out.files[f"{SITE}/{rel.as_posix()}"] = host
    return out, versions


def _keep_site(parts: tuple[str, ...]) -> bool:
    if parts[0] == ".." or any(p in _SITE_SKIP_DIRS for p in parts[:-1]):
        return False
    if "/".join(parts).startswith(_SITE_SKIP_PREFIXES):
        return False
    if parts[0].endswith(".dist-info"):
        return parts[-1] in ("METADATA", "RECORD", "top_level.txt", "entry_points.txt")
    return not parts[-1].endswith(_SKIP_SUFFIXES)


def ukgpu_layout(repo: Path) -> Layout:
    """ukgpu's guest modules and their data files from the source tree (see guest_closure)."""
    out = Layout()
    for rel, host in guest_files(repo).items():
        out.files[f"{SITE}/ukgpu/{rel}"] = host
    return out
