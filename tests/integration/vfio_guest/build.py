"""Build the VFIO test guest: a Debian kernel + an initramfs with Python and ukgpu's VFIO layer.

The guest boots under QEMU (q35 + intel-iommu + edu), loads the VFIO modules,
binds edu to vfio-pci and runs `edu_check.py` through `ukgpu.gpu.vfio.device`.

Debian packages come from `ukgpu.kernel.image.debs` (apt-get download + dpkg-deb,
cached under `<cache>/debs`); the kernel is unpacked to an uncompressed vmlinux
by `ukgpu.kernel.image.vmlinux`; the archive is written by
`ukgpu.kernel.image.initramfs`.  The result lives in `<cache>/vfio-guest/<key>/`,
where the key hashes the package versions and every guest-side source file,
so reruns reuse it and any source change rebuilds (older builds are removed).
Run directly to build and print the paths:
`python tests/integration/vfio_guest/build.py`.
"""

from __future__ import annotations

import hashlib
import py_compile
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ukgpu.kernel.image import debs
from ukgpu.kernel.image.initramfs import Initramfs
from ukgpu.kernel.image.vmlinux import vmlinux_bytes

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

PYTHON_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
               "libc6", "libffi8", "zlib1g", "libexpat1"]
VFIO_MODULES = ["vfio_pci", "vfio_iommu_type1"]  # plus what they depend on, in insmod order
# What the guest runs from the repo, at /opt/ukgpu/<path> (all pure stdlib).
UKGPU_FILES = ["llama_core/errors.py", "gpu/vfio/abi.py", "gpu/vfio/iommu.py", "gpu/vfio/device.py", "gpu/vfio/host.py",
               "gpu/pci/sysfs.py", "gpu/pci/config_space.py", "gpu/vfio/passthrough.py", "tools/commands/vfio.py"]
GUEST_FILES = ["init.py", "edu_check.py"]
STDLIB = "usr/lib/python3.11"
PRUNE = ("usr/share", "usr/lib/x86_64-linux-gnu/gconv", "etc", ".complete") + tuple(
    f"{STDLIB}/{d}" for d in ("test", "pydoc_data", "asyncio", "email", "xml", "multiprocessing",
                              "unittest", "http", "lib2to3", "ensurepip", "idlelib", "tkinter",
                              "distutils", "sqlite3", "curses"))


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # uncompressed vmlinux (ELF with a PVH entry): boots faster than bzImage
    initrd: Path  # newc cpio, uncompressed


def _keep(rel: str) -> bool:
    return not any(rel == p or rel.startswith(p + "/") for p in PRUNE)


def _key(parts: list[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    for path in [Path(__file__)] + [REPO / p for p in UKGPU_FILES] + [HERE / p for p in GUEST_FILES]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _compile_stdlib(roots: list[Path], out: Path) -> None:
    """Bytecode for the kept stdlib, so the guest never compiles it (unchecked: no mtimes needed)."""
    if sys.version_info[:2] != (3, 11):
        return  # bytecode must match the guest's Python 3.11
    for root in roots:
        for src in sorted((root / STDLIB).rglob("*.py")) if (root / STDLIB).is_dir() else []:
            rel = src.relative_to(root)
            if src.is_symlink() or not _keep(rel.as_posix()):
                continue
            cfile = out / rel.parent / "__pycache__" / f"{src.stem}.cpython-311.pyc"
            try:
                py_compile.compile(str(src), cfile=str(cfile), dfile="/" + rel.as_posix(), doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            except py_compile.PyCompileError:
                continue  # a few stdlib test fixtures are not valid Python on purpose


def _archive(roots: list[Path], modules: list[Path], pyc: Path) -> Initramfs:
    cpio = Initramfs()
    for root in roots:
        cpio.add_tree(root, "/", keep=_keep)
    cpio.add_tree(pyc, "/")
    for rel in UKGPU_FILES:
        cpio.add_file(f"/opt/ukgpu/{rel}", source=REPO / rel)
    for pkg in ("", "/gpu", "/llama_core", "/tools"):
        cpio.add_file(f"/opt/ukgpu{pkg}/__init__.py", data=b"")
    for name in GUEST_FILES:
        cpio.add_file(f"/opt/{name}", source=HERE / name)
    init = b"#!/usr/bin/python3.11 -S\n" + (HERE / "init.py").read_bytes()
    cpio.add_file("/init", data=init, mode=0o755)
    for i, ko in enumerate(modules):
        cpio.add_file(f"/lib/vfio-modules/{i:02d}-{ko.name}", source=ko)
    for folder in ("/proc", "/sys", "/dev", "/tmp"):
        cpio.add_dir(folder)
    cpio.add_node("/dev/console", "c", 5, 1)
    return cpio


def build() -> GuestImage:
    """Build (or reuse) the guest kernel and initramfs."""
    kernel = debs.fetch_kernel()
    modules = debs.module_closure(kernel, VFIO_MODULES)
    roots = debs.fetch(PYTHON_DEBS)
    base = debs.cache_dir() / "vfio-guest"
    out = base / _key([kernel.root.name] + [r.name for r in roots] + [m.name for m in modules])
    image = GuestImage(out / "vmlinux", out / "initrd.cpio")
    if image.kernel.is_file() and image.initrd.is_file():
        return image
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        _compile_stdlib(roots, Path(tmp))
        _archive(roots, modules, Path(tmp)).write(image.initrd)
    part = image.kernel.with_suffix(".part")
    part.write_bytes(vmlinux_bytes(kernel.vmlinuz))
    part.replace(image.kernel)
    for old in base.iterdir():  # one build at a time is enough: drop stale ones
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    return image


if __name__ == "__main__":
    img = build()
    print(img.kernel)
    print(img.initrd)
