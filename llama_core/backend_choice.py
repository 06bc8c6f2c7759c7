"""Which backend runs a model: `open_backend(kind, gguf, ...)`, the one place that decides, and
`cpu_fallback`, the one rule for what a running engine moves to when its device is lost.

    backend, note = open_backend("auto", gguf, n_ctx=2048, n_slots=1)
    # note: "backend: cuda (GPU 0: NVIDIA H100 ...; kernels: cubin sm_90a)"
    #   or  "backend: cpu (CUDA unavailable: cuInit failed: CUDA_ERROR_NO_DEVICE ...)"

kind "cpu": the CPU backend.  "cuda": the CUDA backend, checked against the device and the model
with every kernel preloaded (`ukgpu.gpu.cuda.select.create_backend`), so a GPU or kernel that
cannot serve fails here, never as wrong output later; what stops it is raised (the driver's or
the model's typed error; `BackendChoiceError` when the GPU modules cannot be imported or no
NVIDIA GPU is on the PCI bus).  "auto": "cuda" when that works, else the CPU backend with the
reason in the note; the GPU stack is optional, so any exception it raises is a reason, not a
crash.

The note is one line, "backend: <name> (<why>)", for stderr, logs and /health.  Callers pass
what they hold: `alloc`, where the CPU backend takes its KV cache from (the guest's arena);
`n_ctx` and `n_slots`, which size the device arena; `pci_root`, a sysfs root to look for an
NVIDIA GPU on before the driver is tried (the guest: "/sys"; its notes then name the GPU found);
`driver` and `arena_bytes` for tests.  The GPU modules are imported inside functions only, so
`ukgpu.llama_core` loads where no GPU stack is installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ukgpu.llama_core.backend import Allocator, Backend
from ukgpu.llama_core.errors import UkgpuError

KINDS = ("auto", "cpu", "cuda")


class BackendChoiceError(UkgpuError):
    """The backend asked for does not exist, or its device cannot be reached at all."""


def check_kind(kind: str, error: type[UkgpuError] = BackendChoiceError) -> None:
    """Raise `error` unless kind is one of KINDS."""
    if kind not in KINDS:
        raise error(f"backend {kind!r}: use 'cpu', 'auto' or 'cuda'")


def open_backend(kind: str, gguf: Any = None, *, alloc: Allocator | None = None,
                 n_ctx: int = 2048, n_slots: int = 1, pci_root: str | None = None,
                 driver: Any = None, arena_bytes: int | None = None,
                 activations: str | None = None) -> tuple[Backend, str]:
    """(backend, "backend: <name> (<why>)") for kind "auto" | "cpu" | "cuda" and the model
    `gguf` (an opened `GGUFFile`; None checks the device only); a CPU backend rounds its
    products' activations as `activations` says (`CpuBackend`)."""
    check_kind(kind)
    if kind == "cpu":
        return cpu_backend(alloc, activations), "backend: cpu (requested)"
    sizes = {"n_ctx": n_ctx, "n_slots": n_slots, "driver": driver, "arena_bytes": arena_bytes}
    backend, why = _try_cuda(kind == "cuda", gguf, pci_root, sizes)
    if backend is None:
        return cpu_backend(alloc, activations), f"backend: cpu ({why})"
    return backend, f"backend: cuda ({why})"


def cpu_backend(alloc: Allocator | None = None, activations: str | None = None) -> Backend:
    """The CPU backend in float32, its KV cache from `alloc` (numpy's zeros when None), its
    activations "f32" or "q8" (None: UKGPU_CPU_ACTIVATIONS, else "f32")."""
    from ukgpu.llama_core.cpu.backend import CpuBackend

    return CpuBackend(alloc=alloc, activations=activations)


def cpu_fallback(kind: str, backend: Backend, alloc: Allocator | None = None,
                 activations: str | None = None) -> Callable[[], Backend] | None:
    """What an engine rebuilds its model on when `backend`, opened for `kind`, loses its device
    while running (a sticky `DeviceError`; any other fails only its request): under "auto" a
    device backend falls back to a fresh CPU backend (KV cache from `alloc`); None otherwise
    ("cuda" wants the error, and the CPU has nothing below it)."""
    if kind != "auto" or backend.name == "cpu":
        return None
    return functools.partial(cpu_backend, alloc, activations)


def _try_cuda(required: bool, gguf: Any, pci_root: str | None, sizes: dict[str, Any]
              ) -> tuple[Backend | None, str]:
    """(the CUDA backend, its device line), or (None, why not); `required` raises instead."""
    unusable = "CUDA unavailable"
    if pci_root is not None:
        bdf, why = _nvidia_gpu_on_pci(pci_root)
        if bdf is None:
            if required:
                raise BackendChoiceError(f"{why}: give the machine an NVIDIA GPU (VFIO "
                                         "passthrough) or use the cpu backend")
            return None, why
        unusable = f"GPU {bdf} found but CUDA is unusable"
    try:
        from ukgpu.gpu.cuda.select import create_backend
    except ImportError as exc:
        if required:
            raise BackendChoiceError(f"the CUDA backend cannot be imported ({exc}): install "
                                     "ukgpu[gpu] or use --backend cpu") from exc
        return None, f"CUDA backend unavailable: {exc}"
    try:
        backend = create_backend(gguf=gguf, **sizes)
    except Exception as exc:  # noqa: BLE001 - under "auto" any failure of the GPU stack is a reason
        if required:
            raise
        return None, f"{unusable}: {_describe(exc)}"
    return backend, backend.ctx.info.line()


def _nvidia_gpu_on_pci(root: str) -> tuple[str | None, str]:
    """(PCI address of the first NVIDIA GPU under the sysfs `root`, "") or (None, why none)."""
    try:
        from ukgpu.gpu.pci.sysfs import PciBus

        gpus = PciBus(root).nvidia_gpus()
    except Exception as exc:  # noqa: BLE001 - an unreadable bus only means no GPU to try
        return None, f"PCI scan failed: {type(exc).__name__}: {exc}"
    if not gpus:
        return None, "no NVIDIA GPU on the PCI bus"
    return gpus[0].bdf, ""


def _describe(exc: Exception) -> str:
    """A ukgpu error's own message; any other exception's type too (it is unexpected)."""
    return str(exc) if isinstance(exc, UkgpuError) else f"{type(exc).__name__}: {exc}"
