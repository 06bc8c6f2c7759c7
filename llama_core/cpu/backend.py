"""`CpuBackend`: the reference implementation of `Backend` in numpy.

Weights stay as raw GGUF blocks in the memory-mapped file.  Matrix products
run on the quantized blocks through `cpu_kernels.qmatmul` (numba; numpy when numba is missing).
`dtype=np.float64` runs every activation, the KV cache and the products in
double precision instead (a reference mode): the weight is then dequantized a
slab of rows at a time, so no dequantized copy of the model is ever kept.

Products are exact float math on the dequantized weights by default (`activations="f32"`, the
reference).  llama.cpp's CPU path instead rounds each activation vector to 8-bit blocks before
its dot products, which moves its logits by a few % of their range (docs/benchmarks/cpu.md);
`activations="q8"` (or UKGPU_CPU_ACTIVATIONS=q8) does the same rounding in every product of up
to MV_MAX_ROWS rows (each decode step) and runs those products on integer dot products
(`cpu.int8_act`), 1.1-4.5x faster; longer prompts keep the exact products.

Decode steps, `usage` and `close` are the `Backend` defaults: a decode step is the model's own
one-token forward, and there is no device memory to report or free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ukgpu.llama_core.backend import Allocator, Backend, KVCache, RopeConfig, check_decode_positions
from ukgpu.llama_core.cpu import matmul as cpu_kernels
from ukgpu.llama_core.errors import QuantError
from ukgpu.llama_core.gguf import quants
from ukgpu.llama_core.gguf.file import TensorView

_SLAB_ELEMENTS = 1 << 22  # dequantized elements per slab in float64 mode (32 MiB)
_DENSE_TYPES = {"F32": np.float32, "F16": np.float16}
# rows up to which rmsnorm and SwiGLU run the compiled step's own loops (decode sizes: a step's
# rows, or its heads for q/k norms), so the generic path and `cpu.decode_step` agree to the bit
_COMPILED_ROWS = 64
ACTIVATIONS = ("f32", "q8")  # exact float activations; 8-bit blocks as llama.cpp rounds them
# the ops `cpu.decode_step` runs in its compiled step (a subclass overriding one keeps Model.forward)
_STEP_OPS = ("embedding", "matmul", "rmsnorm", "rope", "attention", "rmsnorm_heads", "swiglu", "add",
             "norm_matmuls", "norm_glu", "matmul_add", "attend", "attend_batch", "take_rows", "concat_rows",
             "to_host")


def _dequantize_rows(raw_rows: np.ndarray, qtype: Any, row_len: int) -> np.ndarray:
    """uint8[rows, row_bytes] raw blocks -> float32[rows, row_len]."""
    n_rows = raw_rows.shape[0]
    flat = np.ascontiguousarray(raw_rows).reshape(-1)
    return quants.dequantize(flat, qtype, n_rows * row_len).reshape(n_rows, row_len)


def _rope_rows_numpy(x, n_heads, start_pos, cos, sin, n_rot, neox):
    """`cpu_ops_nb.rope_rows` without numba: the same rotation, vectorized over rows and heads."""
    n, width = x.shape
    hd, half = width // n_heads, n_rot // 2
    xh = x.reshape(n, n_heads, hd)  # a view: rotated in place
    c = cos[start_pos:start_pos + n, :half][:, None, :]  # [n, 1, half]
    s = sin[start_pos:start_pos + n, :half][:, None, :]
    ia, ib = (np.s_[..., :half], np.s_[..., half:n_rot]) if neox else \
        (np.s_[..., 0:n_rot:2], np.s_[..., 1:n_rot:2])
    a, b = xh[ia].copy(), xh[ib].copy()
    xh[ia] = a * c - b * s
    xh[ib] = a * s + b * c


def _hidden_keys(start_pos: int, n: int, end: int, window: int) -> np.ndarray | None:
    """bool[n, end]: the keys query i (position start_pos+i) may not see (later ones, and with
    a window those at or before position - window); None when every query sees every key."""
    pos = start_pos + np.arange(n)[:, None]  # [n, 1]
    keys = np.arange(end)[None, :]  # [1, T]
    hidden = keys > pos
    if window > 0:
        hidden |= keys <= pos - window
    return hidden if hidden.any() else None


def _numba_ops():
    """The compiled rope / decode-attention loops, or None (no numba, or UKGPU_NO_NUMBA=1)."""
    if not cpu_kernels.numba_enabled():
        return None
    from ukgpu.llama_core.cpu import rope_attention as cpu_ops_nb

    return cpu_ops_nb


def _activations(asked: str | None, use_kernels: bool) -> str:
    """The activation rounding to use: `asked`, else UKGPU_CPU_ACTIVATIONS, else "f32"."""
    mode = asked or os.environ.get("UKGPU_CPU_ACTIVATIONS", "") or "f32"
    if mode not in ACTIVATIONS:
        raise QuantError(f"CPU activations {mode!r}: use 'f32' (exact) or 'q8' (8-bit blocks, as llama.cpp)")
    if mode == "q8" and not use_kernels:
        raise QuantError("CPU activations 'q8' need the numba kernels in float32 (numba is off, missing, "
                         "or the backend runs in float64)")
    return mode


def _int8():
    """The 8-bit activation kernels (imported on first use, with numba)."""
    from ukgpu.llama_core.cpu import int8_act

    return int8_act


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


@dataclass(frozen=True)
class CpuWeight:
    """A GGUF tensor on the CPU: dense numpy data, or raw quantized rows."""

    shape: tuple[int, ...]  # numpy order: (out, in) for matrices
    qtype: Any
    dense: np.ndarray | None  # F32/F16 tensors, shaped like `shape`
    raw: np.ndarray | None  # uint8[out, row_bytes] for quantized matrices
    kernel: Any  # the `cpu_kernels.prepare` handle of a quantized matrix


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, dtype: npt.DTypeLike = np.float32, alloc: Allocator | None = None,
                 activations: str | None = None) -> None:
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        self.alloc = alloc or _zeros
        self.use_kernels = self.dtype == np.float32
        self.activations = _activations(activations, self.use_kernels and cpu_kernels.numba_enabled())
        # decode steps batch up to the rows the block kernels take in one pass over the weights
        self.max_batch = cpu_kernels.MV_MAX_ROWS
        self._ops = _numba_ops()
        self._rope_tables: dict[RopeConfig, tuple[np.ndarray, np.ndarray]] = {}
        self._plans: dict[int, Any] = {}  # id(model) -> its DecodePlan, or None (generic path)

    # --- whole steps -------------------------------------------------------
    def decode(self, model: Any, token: int, start_pos: int, kv: KVCache) -> np.ndarray:
        """One compiled call for the whole step where the model fits it (`cpu.decode_step`);
        `Model.forward` otherwise, or with UKGPU_CPU_FUSED_DECODE=0."""
        plan = self._plan(model)
        if plan is None:
            return super().decode(model, token, start_pos, kv)
        check_decode_positions([start_pos], [kv])
        return plan.step(token, start_pos, kv)

    def decode_batch(self, model: Any, tokens: np.ndarray, positions: Sequence[int],
                     kvs: Sequence[KVCache]) -> np.ndarray:
        """B sequences' step in one compiled call where the model fits it (`Model.forward_batch`
        otherwise); each weight is read once for the batch either way."""
        plan = self._plan(model)
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if plan is None or not 0 < len(tokens) <= self.max_batch or not len(tokens) == len(positions) == len(kvs) \
                or len({kv.n_ctx for kv in kvs}) > 1:
            return super().decode_batch(model, tokens, positions, kvs)  # (it explains a bad batch)
        check_decode_positions(positions, kvs)
        return plan.step_batch(tokens, positions, kvs)

    def _plan(self, model: Any) -> Any:
        if os.environ.get("UKGPU_CPU_FUSED_DECODE", "1") == "0":
            return None
        key = id(model)
        if key not in self._plans:
            from ukgpu.llama_core.cpu.decode_step import DecodePlan

            # only the real forward pass on this class's own ops is replaced (a model with its own
            # forward, or a subclass of this backend that changes an op, keeps the generic path)
            generic = getattr(model, "has_generic_forward", None)
            real = generic is not None and generic() and all(
                getattr(type(self), op) is getattr(CpuBackend, op) for op in _STEP_OPS)
            self._plans[key] = DecodePlan.build(model, self) if real else None  # holds model: id stays its own
        return self._plans[key]

    # --- weights and cache -------------------------------------------------
    def prepare_weight(self, view: TensorView) -> CpuWeight:
        shape = tuple(int(s) for s in view.shape)
        if view.qtype.name in _DENSE_TYPES and len(shape) == 1:
            dense = view.data.view(_DENSE_TYPES[view.qtype.name]).astype(self.dtype, copy=False)
            return CpuWeight(shape, view.qtype, dense, None, None)
        int8 = self.activations == "q8" and view.qtype in _int8().KINDS  # int8 kernels read GGUF rows
        kernel = cpu_kernels.prepare(view, repack=not int8) if self.use_kernels else None
        if kernel is not None and kernel.rows is None:  # repacked: the mapped copy is cold now
            view.release_pages()
        return CpuWeight(shape, view.qtype, None, view.rows(), kernel)

    def alloc_kv(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int) -> KVCache:
        shape = (n_layers, n_kv_heads, n_ctx, head_dim)
        return KVCache(self.alloc(shape, self.dtype), self.alloc(shape, self.dtype), n_ctx)

    def copy_kv(self, src: KVCache, dst: KVCache, n_tokens: int) -> None:
        dst.k[:, :, :n_tokens] = src.k[:, :, :n_tokens]
        dst.v[:, :, :n_tokens] = src.v[:, :, :n_tokens]

    def _rows(self, w: CpuWeight, rows: Any) -> np.ndarray:
        """Dequantized rows of a matrix weight: [len(rows), in] in self.dtype."""
        assert w.raw is not None  # only quantized matrices are read by rows
        return _dequantize_rows(w.raw[rows], w.qtype, w.shape[-1]).astype(self.dtype, copy=False)

    # --- ops ---------------------------------------------------------------
    def embedding(self, table: CpuWeight, tokens: np.ndarray) -> np.ndarray:
        return self._rows(table, np.asarray(tokens, dtype=np.int64))  # [n, d]

    def matmul(self, x: np.ndarray, weight: CpuWeight, bias: Any | None = None) -> np.ndarray:
        if self.activations == "q8" and x.shape[0] <= cpu_kernels.MV_MAX_ROWS and weight.kernel.rows is not None \
                and weight.kernel.qtype in _int8().KINDS:
            out = np.empty((x.shape[0], weight.shape[0]), np.float32)
            pw = weight.kernel
            _int8().mv_int8(_int8().KINDS[pw.qtype], pw.rows.reshape(-1), pw.shape[0], pw.rows.shape[1],
                            np.ascontiguousarray(x, np.float32), out)
        elif self.use_kernels:
            out = cpu_kernels.qmatmul(x, weight.kernel)
        else:
            out = self._slab_matmul(x, weight)
        if bias is not None:
            out += bias.dense
        return out  # [n, out]

    def _slab_matmul(self, x: np.ndarray, w: CpuWeight) -> np.ndarray:
        n_out, n_in = w.shape
        out = np.empty((x.shape[0], n_out), dtype=self.dtype)
        step = max(1, _SLAB_ELEMENTS // n_in)
        for r0 in range(0, n_out, step):
            r1 = min(n_out, r0 + step)
            out[:, r0:r1] = x @ self._rows(w, slice(r0, r1)).T
        return out

    def rmsnorm(self, x: np.ndarray, weight: CpuWeight, eps: float) -> np.ndarray:
        # a double-precision sum of squares; then scale and weight in the activation dtype
        if self._ops and x.dtype == np.float32 and x.shape[0] <= _COMPILED_ROWS:  # decode: as the step
            out = np.empty_like(x)
            self._ops.rmsnorm_rows(np.ascontiguousarray(x), weight.dense, np.float32(eps), out)
            return out
        ms = (np.einsum("nd,nd->n", x, x, dtype=np.float64) / x.shape[1]).astype(self.dtype)
        scale = self.dtype.type(1.0) / np.sqrt(ms + self.dtype.type(eps))  # [n]
        out = x * scale[:, None]
        out *= weight.dense
        return out

    def _rope_table(self, rope: RopeConfig, end: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._rope_tables.get(rope)
        cos, sin = cached if cached is not None else (np.empty((0, 0)), np.empty((0, 0)))
        if cos.shape[0] < end:
            size = max(end, 2 * cos.shape[0], 256)
            angles = np.outer(np.arange(size, dtype=np.float64), rope.inv_freq())  # [pos, n_rot/2]
            cos = (rope.mscale * np.cos(angles)).astype(self.dtype)
            sin = (rope.mscale * np.sin(angles)).astype(self.dtype)
            self._rope_tables[rope] = (cos, sin)
        return cos, sin

    def rope(self, x: np.ndarray, start_pos: int, n_heads: int, rope: RopeConfig) -> np.ndarray:
        cos, sin = self._rope_table(rope, start_pos + x.shape[0])  # [pos, n_rot/2]
        rotate = self._ops.rope_rows if self._ops else _rope_rows_numpy
        rotate(x, n_heads, start_pos, cos, sin, rope.n_rot, rope.neox)
        return x

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, kv: KVCache, layer: int,
                  start_pos: int, window: int = 0, scale: float | None = None) -> np.ndarray:
        n = q.shape[0]
        _, n_kv, _, hd = kv.k.shape
        n_heads = q.shape[1] // hd
        group = n_heads // n_kv
        end = start_pos + n
        factor = self.dtype.type(1.0 / np.sqrt(hd) if scale is None else scale)
        kv.k[layer, :, start_pos:end] = k.reshape(n, n_kv, hd).transpose(1, 0, 2)
        kv.v[layer, :, start_pos:end] = v.reshape(n, n_kv, hd).transpose(1, 0, 2)
        first = max(0, end - window) if window > 0 else 0  # the earliest key any query sees
        if n == 1 and self._ops:  # decode: one fused loop instead of a dozen small numpy calls
            out = np.empty_like(q[0])
            self._ops.attend_one(q[0], kv.k[layer], kv.v[layer], end, factor, out, first)
            return out[None]
        keys, values = kv.k[layer, :, :end], kv.v[layer, :, :end]  # [Hkv, T, hd]
        qg = q.reshape(n, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n, hd)
        scores = qg @ keys.transpose(0, 2, 1)  # [Hkv, G*n, T]
        scores *= factor
        hidden = _hidden_keys(start_pos, n, end, window)  # [n, T]
        if hidden is not None:
            scores.reshape(n_kv, group, n, end)[:, :, hidden] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ values  # [Hkv, G*n, hd]
        return out.reshape(n_kv, group, n, hd).transpose(2, 0, 1, 3).reshape(n, n_heads * hd)

    def rmsnorm_heads(self, x: np.ndarray, weight: CpuWeight, n_heads: int, eps: float) -> np.ndarray:
        n, width = x.shape
        heads = x.reshape(n * n_heads, width // n_heads)  # [n*H, hd]
        return self.rmsnorm(heads, weight, eps).reshape(n, width)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        if self._ops and gate.dtype == np.float32 and gate.shape[0] <= _COMPILED_ROWS and gate.flags.c_contiguous \
                and up.flags.c_contiguous:  # decode: the step's own loop (numpy's SIMD exp wins on prompts)
            self._ops.swiglu_rows(gate, up)
            return gate
        # silu(g) = g * sigmoid(g); exp(-g) may overflow to inf for very negative g -> 0, fine
        with np.errstate(over="ignore"):
            gate /= 1.0 + np.exp(-gate)
        gate *= up
        return gate

    def gelu_gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """gelu_tanh(gate) * up as llama.cpp's CPU path computes it: GELU read from a
        half-precision table, so the argument and the GELU are rounded to float16 (between -10
        and 10; 0 below, the identity above).  Exact GELU moves gemma3-270m's logits by up to
        1.4e-3 of their range from llama.cpp's, the table 8e-4 (tests/unit/test_model_families.py)."""
        x = gate.astype(np.float16).astype(np.float64)
        g = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * x * (1.0 + 0.044715 * x * x)))
        g = g.astype(np.float16).astype(self.dtype)
        g[gate <= -10.0] = 0.0
        high = gate >= 10.0
        g[high] = gate[high]
        g *= up
        return g

    def scale(self, x: np.ndarray, s: float) -> np.ndarray:
        x *= self.dtype.type(s)
        return x

    def add(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x += y
        return x

    def take_rows(self, x: np.ndarray, rows: slice) -> np.ndarray:
        return x[rows]

    def concat_rows(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=0)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)
