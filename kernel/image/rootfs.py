"""The two halves of a booted image: the verified root disk and the small initramfs that reaches it.

`root.img` is the staged root tree as an erofs filesystem (`mkfs.erofs` from Debian's
erofs-utils, uncompressed: under TCG reading plain blocks is cheaper than decompressing them)
with its dm-verity hash tree appended (verity.py).  Fixed timestamps, owner and UUID make two
builds of the same tree byte-identical.

`initramfs.cpio` holds only what kernel/guest/stage1.py needs to map and mount that disk:
Python's interpreter and the libraries it loads, a few stdlib modules, ctypes, the virtio,
device-mapper and erofs modules, and stage1 itself as /init.  About 12 MiB instead of the
~400 MiB the whole guest used to unpack on every boot.
"""

from __future__ import annotations

import hashlib
import os
import py_compile
import shutil
import subprocess
import uuid
from importlib.util import cache_from_source
from pathlib import Path

from ukgpu.kernel.image import debs, verity
from ukgpu.kernel.image import elf as image_elf
from ukgpu.kernel.image.initramfs import Initramfs
from ukgpu.kernel.image.python_layout import LIB_DIRS, STDLIB
from ukgpu.llama_core.errors import UkgpuError

STAGE1_SOURCE = Path(__file__).resolve().parents[1] / "guest" / "stage1.py"
STAGE1_DIR = "/usr/lib/ukgpu"
STAGE1_INIT = b"""#!/usr/bin/python3.11 -IBu
import sys
sys.path.insert(0, "/usr/lib/ukgpu")
from stage1 import main
main()
"""
# what stage1 loads, dependencies added from the modules' own .modinfo
# (the crypto algorithms too: no modprobe here to load them on demand)
STAGE1_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "sha256_generic", "blake2b_generic",
                  "dm_verity", "erofs")
# what Python needs to start (besides its frozen modules) and what stage1 imports
STAGE1_STDLIB = ("__future__.py", "os.py", "stat.py", "posixpath.py", "genericpath.py", "_collections_abc.py",
                 "_sitebuiltins.py", "site.py", "abc.py", "codecs.py", "io.py", "struct.py",
                 "encodings/__init__.py", "encodings/aliases.py", "encodings/utf_8.py",
                 "encodings/latin_1.py", "encodings/ascii.py", "ctypes/__init__.py",
                 "ctypes/_endian.py", "types.py")
STAGE1_DYNLOAD = ("_ctypes",)


class RootfsError(UkgpuError):
    """The root disk or the initramfs cannot be made."""


def make_erofs(tree: Path, out: Path, seed: str) -> None:
    """`tree` as an uncompressed erofs image at `out`, reproducibly (UUID from `seed`)."""
    tool = shutil.which("mkfs.erofs")
    if tool is None:
        raise RootfsError("mkfs.erofs is not installed: apt-get install erofs-utils "
                          "(or run tools/dev/host_deps.sh)")
    fs_uuid = uuid.UUID(hashlib.sha256(seed.encode()).hexdigest()[:32])
    res = subprocess.run([tool, "--quiet", "-T0", f"-U{fs_uuid}", "--all-root", "-x-1", str(out), str(tree)],
                         capture_output=True, text=True, check=False, timeout=1800)
    if res.returncode != 0:
        raise RootfsError(f"mkfs.erofs failed: {res.stderr.strip()[-2000:]}")


def make_root_disk(tree: Path, out: Path, seed: str) -> verity.Verity:
    """root.img: the erofs image of `tree` followed by its hash tree."""
    make_erofs(tree, out, seed)
    return verity.append_tree(out, hashlib.sha256(b"ukgpu root disk\0" + seed.encode()).digest(),
                              verity.DEFAULT_HASH)


def make_model_disk(model: Path, out: Path, model_sha256: str) -> verity.Verity:
    """model.img: the GGUF file (padded to whole blocks) followed by its hash tree."""
    salt = hashlib.sha256(b"ukgpu model disk\0" + model_sha256.encode()).digest()
    return verity.copy_with_tree(model, out, salt, verity.DEFAULT_HASH)


def stage1_modules(tree: debs.KernelTree) -> list[Path]:
    wanted = [m for m in STAGE1_MODULES if not debs.is_builtin(tree, m)]
    return debs.module_closure(tree, wanted)


def stage1_initramfs(root: Path, modules: dict[str, Path], out: Path) -> int:
    """Write the small initramfs (files taken from the staged root tree `root`); its size.

    modules: {guest path (under /usr/lib/modules): host file} of stage1's kernel modules, in
    insmod order."""
    pick = ["/usr/bin/python3.11", *(f"{STDLIB}/{name}" for name in STAGE1_STDLIB)]
    dynload = root / STDLIB.lstrip("/") / "lib-dynload"
    for name in STAGE1_DYNLOAD:
        found = sorted(dynload.glob(f"{name}.cpython-*.so"))
        if not found:
            raise RootfsError(f"the staged root has no {name} extension module under {dynload}")
        pick.append("/" + found[0].relative_to(root).as_posix())
    elves = {g: root / g.lstrip("/") for g in pick if g.endswith(".so") or g.startswith("/usr/bin/")}
    pool = {"/" + p.relative_to(root).as_posix(): p.resolve()
            for d in LIB_DIRS for p in (root / d.lstrip("/")).glob("*.so*")}
    pick += list(image_elf.closure(elves, pool, LIB_DIRS))
    pick += ["/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
    pyc = [cache_from_source(g) for g in pick if g.endswith(".py")]
    cpio = Initramfs()
    for guest, host in modules.items():
        cpio.add_file(guest, source=host, mode=0o644)
    for guest in sorted(set(pick)):
        host = root / guest.lstrip("/")
        executable = guest.startswith("/usr/bin/") or ".so" in guest  # the loader must be executable
        cpio.add_file(guest, source=host.resolve(), mode=0o755 if executable else 0o644)
    for guest in pyc:
        if (root / guest.lstrip("/")).is_file():
            cpio.add_file(guest, source=root / guest.lstrip("/"), mode=0o644)
    for top in ("lib", "lib64", "bin", "sbin"):
        cpio.add_symlink(f"/{top}", f"usr/{top}")
    cpio.add_symlink("/usr/lib64/ld-linux-x86-64.so.2", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    source = STAGE1_SOURCE.read_bytes()
    cpio.add_file(f"{STAGE1_DIR}/stage1.py", data=source, mode=0o644)
    cpio.add_file(cache_from_source(f"{STAGE1_DIR}/stage1.py"), data=_bytecode(STAGE1_SOURCE), mode=0o644)
    cpio.add_file("/etc/ukgpu/stage1-modules", data="\n".join(modules).encode() + b"\n", mode=0o644)
    cpio.add_file("/init", data=STAGE1_INIT, mode=0o755)
    for d in ("/dev", "/proc", "/sys", "/newroot"):
        cpio.add_dir(d)
    cpio.add_node("/dev/console", "c", 5, 1)
    return cpio.write(out)


def _bytecode(source: Path) -> bytes:
    """stage1's unchecked-hash .pyc (the build runs the guest's Python version, see stage.py)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"ukgpu-stage1-{os.getpid()}.pyc"
    try:
        py_compile.compile(str(source), cfile=str(tmp), dfile=f"{STAGE1_DIR}/stage1.py", doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        return tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)


def check_stage1(init_root: Path) -> str:
    """Import stage1 with the initramfs's own interpreter in a chroot of the unpacked archive."""
    if os.geteuid() != 0:
        return "skipped the stage-1 import check (needs root)"
    res = subprocess.run(["chroot", str(init_root), "/usr/bin/python3.11", "-IB", "-c",
                          f"import sys; sys.path.insert(0, {STAGE1_DIR!r}); import stage1"],
                         capture_output=True, text=True, check=False, timeout=120)
    if res.returncode != 0:
        raise RootfsError(f"the initramfs's Python cannot import stage1:\n{res.stderr[-2000:]}\n"
                          "add the missing module to STAGE1_STDLIB in kernel/image/rootfs.py")
    return "imported stage1 with the initramfs's interpreter in a chroot"
