"""Opening the CUDA backend: the probe, and creation with every check done up front.

`probe()` answers "can this machine run the CUDA backend?" without a model: driver, device,
compute capability (sm_80+), and a loadable artifact of every model-independent kernel.
`create_backend(gguf=...)` also checks the model (weight types, head size, rope) and preloads
every kernel the model needs, so a PTX/cubin load failure surfaces at load time, never as wrong
output later; it raises the reason (`UkgpuError` subclasses).  Choosing between this backend and
the CPU one ("auto" | "cuda" | "cpu") is `ukgpu.llama_core.backend_choice.open_backend`'s.
"""

from __future__ import annotations

from typing import Any

from ukgpu.gpu.cuda.arena import BufferPool, DeviceArena
from ukgpu.gpu.cuda.backend import CudaBackend, CudaUnsupported
from ukgpu.gpu.cuda.driver import CudaContext, CudaError, open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.llama_core.errors import UkgpuError
from ukgpu.ptx_kernels.loader import (
    KernelManifestError,
    Manifests,
    attention_entries,
    embedding_entry,
    gemm_entry,
    matvec_entry,
    rope_entry,
)
from ukgpu.ptx_kernels.repack import FORMATS

MIN_CC = (8, 0)
COMMON_KERNELS = ("add_f32", "add_bias_f32", "swiglu_f32", "geglu_f32", "scale_f32", "rmsnorm_f32",
                  "argmax_f32", "store_rows_f16")
ACTIVATION_BYTES = 1 << 30  # arena headroom for activations beyond weights and KV
REPACK_GROWTH = 1.6  # repacked planes vs raw GGUF bytes, worst case (Q6_K: 320 vs 210)


def _quant_k_multiple(qtype: str) -> int:
    return FORMATS[qtype].block_elems if qtype in FORMATS else 1


def model_kernels(gguf: Any) -> list[str]:
    """Manifest entries a model's forward pass and decode graph use; CudaUnsupported if any
    weight, head size or rope variant has no kernel."""
    from ukgpu.llama_core.model import rope_config

    cfg, rope = gguf.config, rope_config(gguf.config)
    try:
        names = set(COMMON_KERNELS) | set(attention_entries(cfg.head_dim).values())
        names.add(rope_entry(rope.neox, rope.n_rot))
    except KernelManifestError as exc:
        raise CudaUnsupported(f"{exc}; use the CPU backend") from exc
    for view in gguf.tensors.values():
        if len(view.shape) != 2:
            continue
        qtype = view.qtype.name
        if qtype not in FORMATS or view.shape[1] % max(32, _quant_k_multiple(qtype)):
            raise CudaUnsupported(f"{view.name} ({qtype}, {view.shape}) has no CUDA kernel "
                                  f"(types {', '.join(FORMATS)}); use the CPU backend")
        if view.name == "token_embd.weight":
            names.add(embedding_entry(qtype))
        names |= {matvec_entry(qtype, 1), matvec_entry(qtype, 8), gemm_entry(qtype)}
    return sorted(names)


def _check_device(ctx: CudaContext) -> None:
    if ctx.info.cc < MIN_CC:
        raise CudaUnsupported(f"{ctx.info.name} is sm_{ctx.info.cc[0]}{ctx.info.cc[1]}; the "
                              "kernels need sm_80 or newer: use the CPU backend")


def probe(device: int = 0, driver: Any = None) -> tuple[bool, str]:
    """(True, "GPU 0: ... ; kernels: cubin sm_90a") or (False, why not)."""
    try:
        ctx = open_device(device, driver)
        _check_device(ctx)
        manifests = Manifests.load()
        arts = [manifests.select(n, ctx.info.cc) for n in COMMON_KERNELS]
        kinds = {f"{a.kind} {a.target}" for a in arts}
    except (UkgpuError, KernelManifestError) as exc:
        return False, str(exc)
    return True, f"{ctx.info.line()}; kernels: {', '.join(sorted(kinds))}"


def default_arena_bytes(ctx: CudaContext, gguf: Any, n_ctx: int, n_slots: int) -> int:
    free = int(ctx.free_bytes() * 0.9)
    if gguf is None:
        return min(free, 4 << 30)
    cfg = gguf.config
    weights = sum(int(v.data.nbytes) for v in gguf.tensors.values())
    kv = 2 * BufferPool.size_class(cfg.n_layers * n_ctx * cfg.n_kv_heads * cfg.head_dim * 2) * n_slots
    want = int(weights * REPACK_GROWTH) + kv + ACTIVATION_BYTES
    if want > free:
        raise CudaError("arena", "CUDA_ERROR_OUT_OF_MEMORY",
                        f"the model needs ~{want / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is free: "
                        "lower n_ctx / n_slots or use a smaller model")
    return want


def create_backend(device: int = 0, gguf: Any = None, driver: Any = None,
                   arena_bytes: int | None = None, n_ctx: int = 2048, n_slots: int = 1,
                   manifests: Manifests | None = None) -> CudaBackend:
    """Open GPU `device`, check that it and the model are supported, preload the kernels and
    reserve the arena (sized for the weights, n_slots caches of n_ctx and activations, unless
    arena_bytes says)."""
    ctx = open_device(device, driver)
    _check_device(ctx)
    names = model_kernels(gguf) if gguf is not None else list(COMMON_KERNELS)
    kernels = KernelSet(ctx, manifests)
    kernels.preload(names)
    size = arena_bytes or default_arena_bytes(ctx, gguf, n_ctx, n_slots)
    return CudaBackend(ctx, kernels, DeviceArena(ctx.cu, size))

