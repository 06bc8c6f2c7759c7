"""Build the VFIO test guest: a Debian kernel + an initramfs with Python and ukgpu's VFIO layer.

The guest boots under QEMU (q35 + intel-iommu + edu), loads the VFIO modules,
binds edu to vfio-pci and runs `edu_check.py` through `ukgpu.gpu.vfio`.

Debian packages are fetched with `apt-get download` into `<cache>/debs`; the
built kernel and initramfs go to `<cache>/vfio-guest/<key>/`, where the key
hashes the package file names and every guest-side source file, so reruns
reuse them and any source change rebuilds.  Run directly to build and print
the paths: `python tests/integration/vfio_guest/build.py`.
"""

from __future__ import annotations

import compileall
import hashlib
import io
import lzma
import os
import py_compile
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ukgpu.llama_core.registry import cache_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

PYTHON_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
               "libc6", "libffi8", "zlib1g", "libexpat1"]
# Load order matters: each module's symbols come from the ones before it.
VFIO_MODULES = ["virt/lib/irqbypass.ko", "drivers/vfio/vfio.ko", "drivers/vfio/vfio_iommu_type1.ko",
                "drivers/vfio/vfio_virqfd.ko", "drivers/vfio/pci/vfio-pci-core.ko",
                "drivers/vfio/pci/vfio-pci.ko"]
# What the guest runs from the repo, at /opt/ukgpu/<path>.
UKGPU_FILES = ["llama_core/errors.py", "gpu/vfio_abi.py", "gpu/vfio.py", "gpu/vfio_host.py",
               "gpu/pci.py", "gpu/pci_config.py"]
GUEST_FILES = ["init.py", "edu_check.py"]
PRUNE = ["usr/share", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/python3.11/test",
         "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/asyncio", "usr/lib/python3.11/email",
         "usr/lib/python3.11/xml", "usr/lib/python3.11/multiprocessing", "usr/lib/python3.11/unittest",
         "usr/lib/python3.11/http", "usr/lib/python3.11/lib2to3",
         "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
         "usr/lib/python3.11/distutils", "usr/lib/python3.11/sqlite3", "usr/lib/python3.11/curses"]


class GuestBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # uncompressed vmlinux (ELF with a PVH entry): boots faster than bzImage
    initrd: Path  # newc cpio, uncompressed


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _ensure_apt_lists() -> None:
    """Fresh machines may have no package lists yet: fetch them once (needs root)."""
    try:
        _candidate("linux-image-amd64")
        return
    except GuestBuildError:
        pass
    if os.geteuid() != 0:
        raise GuestBuildError("apt has no package lists: run `apt-get update` as root")
    _run(["apt-get", "update", "-qq"])


def kernel_package() -> str:
    """The versioned kernel package that `linux-image-amd64` depends on now."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise GuestBuildError("apt-cache knows no linux-image-amd64: run `apt-get update` first")


def fetch_debs(names: list[str], debs_dir: Path) -> list[Path]:
    """Each package's .deb (the candidate version), downloading only what is missing."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        version = _candidate(name)
        pattern = f"{name}_{version.replace(':', '%3a')}_*.deb"  # apt escapes an epoch's colon
        found = sorted(debs_dir.glob(pattern))
        if not found:
            _run(["apt-get", "download", f"{name}={version}"], cwd=debs_dir)
            found = sorted(debs_dir.glob(pattern))
        if not found:
            raise GuestBuildError(f"apt-get download {name} produced no {pattern} in {debs_dir}")
        paths.append(found[-1])
    return paths


def _candidate(name: str) -> str:
    out = _run(["apt-cache", "policy", name])
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise GuestBuildError(f"no candidate version of {name}: run `apt-get update` first")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside an xz-compressed bzImage."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise GuestBuildError("no xz stream in the kernel image (expected CONFIG_KERNEL_XZ)")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    if not elf.startswith(b"\x7fELF"):
        raise GuestBuildError("the kernel's xz payload is not an ELF vmlinux")
    return elf


class Cpio:
    """A newc ("070701") archive writer: files, directories, symlinks and device nodes."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
            mtime: int = 0) -> None:
        fields = [self.ino, mode, 0, 0, 1, mtime, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self.out.write(header + name.encode() + b"\0")
        self._pad()
        self.out.write(data)
        self._pad()

    def add_tree(self, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            name = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                self.add(name, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                self.add(name, stat.S_IFDIR | 0o755)
            elif stat.S_ISREG(st.st_mode):
                self.add(name, stat.S_IFREG | (st.st_mode & 0o777), path.read_bytes(), mtime=int(st.st_mtime))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.out.getvalue()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))


def _stage_python(debs: list[Path], root: Path) -> None:
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    for rel in PRUNE:
        shutil.rmtree(root / rel, ignore_errors=True)
    # Precompiled, hash-checked-free bytecode: the guest never compiles the stdlib.
    if sys.version_info[:2] == (3, 11):
        compileall.compile_dir(str(root / "usr/lib/python3.11"), quiet=2, workers=1,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def _stage_ukgpu(root: Path) -> None:
    pkg = root / "opt/ukgpu"
    for rel in UKGPU_FILES:
        dest = pkg / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    for folder in [pkg, pkg / "gpu", pkg / "llama_core"]:
        (folder / "__init__.py").write_text("")
    for name in GUEST_FILES:
        shutil.copy2(HERE / name, root / "opt" / name)
    init = root / "init"
    init.write_text("#!/usr/bin/python3.11 -S\n" + (HERE / "init.py").read_text())
    init.chmod(0o755)


def _stage_modules(kernel_root: Path, root: Path) -> None:
    base = next((kernel_root / "lib/modules").iterdir()) / "kernel"
    dest = root / "lib/vfio-modules"
    dest.mkdir(parents=True)
    for i, rel in enumerate(VFIO_MODULES):
        shutil.copy2(base / rel, dest / f"{i:02d}-{Path(rel).name}")


def _key(debs: list[Path]) -> str:
    h = hashlib.sha256()
    for deb in debs:
        h.update(deb.name.encode())
    for path in [Path(__file__)] + [REPO / p for p in UKGPU_FILES] + [HERE / p for p in GUEST_FILES]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(cache: Path | None = None) -> GuestImage:
    """Build (or reuse) the guest kernel and initramfs."""
    cache = cache or cache_dir()
    _ensure_apt_lists()
    debs = fetch_debs([kernel_package()] + PYTHON_DEBS, cache / "debs")
    out = cache / "vfio-guest" / _key(debs)
    image = GuestImage(out / "vmlinux", out / "initrd.cpio")
    if image.kernel.is_file() and image.initrd.is_file():
        return image
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        kernel_root, root = Path(tmp, "kernel"), Path(tmp, "root")
        _run(["dpkg-deb", "-x", str(debs[0]), str(kernel_root)])
        bzimage = next((kernel_root / "boot").glob("vmlinuz-*")).read_bytes()
        _stage_python(debs[1:], root)
        _stage_ukgpu(root)
        _stage_modules(kernel_root, root)
        for folder in ["proc", "sys", "tmp"]:
            (root / folder).mkdir(exist_ok=True)
        cpio = Cpio()
        cpio.add("dev", stat.S_IFDIR | 0o755)
        cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        cpio.add_tree(root)
        _atomic_write(image.initrd, cpio.finish())
        _atomic_write(image.kernel, extract_vmlinux(bzimage))
    return image


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)


if __name__ == "__main__":
    img = build()
    print(img.kernel)
    print(img.initrd)
