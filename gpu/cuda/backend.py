"""`CudaBackend`: the `Backend` interface on an NVIDIA GPU, running the manifest's kernels.

Weights are repacked (`ptx_kernels.repack`) and uploaded once into the device arena; the KV cache
lives on the device in float16, laid out (n_ctx, Hkv, hd) per layer as the attention kernels read
it.  Activations are `DeviceBuffer`s recycled through a `BufferPool`.  Every op enqueues kernels
on one stream; only `to_host` waits.  Matrix products pick the mat-vec kernels for 1..8 rows and
the tensor-core GEMM above that.  Rope reads a float64 table of each `RopeConfig`'s effective
per-pair frequencies (`RopeConfig.inv_freq()`), uploaded once per config (a model may have two:
gemma3's local and global layers) on its first eager use, so a recorded step never uploads it.
Per-layer constants (sliding window, score scale, rope table) are launch values, fixed per layer,
so the recorded step stays valid for every position.

Positions, KV row indices and key counts are read by the kernels from device memory, never baked
into launches, so a decode step can be captured once as a CUDA graph and replayed per token
(`graph.DecodeGraphs`, used by `decode` / `decode_greedy`; the capture contract is in
`ukgpu.llama_core.backend`): while `capturing`, the ops read token, position and key count from
the graph's `StepBuffers` and `to_host` only names the output.  Creation with the device and
model checks, and probing, live in `select`; choosing between this backend and the CPU one in
`ukgpu.llama_core.backend_choice`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ukgpu.gpu.cuda.arena import BufferPool, DeviceArena, DeviceBuffer
from ukgpu.gpu.cuda.attention_ops import AttentionOps, CudaUnsupported
from ukgpu.gpu.cuda.driver import CudaContext
from ukgpu.gpu.cuda.fused_ops import FusedMatvecOps
from ukgpu.gpu.cuda.graph import DecodeGraphs, StepBuffers
from ukgpu.gpu.cuda.kv_slab import KvPool
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.llama_core.backend import Backend, KVCache, RopeConfig
from ukgpu.ptx_kernels.loader import (
    MATVEC_MAX_ROWS,
    argmax_split,
    embedding_entry,
    gemm_entry,
    matvec_entry,
)
from ukgpu.ptx_kernels.repack import FORMATS, repack


@dataclass
class DeviceWeight:
    """One GGUF tensor on the device: repacked planes of an (N, K) matrix, or a float32 vector."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    planes: dict[str, int]  # "w_q"/"w_s"/"w_m" -> device address (matrices)
    vec: int = 0  # float32[shape[0]] (vectors: norms, biases)
    nbytes: int = 0  # device bytes of the planes (what a mat-vec reads)


class CudaBackend(AttentionOps, FusedMatvecOps, Backend):
    name = "cuda"
    max_prefill_rows = 512  # prompts run in passes of this many rows: what the arena's share holds

    max_batch = MATVEC_MAX_ROWS  # sequences one decode step carries (the b8 mat-vec kernels)

    def __init__(self, ctx: CudaContext, kernels: KernelSet, arena: DeviceArena, kv_slots: int = 1):
        self.ctx, self.cu, self.kernels, self.arena = ctx, ctx.cu, kernels, arena
        self.pool = BufferPool(arena)
        self.kv_pool = KvPool(arena, kv_slots)  # one slab of kv_slots caches per cache shape
        self.step = StepBuffers(arena.alloc(StepBuffers.NBYTES, "step"))
        self.capturing = False  # ops read token/position from `step` instead of uploading
        self.captured_output: DeviceBuffer | None = None
        self._forward_id = 0
        self._live: dict[tuple[int, int, int], DeviceBuffer] = {}  # this forward's ids/positions
        self.graphs = DecodeGraphs(self)
        self._weights: dict[tuple, DeviceWeight] = {}  # uploaded once per GGUF tensor
        self._rope_tables: dict[RopeConfig, int] = {}  # float64 inv_freq, once per config
        self._manifest_names = set(kernels.manifests.names())  # fused kernels used where shipped

    # --- transfers -----------------------------------------------------------
    def upload(self, arr: np.ndarray, tag: str) -> int:
        self.ctx.ensure_current()
        arr = np.ascontiguousarray(arr)
        ptr = self.arena.alloc(arr.nbytes, tag)
        self.cu.cuMemcpyHtoDAsync(ptr, arr.ctypes.data, arr.nbytes, self.ctx.stream)
        return ptr

    def new(self, shape: tuple[int, ...], dtype: Any = np.float32) -> DeviceBuffer:
        dtype = np.dtype(dtype)
        block = self.pool.take(math.prod(shape) * dtype.itemsize)
        return DeviceBuffer(block.ptr, tuple(shape), dtype, block)

    def _upload_act(self, arr: np.ndarray) -> DeviceBuffer:
        self.ctx.ensure_current()
        arr = np.ascontiguousarray(arr)
        buf = self.new(arr.shape, arr.dtype)
        self.cu.cuMemcpyHtoDAsync(buf.ptr, arr.ctypes.data, arr.nbytes, self.ctx.stream)
        return buf  # pageable source: staged by the driver before the call returns

    def to_host(self, x: DeviceBuffer) -> np.ndarray:
        if self.capturing:  # inside a graph capture: the graph's output, read after replay
            self.captured_output = x
            return np.zeros(x.shape, dtype=x.dtype)
        out = np.empty(x.shape, dtype=x.dtype)
        self.ctx.ensure_current()
        self.ctx.sync()
        self.cu.cuMemcpyDtoHAsync(out.ctypes.data, x.ptr, x.nbytes, self.ctx.stream)
        self.ctx.sync()
        return out

    def launch(self, name: str, **values: Any) -> None:
        self.kernels.launch(name, values, self.ctx.stream, sync=False if self.capturing else None)

    # --- weights and cache -----------------------------------------------------
    def prepare_weight(self, view: Any) -> DeviceWeight:
        key = (view.name, np.asarray(view.data).__array_interface__["data"][0], tuple(view.shape))
        if key not in self._weights:
            self._weights[key] = self._prepare(view)
        return self._weights[key]

    def _prepare(self, view: Any) -> DeviceWeight:
        qtype = view.qtype.name
        shape = tuple(int(s) for s in view.shape)
        if len(shape) == 1:
            return self._prepare_vector(view, qtype, shape)
        if qtype not in FORMATS:
            raise CudaUnsupported(f"{view.name} is {qtype}, which the CUDA kernels do not read "
                                  f"(supported: {', '.join(FORMATS)}); use the CPU backend")
        n, k = shape
        packed = repack(np.asarray(view.data), qtype, n, k)
        arrays = packed.planes()
        planes = {f"w_{p}": self.upload(a, "weights") for p, a in arrays.items()}
        return DeviceWeight(view.name, qtype, shape, planes,
                            nbytes=sum(int(a.nbytes) for a in arrays.values()))

    def _prepare_vector(self, view: Any, qtype: str, shape: tuple[int, ...]) -> DeviceWeight:
        from ukgpu.llama_core.gguf.quants import dequantize

        data = np.asarray(view.data)
        vec = data.view(np.float32) if qtype == "F32" else dequantize(data, view.qtype, shape[0])
        vec = np.ascontiguousarray(vec, dtype=np.float32).reshape(-1)
        return DeviceWeight(view.name, qtype, shape, {}, vec=self.upload(vec, "weights"))

    def alloc_kv(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int) -> KVCache:
        """A zeroed float16 cache in a slot of the KV pool's slab of this shape (`kv_slab`); the
        slot returns to the slab when the KVCache goes."""
        self.ctx.ensure_current()
        halves = self.kv_pool.take((n_layers, n_ctx, n_kv_heads, head_dim))
        words = n_ctx * n_kv_heads * head_dim // 2  # a layer's rows of one slot, in 32-bit words
        for half in halves:
            for i in range(n_layers):
                self.cu.cuMemsetD32Async(half.layer(i), 0, words, self.ctx.stream)
        return KVCache(halves[0], halves[1], n_ctx)

    def copy_kv(self, src: KVCache, dst: KVCache, n_tokens: int) -> None:
        """Rows 0 .. n_tokens-1 of every layer (contiguous: a layer is (n_ctx, Hkv, hd) float16),
        device to device on the stream."""
        self.ctx.ensure_current()
        for s, d in ((src.k, dst.k), (src.v, dst.v)):
            nbytes = n_tokens * s.n_kv_heads * s.head_dim * 2
            for i in range(s.n_layers):
                self.cu.cuMemcpyDtoDAsync(d.layer(i), s.layer(i), nbytes, self.ctx.stream)

    # --- per-forward device words --------------------------------------------
    def _ids(self, tokens: np.ndarray) -> int:
        if self.capturing:
            return self.step.ids
        buf = self._upload_act(np.asarray(tokens, dtype=np.int32).reshape(-1))
        self._live[(self._forward_id, -1, 0)] = buf  # held for this forward pass
        return buf.ptr

    def _pos_lens(self, start_pos: int, n: int) -> tuple[int, int]:
        """Device int32 positions start..start+n-1 (= KV rows) and the key count start+n."""
        if self.capturing:
            return self.step.pos, self.step.lens
        key = (self._forward_id, start_pos, n)
        if key not in self._live:
            words = np.zeros(-(-n // 4) * 4 + 8, dtype=np.int32)
            words[:n] = np.arange(start_pos, start_pos + n)
            words[-8] = start_pos + n  # lens at a 16-byte aligned offset, then slot 0 at +16
            self._live[key] = self._upload_act(words)
        buf = self._live[key]
        return buf.ptr, buf.ptr + (buf.size - 8) * 4

    # --- ops ---------------------------------------------------------------------
    def embedding(self, table: DeviceWeight, tokens: np.ndarray) -> DeviceBuffer:
        self._forward_id += 1  # every forward pass starts here
        self._live.clear()
        n, k = len(np.asarray(tokens).reshape(-1)), table.shape[1]
        out = self.new((n, k))
        self.launch(embedding_entry(table.qtype), **table.planes, ids=self._ids(tokens), out=out.ptr,
                    K=k, T=n)
        return out

    def matmul(self, x: DeviceBuffer, weight: DeviceWeight, bias: DeviceWeight | None = None
               ) -> DeviceBuffer:
        m, (n_out, k) = x.shape[0], weight.shape
        y = self.new((m, n_out))
        if m <= MATVEC_MAX_ROWS:
            self.launch(matvec_entry(weight.qtype, m), **weight.planes, x=x.ptr, y=y.ptr, N=n_out,
                        K=k, B=m)
        else:
            self.launch(gemm_entry(weight.qtype), **weight.planes, x=x.ptr, y=y.ptr, M=m, N=n_out,
                        K=k)
        if bias is not None:
            self.launch("add_bias_f32", x=y.ptr, bias=bias.vec, out=y.ptr, n=y.size, N=n_out)
        return y

    def rmsnorm(self, x: DeviceBuffer, weight: DeviceWeight, eps: float) -> DeviceBuffer:
        y = self.new(x.shape)
        self.launch("rmsnorm_f32", x=x.ptr, weight=weight.vec, y=y.ptr, D=x.shape[1], eps=eps,
                    M=x.shape[0])
        return y

    def concat_rows(self, parts: list[DeviceBuffer]) -> DeviceBuffer:
        """The rows of `parts` stacked into a new buffer (device-to-device copies)."""
        width = parts[0].shape[1]
        out = self.new((sum(p.shape[0] for p in parts), width))
        at = out.ptr
        for part in parts:
            self.cu.cuMemcpyDtoDAsync(at, part.ptr, part.nbytes, self.ctx.stream)
            at += part.nbytes
        return out

    def swiglu(self, gate: DeviceBuffer, up: DeviceBuffer) -> DeviceBuffer:
        self.launch("swiglu_f32", gate=gate.ptr, up=up.ptr, out=gate.ptr, n=gate.size)
        return gate

    def rmsnorm_heads(self, x: DeviceBuffer, weight: DeviceWeight, n_heads: int,
                      eps: float) -> DeviceBuffer:
        """Per-head RMSNorm: rmsnorm_f32 over the n * n_heads rows of hd values."""
        n, width = x.shape
        y = self.new(x.shape)
        self.launch("rmsnorm_f32", x=x.ptr, weight=weight.vec, y=y.ptr, D=width // n_heads,
                    eps=eps, M=n * n_heads)
        return y

    def gelu_gate(self, gate: DeviceBuffer, up: DeviceBuffer) -> DeviceBuffer:
        self.launch("geglu_f32", gate=gate.ptr, up=up.ptr, out=gate.ptr, n=gate.size)
        return gate

    def scale(self, x: DeviceBuffer, s: float) -> DeviceBuffer:
        self.launch("scale_f32", x=x.ptr, out=x.ptr, n=x.size, s=float(s))
        return x

    def add(self, x: DeviceBuffer, y: DeviceBuffer) -> DeviceBuffer:
        self.launch("add_f32", a=x.ptr, b=y.ptr, out=x.ptr, n=x.size)
        return x

    def take_rows(self, x: DeviceBuffer, rows: slice) -> DeviceBuffer:
        start, stop, step = rows.indices(x.shape[0])
        if step != 1:
            raise CudaUnsupported("take_rows needs a contiguous slice")
        return x.rows(start, stop)

    def argmax(self, logits: DeviceBuffer) -> DeviceBuffer:
        """int32[rows]: the greedy token of each row of logits [rows, vocab], on the device: split
        over ~150 programs a row then reduced (`argmax_part_f32`, `argmax_reduce_f32`) where
        shipped, else one program a row."""
        rows, vocab = logits.shape
        out = self.new((rows,), np.int32)
        if not {"argmax_part_f32", "argmax_reduce_f32"} <= self._manifest_names:
            self.launch("argmax_f32", logits=logits.ptr, out=out.ptr, V=vocab, B=rows)
            return out
        span, parts = argmax_split(vocab)
        val, idx = self.new((rows, parts)), self.new((rows, parts), np.int32)
        self.launch("argmax_part_f32", logits=logits.ptr, part_val=val.ptr, part_idx=idx.ptr, V=vocab,
                    span=span, B=rows)
        self.launch("argmax_reduce_f32", part_val=val.ptr, part_idx=idx.ptr, out=out.ptr, P=parts, B=rows)
        return out

    # --- decode through captured graphs ----------------------------------------
    def decode(self, model: Any, token: int, start_pos: int, kv: KVCache) -> np.ndarray:
        """Logits float32[1, vocab] of `token` at `start_pos` (same as model.forward, but
        replayed from a CUDA graph after the first step of each KV cache)."""
        return self.graphs.step(model, int(token), int(start_pos), kv, greedy=False)

    def decode_batch(self, model: Any, tokens: np.ndarray, positions: Sequence[int],
                     kvs: Sequence[KVCache]) -> np.ndarray:
        """Logits float32[B, vocab] of one step of B sequences, replayed from the batch-size-B
        graph of their slab after its first step (`graph.DecodeGraphs.step_batch`)."""
        return self.graphs.step_batch(model, np.asarray(tokens).reshape(-1), list(positions), list(kvs))

    def decode_greedy(self, model: Any, token: int, start_pos: int, kv: KVCache) -> int:
        """The argmax token after `token` at `start_pos`, computed on the device."""
        return self.graphs.step(model, int(token), int(start_pos), kv, greedy=True)

    def usage(self) -> str:
        """The device arena's use: "<used>/<capacity> MiB used: " then MiB per tag."""
        return self.arena.usage()

    def runtime_note(self) -> str:
        return self.graphs.eager_reason  # a refused capture: decode runs eagerly

    def close(self) -> None:
        """Destroy the decode graphs and free the device arena; the backend is unusable after."""
        self.ctx.ensure_current()
        self.ctx.sync()
        self.graphs.release()
        self.arena.free()

