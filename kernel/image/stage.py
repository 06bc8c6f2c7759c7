"""Staging an image's root tree: copy the layout, compile bytecode, test-import in a chroot.

The staged tree is what the initramfs will hold (minus the model, which is
streamed straight from the model cache).  Bytecode is compiled once at build
time with unchecked-hash pycs (no source timestamps: reproducible, and the
guest never stats sources or writes caches), using the build interpreter
(same 3.11 bytecode as the guest's Debian python3.11).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ukgpu.kernel.guest.engine_setup import NUMBA_ENV
from ukgpu.kernel.image.python_layout import SITE, STDLIB, Layout
from ukgpu.llama_core.errors import UkgpuError


class StageError(UkgpuError):
    """The staged image tree is incomplete or does not run."""


_COMPILE = r"""
import importlib.util, py_compile, sys
root = sys.argv[1]
failed = []
for line in sys.stdin:
    guest = line.strip()
    src = root + guest
    try:
        py_compile.compile(src, cfile=importlib.util.cache_from_source(src), dfile=guest,
                           doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError as exc:
        failed.append(f"{guest}: {exc.msg.splitlines()[-1]}")
print("\n".join(failed))
"""


def stage(layout: Layout, root: Path) -> None:
    """Materialise `layout` under `root`.

    ukgpu's own sources are copied (they may be edited while the image is
    built; the manifest and the archive must see the same bytes); the
    versioned inputs (unpacked debs, installed wheels) are hard-linked when
    possible.
    """
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for guest, host in sorted(layout.files.items()):
        dest = root / guest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f"{SITE}/ukgpu/" in guest:
            shutil.copyfile(host, dest)
            continue
        try:
            os.link(host, dest)
        except OSError:
            shutil.copy2(host, dest)
    for guest, target in sorted(layout.links.items()):
        dest = root / guest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(target)


def compile_bytecode(root: Path) -> list[str]:
    """Write __pycache__/*.pyc for every .py of the stdlib and site-packages.

    Returns the guest paths of the new .pyc files; files that do not compile
    (none expected) make a StageError.
    """
    if sys.version_info[:2] != (3, 11):
        raise StageError(f"the image's Python is 3.11 but this build runs Python "
                         f"{sys.version.split()[0]}: build from a Python 3.11 venv")
    sources = sorted("/" + p.relative_to(root).as_posix()
                     for top in (STDLIB, SITE) for p in (root / top.lstrip("/")).rglob("*.py"))
    res = subprocess.run([sys.executable, "-I", "-c", _COMPILE, str(root)],
                         input="\n".join(sources), capture_output=True, text=True, check=False)
    if res.returncode != 0 or res.stdout.strip():
        raise StageError(f"byte-compiling the image failed:\n{(res.stdout + res.stderr)[-2000:]}")
    pycs = sorted("/" + p.relative_to(root).as_posix() for p in root.rglob("*.pyc"))
    return pycs


def chroot_check(root: Path, modules: tuple[str, ...]) -> str:
    """Import `modules` with the guest's own interpreter inside the staged tree.

    Catches a missing library or module in seconds instead of one TCG boot.
    Needs root (chroot); returns a note saying what was checked or why not.
    """
    if os.geteuid() != 0:
        return "skipped the chroot import check (needs root)"
    code = "import " + ", ".join(modules)
    res = subprocess.run(["chroot", str(root), "/usr/bin/python3.11", "-IB", "-c", code],
                         capture_output=True, text=True, check=False, timeout=300)
    if res.returncode != 0:
        raise StageError(f"the image's Python cannot import its modules ({code}):\n"
                         f"{res.stderr[-2000:]}\nadd the missing package or library to "
                         "kernel/image/python_layout.py")
    return f"imported {len(modules)} modules with the guest interpreter in a chroot"


_WARM = r"""
import sys
from ukgpu.llama_core.cpu import matmul as cpu_kernels
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.sampling import SamplingParams
seconds = cpu_kernels.warmup()
engine = Engine.load(sys.argv[1], backend="cpu", n_ctx=128, n_slots=1)
for prompt in ("Hello", "Tell me a long story about a robot who learns to paint " * 4):
    ids = engine.tokenizer.encode(prompt)
    list(engine.generate(ids, SamplingParams(temperature=0.0), max_tokens=3))
"""


# numba names parallel kernels after object addresses and iterates hashed sets: pin both
# (no address randomization, fixed hash seed) so the cache files come out byte-identical.
_NO_ASLR = ["setarch", "x86_64", "--addr-no-randomize"] if shutil.which("setarch") else []


def _warm_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NUMBA_"))}
    return {**keep, **NUMBA_ENV, "PYTHONHASHSEED": "0", "NUMBA_NUM_THREADS": "1"}


def precompile_numba(root: Path, mtime: int, model: Path) -> str:
    """Fill numba's on-disk cache for the CPU kernels inside the staged tree.

    Under TCG, compiling the kernels at first use would take minutes; loading
    them from the cache takes about a second.  The kernels' own warm-up plus
    two short generations on the image's model (short and long prompts: the
    decode and prefill paths with the real tensor types) compile exactly the
    signatures the guest will call.  numba keys its cache on the source
    file's mtime and size, so ukgpu's sources (staged copies) get the
    archive's fixed mtime first.  The model is linked in only for the run.
    """
    if os.geteuid() != 0:
        return "skipped numba precompilation (needs root for the chroot): kernels compile at first use"
    for path in (root / SITE.lstrip("/") / "ukgpu").rglob("*.py"):
        os.utime(path, (mtime, mtime))
    guest_model = root / "tmp" / model.name
    guest_model.parent.mkdir(exist_ok=True)
    try:
        os.link(model, guest_model)
    except OSError:
        shutil.copyfile(model, guest_model)
    start = time.monotonic()
    try:
        res = subprocess.run([*_NO_ASLR, "chroot", str(root), "/usr/bin/python3.11", "-sB", "-c",
                              _WARM, f"/tmp/{model.name}"], capture_output=True, text=True,
                             check=False, timeout=1800, env=_warm_env())
    finally:
        shutil.rmtree(root / "tmp")
    if res.returncode != 0:
        raise StageError(f"precompiling the numba kernels failed:\n{res.stderr[-2000:]}")
    return f"precompiled the numba kernels in {time.monotonic() - start:.1f}s"
