"""Guest step 7: the arena, the backend (GPU when usable, else CPU with the reason) and the engine.

The GGUF file is memory-mapped (a file in the initramfs' tmpfs, or the
read-only model disk), so weights are never copied; the KV cache comes from
the arena through the backend's allocator.  GPU modules are imported inside
guards: a missing or broken GPU stack means CPU inference plus one line that
says why.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ukgpu.kernel.guest.arena import Arena, format_size
from ukgpu.kernel.guest.syscalls import InitError

# The guest's CPU (TCG `-cpu max`, or a KVM host's) is not the build machine's: numba code is
# compiled for one fixed CPU, so the cache the image builder fills is valid here.  Haswell
# (x86-64-v3: AVX2, FMA, F16C) is what TCG's `-cpu max` offers and any KVM host since 2013;
# `generic` would lack F16C, and LLVM's software half-float call does not link in numba.
NUMBA_ENV = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}


def load(path: str, cfg: Any, arena_size: Callable[..., int]) -> tuple[Any, Arena, str]:
    """(engine, arena, backend note) for the model at `path`."""
    os.environ.update(NUMBA_ENV)
    from ukgpu.llama_core.gguf.file import open_gguf

    gguf = open_gguf(path)
    mc = gguf.config
    ctx = min(cfg.ctx, mc.ctx_len) if mc.ctx_len else cfg.ctx
    cfg.ctx = ctx
    arena = Arena(arena_size(cfg, mc.n_layers, mc.n_kv_heads, mc.head_dim))
    backend, note = pick_backend(cfg.backend, arena, gguf)
    from ukgpu.llama_core.engine import Engine

    from ukgpu.llama_core.cpu.backend import CpuBackend

    # ukgpu.backend=auto on a GPU: a device lost while serving moves the engine to the CPU
    fallback = (lambda: CpuBackend(alloc=arena.alloc)) if cfg.backend == "auto" and note == "cuda" \
        else None
    engine = Engine.load(gguf, backend=backend, n_ctx=ctx, n_slots=cfg.slots, fallback=fallback)
    print(f"ukgpu: model {path}: {mc.arch}, {mc.n_layers} layers, ctx {ctx}, {cfg.slots} slots; "
          f"arena {format_size(arena.size)} ({format_size(arena.used)} used)", flush=True)
    return engine, arena, note


def pick_backend(wanted: str, arena: Arena, gguf: Any = None) -> tuple[Any, str]:
    """The CUDA backend when a GPU is present and works (or is demanded), else the CPU one
    with its KV cache in the arena."""
    reason = "ukgpu.backend=cpu"
    if wanted in ("auto", "cuda"):
        backend, reason = _try_cuda(gguf)
        if backend is not None:
            return backend, "cuda"
        if wanted == "cuda":
            raise InitError(f"ukgpu.backend=cuda but the GPU cannot be used: {reason}")
    from ukgpu.llama_core.cpu.backend import CpuBackend

    return CpuBackend(alloc=arena.alloc), f"cpu ({reason})"


def _try_cuda(gguf: Any) -> tuple[Any, str]:
    try:
        from ukgpu.gpu.pci.sysfs import PciBus

        gpus = PciBus("/sys").nvidia_gpus()
    except Exception as exc:  # the GPU stack is optional in the guest
        return None, f"PCI scan failed: {type(exc).__name__}: {exc}"
    if not gpus:
        return None, "no NVIDIA GPU on the PCI bus"
    try:
        from ukgpu.gpu.cuda.backend import select_backend

        backend, _ = select_backend("cuda", gguf)
        return backend, ""
    except Exception as exc:
        return None, f"GPU {gpus[0].bdf} found but CUDA is unusable: {type(exc).__name__}: {exc}"
