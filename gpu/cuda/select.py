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
from ukgpu.gpu.cuda.attention_ops import MAX_DECODE_SPLITS
from ukgpu.gpu.cuda.backend import CudaBackend, CudaUnsupported
from ukgpu.gpu.cuda.driver import CudaContext, CudaError, open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.llama_core.errors import UkgpuError
from ukgpu.ptx_kernels.loader import (
    KernelManifestError,
    Manifests,
    attention_entries,
    embedding_entry,
    fused_decode_entry,
    fused_gemm_entry,
    fused_matvec_entry,
    gemm_entry,
    matvec_entry,
    rope_entry,
    rope_kv_entry,
)
from ukgpu.ptx_kernels.repack import FORMATS

MIN_CC = (8, 0)
COMMON_KERNELS = ("add_f32", "add_bias_f32", "swiglu_f32", "geglu_f32", "scale_f32", "rmsnorm_f32",
                  "argmax_f32", "store_rows_f16")
# fused entries: used where the manifest ships them
FUSED_PREFIXES = ("matvec_norm_", "matvec_qkv_", "matvec_glu_", "matvec_add_", "rope_kv_", "attn_decode_rope_",
                  "argmax_part_", "argmax_reduce_", "gemm_qkv_", "gemm_glu_", "gemm_add_")
PREFILL_ROWS = CudaBackend.max_prefill_rows  # rows of one prefill pass: what the arena holds
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
        names.add(rope_kv_entry(rope.neox, cfg.head_dim))
        names.add(fused_decode_entry(rope.neox, cfg.head_dim))
        names |= {"argmax_part_f32", "argmax_reduce_f32"}
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
        names |= {fused_matvec_entry(kind, qtype, b) for kind in ("norm", "qkv", "glu", "add") for b in (1, 8)}
        names |= {fused_gemm_entry(kind, qtype) for kind in ("qkv", "glu", "add")}
    shipped = set(Manifests.load().names())
    return sorted(n for n in names if n in shipped or not n.startswith(FUSED_PREFIXES))


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


def activation_bytes(cfg: Any, rows: int = PREFILL_ROWS, logit_rows: int | None = None,
                     n_slots: int = 1) -> int:
    """Bytes of the arena's activation pool for passes of at most `rows` rows of model `cfg`
    (`CudaBackend.max_prefill_rows`), with logits of up to `logit_rows` rows (all rows of a
    pass by default: `Model.forward(all_logits=True)`), and the logits row each of `n_slots`
    decode graphs keeps.

    Every buffer a pass allocates is one "kind" (the residual, a norm's output, q, k, v, ...)
    with at most one live instance (a block's buffers go when it returns), so a pass of r rows
    holds at most the sum of the kinds' size classes.  The pool keeps each power-of-two class
    it ever handed out, and passes of fewer rows use smaller classes: the classes one kind takes
    over all r <= rows sum to less than twice its class at `rows`, hence the factor 2.  Measured
    on the stand-in (tiny-llama, tests/unit/test_cuda_arena_sizing.py): one 4096-token prompt
    peaks at 0.26 of this bound, prompts of six lengths then decode on two slots at 0.34.
    Qwen2.5 1.5B: 1.22 GiB (1 GiB of it the logits of all 512 rows), whatever n_ctx; a one-pass
    8K prompt would need ~3.3 GiB by the same count."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    logit_rows = rows if logit_rows is None else logit_rows
    widths = [cfg.dim] * 7 + [q, q, q, kv, kv, kv, kv, cfg.ffn_dim, cfg.ffn_dim]
    # x, 2 norms, wo, ffn out, 2 post norms; q, its head norm, the attention output; k, v and
    # their head norms; gate, up.  Then the final norm and logits, the token ids and positions.
    kinds = [rows * w * 4 for w in widths] + [
        logit_rows * cfg.dim * 4, logit_rows * cfg.vocab_size * 4, rows * 4, (rows + 12) * 4]
    pool = 2 * sum(BufferPool.size_class(b) for b in kinds)
    batch = min(max(n_slots, 1), 8)  # rows of a batched decode step
    decode = (BufferPool.size_class(batch * q * MAX_DECODE_SPLITS * 4)  # split attention partials
              + BufferPool.size_class(batch * cfg.n_heads * MAX_DECODE_SPLITS * 8))
    graphs = n_slots * (BufferPool.size_class(cfg.vocab_size * 4) + BufferPool.size_class(4))
    # batched decode graphs (one per batch size 2 .. min(n_slots, 8)), each keeps B logits rows
    graphs += sum(BufferPool.size_class(b * cfg.vocab_size * 4) for b in range(2, min(n_slots, 8) + 1))
    return pool + 2 * decode + graphs


def default_arena_bytes(ctx: CudaContext, gguf: Any, n_ctx: int, n_slots: int) -> int:
    """Weights (repacked), the KV caches of n_slots sequences of n_ctx tokens, and the
    activations of one prefill chunk (`activation_bytes`)."""
    free = int(ctx.free_bytes() * 0.9)
    if gguf is None:
        return min(free, 4 << 30)
    want = arena_bytes_for(gguf, n_ctx, n_slots)
    if want > free:
        raise CudaError("arena", "CUDA_ERROR_OUT_OF_MEMORY",
                        f"the model needs ~{want / 2**30:.2f} GiB, {free / 2**30:.2f} GiB is free: "
                        "lower n_ctx / n_slots or use a smaller model")
    return want


def arena_bytes_for(gguf: Any, n_ctx: int, n_slots: int, rows: int = PREFILL_ROWS) -> int:
    """The device arena a model needs: repacked weights + KV caches + activations."""
    cfg = gguf.config
    weights = sum(int(v.data.nbytes) for v in gguf.tensors.values())
    kv = 2 * BufferPool.size_class(cfg.n_layers * n_ctx * cfg.n_kv_heads * cfg.head_dim * 2) * n_slots
    small = 1 << 20  # the step words, rope tables, alignment of each upload
    return int(weights * REPACK_GROWTH) + kv + activation_bytes(cfg, rows, n_slots=n_slots) + small


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
    return CudaBackend(ctx, kernels, DeviceArena(ctx.cu, size), kv_slots=n_slots)

