"""Matrix products straight on quantized GGUF blocks, for the CPU backend.

    qmatmul(x, w) -> y     x float32[n, in] (or [in]), w a TensorView or a `prepare`d handle
                           (shape (out, in)), y float32[n, out] = x @ dequantize(w).T

The product is exact float arithmetic on the dequantized weights with float32 accumulation:
no rounding of the activations happens here (a caller that wants llama.cpp's Q8 activation
rounding applies it to x first; the result then matches llama.cpp's integer dot products).

Paths, chosen per call:
  * numba, n <= MV_MAX_ROWS (decode): kernels that decode the blocks in registers
    (`blocks32`, `superblocks`; `tiled` for repacked handles).
  * numba, n <= MV_CHUNKED_ROWS (short prompts, batched decode): the same kernels on chunks of
    MV_MAX_ROWS rows; decoding the blocks again per chunk still beats a dequantized copy.
  * numba, larger n (prefill): a slab of rows is dequantized by a numba kernel into a small
    float32 buffer, then multiplied by BLAS (`x @ slab.T`); each weight is decoded once.
  * numpy (numba missing, `UKGPU_NO_NUMBA=1`, or `use_numba=False`): the same slab loop with
    `quants.dequantize`.  Types without a numba kernel take it too, with a one-time warning.
Slabs hold at most SLAB_ELEMENTS floats, so no dequantized copy of a matrix is ever kept.

`prepare(w)` returns a handle that `qmatmul` takes as well; for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 it
holds a repacked copy of exactly the original byte size whose decode is 1.2-2x faster
(drop the TensorView afterwards to keep memory at one copy).  `warmup()` compiles every
kernel on tiny inputs (numba caches the machine code on disk, so later start-ups only load).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from ukgpu.llama_core.errors import QuantError
from ukgpu.llama_core.gguf import quants
from ukgpu.llama_core.gguf.blocks import BLOCKS

MV_MAX_ROWS = 4  # activation rows one block-kernel call takes (decoded once for all of them)
MV_CHUNKED_ROWS = 16  # up to here chunks of MV_MAX_ROWS beat dequantize + BLAS (measured on the
#                      SmolLM2 / Qwen 0.5B matrices, 2 threads; 32 rows: the slab path wins)
SLAB_ELEMENTS = 1 << 18  # floats in one dequantized slab (1 MiB: stays in L2 for BLAS)
NUMBA_KERNEL_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K})
FAST_TYPES = NUMBA_KERNEL_TYPES | {T.F32, T.F16}  # F32: BLAS directly; F16: converted slabs + BLAS
_warned: set[T] = set()


@dataclass(frozen=True)
class PreparedWeight:
    """A matrix ready for `qmatmul`: the raw rows, or a repacked copy of the same size."""

    qtype: T
    shape: tuple[int, int]  # (out, in)
    rows: np.ndarray | None  # uint8[out, row_bytes], the GGUF blocks (zero copy)
    tiles: Any = None  # tiled.TilePack when repacked (then rows is None)

    @property
    def nbytes(self) -> int:
        if self.tiles is not None:
            return self.tiles.data.nbytes
        assert self.rows is not None  # a weight is either raw rows or tiles
        return self.rows.nbytes


def numba_enabled(use_numba: bool | None = None) -> bool:
    """Whether the numba kernels run: not when `use_numba` is False, UKGPU_NO_NUMBA=1 or no numba."""
    if use_numba is False or os.environ.get("UKGPU_NO_NUMBA", "") not in ("", "0"):
        return False
    return _kernels() is not None


def _kernels():
    """The kernel modules (imported on first use: importing numba costs ~0.5 s), or None."""
    global _KERNELS
    if _KERNELS is _UNSET:
        try:
            from ukgpu.llama_core.cpu import blocks32 as nb
            from ukgpu.llama_core.cpu import superblocks as nbk
            from ukgpu.llama_core.cpu import tiled as tile
            from ukgpu.llama_core.cpu.cache_stamp import refresh

            refresh([nb])  # machine code cached from older sources of any kernel file goes first
            _KERNELS = (nb, nbk, tile)
            _MV.update({T.Q4_0: nb.mv_q4_0, T.Q4_1: nb.mv_q4_1, T.Q5_0: nb.mv_q5_0, T.Q5_1: nb.mv_q5_1,
                        T.Q8_0: nb.mv_q8_0, T.Q4_K: nbk.mv_q4_k, T.Q5_K: nbk.mv_q5_k, T.Q6_K: nbk.mv_q6_k})
            _DQ.update({T.Q4_0: nb.dq_q4_0, T.Q4_1: nb.dq_q4_1, T.Q5_0: nb.dq_q5_0, T.Q5_1: nb.dq_q5_1,
                        T.Q8_0: nb.dq_q8_0, T.Q4_K: nbk.dq_q4_k, T.Q5_K: nbk.dq_q5_k, T.Q6_K: nbk.dq_q6_k})
        except ImportError:
            _KERNELS = None
    return _KERNELS


_UNSET = object()
_KERNELS: Any = _UNSET
_MV: dict = {}  # qtype -> mat-vec kernel on raw rows (filled by _kernels)
_DQ: dict = {}  # qtype -> slab dequantization kernel on raw rows


def prepare(w: Any, repack: bool = True, use_numba: bool | None = None) -> PreparedWeight:
    """A handle for `qmatmul`; with `repack` (and numba), a faster layout of the same byte size."""
    if isinstance(w, PreparedWeight):
        return w
    qtype, (n_out, n_in) = T(w.qtype), _matrix_shape(w.shape)
    rows = np.asarray(w.data).reshape(n_out, quants.row_bytes(qtype, n_in))
    if repack and numba_enabled(use_numba):
        tile = _kernels()[2]
        if tile.can_repack(qtype, n_out):
            return PreparedWeight(qtype, (n_out, n_in), None, tile.repack(rows, qtype))
    return PreparedWeight(qtype, (n_out, n_in), rows)


def _matrix_shape(shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise QuantError(f"qmatmul needs a 2-D weight (out, in), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def qmatmul(x: np.ndarray, w: Any, *, use_numba: bool | None = None) -> np.ndarray:
    """x float32[n, in] (or [in]) times the weight's transpose -> float32[n, out] (or [out])."""
    pw = w if isinstance(w, PreparedWeight) else prepare(w, repack=False)
    n_out, n_in = pw.shape
    vec = np.ndim(x) == 1
    x2 = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)  # [n, in]
    if x2.ndim != 2 or x2.shape[1] != n_in:
        raise QuantError(f"qmatmul: activations of shape {np.shape(x)} do not fit a ({n_out}, {n_in}) weight; "
                         f"pass [n, {n_in}]")
    if pw.qtype == T.F32:
        assert pw.rows is not None  # F32 is never tiled
        y = x2 @ pw.rows.view(np.float32).T
    elif numba_enabled(use_numba) and pw.qtype in NUMBA_KERNEL_TYPES:
        y = _numba_matmul(x2, pw)
    else:
        if pw.qtype not in FAST_TYPES and pw.qtype not in _warned:
            _warned.add(pw.qtype)
            warnings.warn(f"qmatmul: no fast kernel for {pw.qtype.name}; dequantizing it slab by slab "
                          f"(slow; requantize the model to Q4_K/Q8_0 for speed)", RuntimeWarning, stacklevel=2)
        y = _slab_matmul(x2, pw, _numpy_slab(pw))
    return y[0] if vec else y


def _numba_matmul(x: np.ndarray, pw: PreparedWeight) -> np.ndarray:
    if x.shape[0] > MV_CHUNKED_ROWS:
        return _slab_matmul(x, pw, _numba_slab(pw))
    y = np.empty((x.shape[0], pw.shape[0]), np.float32)
    kernel = _kernels()[2].matvec if pw.tiles is not None else _MV[pw.qtype]
    data = pw.tiles if pw.tiles is not None else pw.rows
    for r in range(0, x.shape[0], MV_MAX_ROWS):
        kernel(data, x[r:r + MV_MAX_ROWS], y[r:r + MV_MAX_ROWS])
    return y


def _raw_rows(pw: PreparedWeight, r0: int, r1: int) -> np.ndarray:
    """uint8[r1 - r0, row_bytes]: GGUF blocks of rows r0..r1 (rebuilt if repacked)."""
    if pw.tiles is None:
        assert pw.rows is not None
        return pw.rows[r0:r1]
    return _kernels()[2].unpack_rows(pw.tiles, r0, r1)


def _numba_slab(pw: PreparedWeight):
    """fill(r0, out float32[rows, in]): dequantize rows r0.. with a numba kernel."""
    if pw.tiles is not None:
        dequantize_tiles = _kernels()[2].dequantize_tiles
        return lambda r0, out: dequantize_tiles(pw.tiles, r0, out)
    dq = _DQ[pw.qtype]
    return lambda r0, out: dq(pw.rows, r0, out)


def _numpy_slab(pw: PreparedWeight):
    """fill(r0, out float32[rows, in]): dequantize rows r0.. with numpy."""

    def fill(r0: int, out: np.ndarray) -> None:
        raw = _raw_rows(pw, r0, r0 + out.shape[0])
        if pw.qtype == T.F16:
            out[...] = raw.view(np.float16)
        else:
            out[...] = quants.dequantize(raw.reshape(-1), pw.qtype, out.size).reshape(out.shape)

    return fill


def _slab_matmul(x: np.ndarray, pw: PreparedWeight, dequant_slab) -> np.ndarray:
    """y = x @ W.T, W dequantized SLAB_ELEMENTS at a time into one reused buffer."""
    n_out, n_in = pw.shape
    y = np.empty((x.shape[0], n_out), np.float32)
    step = max(1, min(n_out, SLAB_ELEMENTS // n_in))
    if pw.tiles is not None:  # slabs of whole tiles
        step = max(pw.tiles.rt, step // pw.tiles.rt * pw.tiles.rt)
    buf = np.empty((step, n_in), np.float32)
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        slab = buf[: r1 - r0]
        dequant_slab(r0, slab)
        y[:, r0:r1] = x @ slab.T  # (a strided `out=` would bypass BLAS)
    return y


def random_blocks(qtype: T, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """uint8[n_out, row_bytes]: random quants with sane scales (every f16 field ~ +-1e-2..1e-1).

    F32/F16 get normal values.  Used by warmup, the tests and the benchmark."""
    qtype = T(qtype)
    if qtype in (T.F32, T.F16):
        vals = rng.standard_normal((n_out, n_in)).astype(np.float16 if qtype == T.F16 else np.float32)
        return vals.view(np.uint8)
    block = BLOCKS[qtype]
    raw = rng.integers(0, 256, (n_out * n_in // block.elems, block.nbytes), dtype=np.uint8)
    for f in block.f16_scales:
        mag = rng.uniform(0.01, 0.1, raw.shape[0]) * rng.choice([-1.0, 1.0], raw.shape[0])
        raw[:, f.offset : f.offset + 2] = mag.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_out, -1)


def warmup() -> float:
    """Compile (or load from numba's cache) every kernel on tiny inputs; seconds taken."""
    t0 = time.perf_counter()
    if not numba_enabled():
        return 0.0
    rng = np.random.default_rng(0)
    for q in sorted(NUMBA_KERNEL_TYPES):
        raw = random_blocks(q, 8, 256, rng)
        raw.flags.writeable = False  # as a model's rows, mapped read-only (numba types them apart)
        for pw in (prepare(RawWeight(q, (8, 256), raw), repack=False), prepare(RawWeight(q, (8, 256), raw))):
            for n in (1, MV_CHUNKED_ROWS + 1):  # the block kernels, then the slab path
                qmatmul(rng.standard_normal((n, 256)).astype(np.float32), pw)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class RawWeight:
    """The three TensorView fields qmatmul reads (for weights that do not come from a file)."""

    qtype: T
    shape: tuple[int, int]
    data: np.ndarray
