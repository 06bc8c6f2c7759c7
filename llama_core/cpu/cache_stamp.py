"""Keep numba's on-disk cache of the CPU kernels in step with all of their sources.

numba invalidates a function's cached machine code when *its own* file changes, not when a file
it calls into does: after `decode_step.py`'s step was compiled with `int8_dot.py`'s products
inlined, an edit of `int8_dot.py` alone would leave the old products in the cached step (seen
as wrong logits and as a segmentation fault while developing).  So the cache folder holds a
digest of every kernel source; when it differs from the sources present, the kernels' cached
files there are removed before any is loaded, and numba compiles afresh.

    refresh(modules)   called once, before the first kernel runs (`matmul._kernels`)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STAMP = "ukgpu-kernels.sha256"
# every module of this package with cached compiled functions (all cache into one folder)
KERNEL_MODULES = ("blocks32", "superblocks", "tiled", "int8_act", "rope_attention", "decode_step")
# the sources numba compiles into them: those modules, the IR they inline, and the one gguf
# function superblocks compiles (editing any other file keeps the cache)
SOURCES = tuple(f"{m}.py" for m in KERNEL_MODULES) + ("int8_dot.py", "int8_ir.py", "../gguf/quants.py")
_HERE = Path(__file__).resolve().parent


def sources_digest(folder: Path = _HERE) -> str | None:
    """sha256 over the compiled kernels' sources (SOURCES: names and bytes); None when one
    cannot be read (then nothing is removed)."""
    h = hashlib.sha256()
    try:
        for name in SOURCES:
            h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    except OSError:
        return None
    return h.hexdigest()


def _cache_dirs(dispatchers: Iterable[Any]) -> set[Path]:
    dirs = set()
    for d in dispatchers:
        path = getattr(getattr(d, "_cache", None), "_cache_path", None)
        if path:
            dirs.add(Path(path))
    return dirs


def refresh_dir(folder: Path, modules: Iterable[str], digest: str) -> bool:
    """Remove `modules`' numba cache files in `folder` unless its stamp says `digest`; then write
    the stamp.  True when files were removed.  A folder that cannot be written (a read-only
    image) is left as it is: there numba's own check is all there is."""
    stamp = folder / STAMP
    try:
        if stamp.read_text().strip() == digest:
            return False
    except OSError:
        pass
    prefixes = tuple(f"{m}." for m in modules)
    removed = False
    try:
        for path in folder.iterdir():
            if path.name.startswith(prefixes) and path.suffix in (".nbi", ".nbc"):
                path.unlink()
                removed = True
        stamp.write_text(digest + "\n")
    except OSError:
        return removed
    return removed


def refresh(loaded: Iterable[Any]) -> None:
    """`refresh_dir` for the cache folder(s) that the compiled functions of the `loaded` kernel
    modules use (every module of the package caches into the same folder)."""
    dispatchers = [v for m in loaded for v in vars(m).values() if hasattr(v, "_cache")]
    digest = sources_digest()
    if digest is None:
        return
    for folder in _cache_dirs(dispatchers):
        refresh_dir(folder, KERNEL_MODULES, digest)
