"""The CPU kernels' machine code: is numba's on-disk cache warm, and compiling it ahead of use.

numba compiles each kernel the first time it runs and keeps the machine code on disk (next to
the sources, or in NUMBA_CACHE_DIR / the user cache where that folder is read-only).  On a fresh
install that first compile takes 20-40 s on two cores, and without this module it happened
silently inside the first prompt, whose speed then read as "0.8 t/s".

    cached()            True when every kernel has cached code for this source (nothing to compile)
    compile_kernels()   compile (or load) every kernel on tiny inputs; seconds taken
    ensure_compiled(f)  the CLI's step before a run: when the cache is cold, say so on `f`,
                        compile, and say how long it took; when warm, load quietly (~0.5 s)

`python -m ukgpu.llama_core.cpu.compile` compiles at install time (tools/dev/bootstrap.sh runs it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from ukgpu.llama_core.cpu import matmul


def _modules() -> list[Any]:
    from ukgpu.llama_core.cpu import blocks32, decode_step, int8_act, rope_attention, superblocks, tiled

    return [blocks32, superblocks, tiled, int8_act, rope_attention, decode_step]


def _dispatchers() -> Iterator[Any]:
    """Every compiled function of the kernel modules that numba caches on disk."""
    for module in _modules():
        for value in vars(module).values():
            cache = getattr(value, "_cache", None)
            if cache is not None and hasattr(cache, "_cache_file"):
                yield value


def has_cached_code(dispatcher: Any) -> bool:
    """Whether numba's index for `dispatcher` lists code for its current source (an index from
    an older source counts as empty, as numba itself treats it)."""
    try:
        return bool(dispatcher._cache._cache_file._load_index())
    except Exception:  # noqa: BLE001 - unreadable or absent index: nothing cached
        return False


def cached() -> bool:
    """True when numba is off (nothing to compile) or every kernel has cached code."""
    if not matmul.numba_enabled():
        return True
    return all(has_cached_code(d) for d in _dispatchers())


def _rope_and_attention() -> None:
    """Both ropes, decode attention (serial and threaded), rmsnorm and SwiGLU through the CPU
    backend's own calls, so the argument types, and thus the compiled signatures, are the ones a
    model uses."""
    from ukgpu.llama_core.backend import RopeConfig
    from ukgpu.llama_core.cpu.backend import CpuBackend, CpuWeight

    be = CpuBackend()
    if be._ops is None:
        return
    rows, norm = np.ones((2, 64), dtype=np.float32), np.ones(64, np.float32)
    norm.flags.writeable = False  # a model's norm weights are mapped read-only
    be.rmsnorm(rows, CpuWeight((64,), None, norm, None, None), 1e-6)
    be.swiglu(rows.copy(), rows)
    for n_heads, n_ctx in ((2, 8), (8, 4096)):  # the second passes PARALLEL_MIN_WORK
        hd = 64
        kv = be.alloc_kv(1, n_ctx, n_heads, hd)
        for neox in (False, True):
            x = np.ones((2, n_heads * hd), dtype=np.float32)
            be.rope(x, 0, n_heads, RopeConfig(n_rot=hd, base=10000.0, neox=neox))
        row = np.ones((1, n_heads * hd), dtype=np.float32)
        be.attention(row, row, row, kv, 0, n_ctx - 1)


def compile_kernels() -> float:
    """Compile (or load from the cache) every CPU kernel; seconds taken (0 when numba is off)."""
    if not matmul.numba_enabled():
        return 0.0
    t0 = time.perf_counter()
    matmul.warmup()
    from ukgpu.llama_core.cpu import int8_act

    int8_act.warmup()
    _rope_and_attention()
    from ukgpu.llama_core.cpu.decode_step import compile_step

    compile_step()  # the whole decode step (the longest compile: ~1-2 min on two cores)
    return time.perf_counter() - t0


def ensure_compiled(out: TextIO = sys.stderr) -> float:
    """Compile before a run so compile time never lands in a reported speed; one line on `out`
    before and after when the cache was cold (first run after an install or an upgrade)."""
    if cached():
        return compile_kernels()  # loads the cached code: well under a second
    print("ukgpu: compiling the CPU kernels (first run after install; cached for later runs) ...",
          file=out, flush=True)
    seconds = compile_kernels()
    print(f"ukgpu: CPU kernels compiled in {seconds:.1f} s", file=out, flush=True)
    return seconds


if __name__ == "__main__":
    print(f"CPU kernels compiled or loaded in {compile_kernels():.1f} s")
