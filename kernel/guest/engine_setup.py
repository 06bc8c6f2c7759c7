"""Guest step 7: the arena, the backend (GPU when usable, else CPU with the reason) and the engine.

The GGUF file is memory-mapped (a file in the initramfs' tmpfs, or the
read-only model disk), so weights are never copied; the KV cache comes from
the arena through the backend's allocator.  The backend is chosen by
`llama_core.backend_choice.open_backend`, told to look for an NVIDIA GPU on the
PCI bus before trying the driver: a missing or broken GPU stack means CPU
inference plus one line that says why (`ukgpu: backend cpu (no NVIDIA GPU on
the PCI bus)`), unless ukgpu.backend=cuda demands the GPU.

A GPU backend then passes the boot self-test (`ukgpu.gpu.cuda.self_test`: the kernel checks of
`ukgpu verify` on the kernels the model uses) before it serves: if a kernel is wrong the guest
closes the GPU and serves from the CPU, and the note (logged, on the READY line and in /health's
backend_note) names the kernel: `cpu (GPU self-test failed: matvec_q4_k_b1 NMSE 1.0e-02 >
1.0e-08)`.  Under ukgpu.backend=cuda a failed self-test is a boot error; ukgpu.gpu_selftest=off
skips it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

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
    lazy_gguf_package()
    from ukgpu.llama_core.backend_choice import cpu_fallback
    from ukgpu.llama_core.engine import Engine
    from ukgpu.llama_core.gguf.file import open_gguf

    gguf = open_gguf(path)
    mc = gguf.config
    ctx = min(cfg.ctx, mc.ctx_len) if mc.ctx_len else cfg.ctx
    cfg.ctx = ctx
    arena = Arena(arena_size(cfg, mc.n_layers, mc.n_kv_heads, mc.head_dim))
    backend, note = _open_backend(cfg, gguf, arena)
    if backend.name == "cuda" and cfg.gpu_selftest != "off":
        backend, note = _self_test(cfg, gguf, arena, backend, note)
    # ukgpu.backend=auto on a GPU: a device lost while serving moves the engine to the CPU
    engine = Engine.load(gguf, backend=backend, n_ctx=ctx, n_slots=cfg.slots,
                         fallback=cpu_fallback(cfg.backend, backend, alloc=arena.alloc,
                                               activations=cfg.cpu_activations))
    engine.backend_note = note  # /health says which backend answers, and why
    print(f"ukgpu: model {path}: {mc.arch}, {mc.n_layers} layers, ctx {ctx}, {cfg.slots} slots; "
          f"arena {format_size(arena.size)} ({format_size(arena.used)} used)", flush=True)
    return engine, arena, note.removeprefix("backend: ")  # logged as "backend cpu (why)"


def lazy_gguf_package() -> None:
    """Make `import gguf` cheap: gguf-py's `__init__` imports all of it (writer, metadata with
    yaml, tqdm, tensor mapping, vocab: 0.4 s of the guest's 0.7 s under TCG) where the engine
    needs `GGMLQuantizationType` and `gguf.quants`.  The package goes into `sys.modules` without
    running its `__init__`; a submodule loads when named, and the first other name asked for
    runs the real `__init__` (everything then behaves as before).  No-op once gguf is imported."""
    import importlib
    import importlib.util
    import sys
    import types

    if "gguf" in sys.modules:
        return
    spec = importlib.util.find_spec("gguf")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return  # not installed as a package: the engine's own import reports it
    module = importlib.util.module_from_spec(spec)

    def getattr_(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "GGMLQuantizationType":
            value = importlib.import_module("gguf.constants").GGMLQuantizationType
        elif importlib.util.find_spec(f"gguf.{name}") is not None:
            value = importlib.import_module(f"gguf.{name}")
        else:
            del module.__getattr__  # the real __init__ from here on
            spec.loader.exec_module(module)
            return getattr(module, name)
        setattr(module, name, value)
        return value

    module.__getattr__ = getattr_  # type: ignore[attr-defined]
    sys.modules["gguf"] = module
    assert isinstance(module, types.ModuleType)


def _open_backend(cfg: Any, gguf: Any, arena: Arena) -> tuple[Any, str]:
    """The backend ukgpu.backend asks for: the CUDA one when an NVIDIA GPU is on the PCI bus and
    works (or is demanded), else the CPU one with its KV cache in the arena; and its note."""
    from ukgpu.llama_core.backend_choice import open_backend

    try:
        return open_backend(cfg.backend, gguf, alloc=arena.alloc, n_ctx=cfg.ctx,
                            n_slots=cfg.slots, pci_root="/sys", activations=cfg.cpu_activations)
    except Exception as exc:  # only ukgpu.backend=cuda lets the GPU's failure out
        raise InitError(f"ukgpu.backend={cfg.backend} but the GPU cannot be used: {exc}") from exc


def _self_test(cfg: Any, gguf: Any, arena: Arena, backend: Any, note: str) -> tuple[Any, str]:
    """The CUDA backend with the self-test's line in its note when the model's kernels pass;
    else the CPU backend and the failure (ukgpu.backend=cuda: an InitError)."""
    from ukgpu.gpu.cuda.self_test import self_test
    from ukgpu.llama_core.backend_choice import cpu_backend

    result = self_test(backend, gguf)
    if result.ok:
        return backend, f"{note.removesuffix(')')}; {result.summary()})"
    try:
        backend.close()
    except Exception:  # noqa: BLE001 - a faulted context may refuse to free; the CPU serves anyway
        pass
    if cfg.backend == "cuda":
        raise InitError(f"ukgpu.backend=cuda but the GPU cannot be used: {result.summary()} "
                        "(ukgpu.gpu_selftest=off serves from it anyway)")
    return cpu_backend(arena.alloc, cfg.cpu_activations), f"backend: cpu ({result.summary()})"
