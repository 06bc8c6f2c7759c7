"""Repack raw GGUF (ggml) weight blocks into the device layout the kernels read.

The CUDA backend runs `repack(raw, qtype, n_rows, n_cols)` once per weight at upload time and
copies each plane of the result to the device.  Every layout is row-major over the numpy (out, in)
= (N, K) view of the weight (GGUF dims reversed), and separates quants from scales so that a
kernel reads each plane with contiguous, vectorizable loads.

Planes (N rows, K columns, G = group size):

| kind     | qtypes             | `q` plane              | `s` plane (scale)    | `m` plane (offset)   | w[n, k] |
|----------|--------------------|------------------------|----------------------|----------------------|---------|
| nibble   | Q4_0, Q4_1, Q4_K   | uint8 (N, K/2)         | (N, K/32)            | (N, K/32)            | s*q + m |
| int8     | Q8_0, Q5_0, Q6_K   | int8 (N, K)            | (N, K/G)             | none                 | s*q     |
| float    | F16, F32           | float16/float32 (N, K) | none                 | none                 | q       |

"nibble" packing: every run of 32 elements is 16 bytes; byte i holds element i in its low
nibble and element i+16 in its high nibble (ggml's Q4_0/Q4_1 order; Q4_K is reordered into it).
Scale dtypes: float16 for Q4_0/Q4_1/Q5_0/Q8_0 (the block scale as stored; Q4_0's offset -8*d is
exact in float16), float32 for Q4_K (d*sc, -dmin*m) and Q6_K (d*sc), so the product of the
super-block scale and the sub-block scale stays exact.  Group size G is 32, except Q6_K (16).
Q5_0 stores q-16 and Q6_K q-32 as signed int8.  Every repack is lossless: `dequantize_repacked`
equals ggml's dequantization bit for bit.

`LAYOUTS` (keyed by gguf's `GGMLQuantizationType`, as `TensorView.qtype` is) holds only what is
the device's own: kind, group, scale dtype, offset plane.  Block sizes and field offsets are
llama_core's `gguf.blocks` table, the bit unpacking (Q5_0's fifth bit, Q4_K's six-bit scales,
Q6_K's split quants) its `gguf.quants`, both used here as they are.  `FORMATS` is the same layouts by kernel name (the
manifest's `qtype`, entry names, `Repacked.qtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.gguf.blocks import BLOCKS
from ukgpu.llama_core.gguf.quants import Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, k4_nibbles, k4_sub_scales


class RepackError(UkgpuError):
    """A weight cannot be repacked (unknown type, bad shape, wrong byte count)."""


@dataclass(frozen=True)
class DeviceLayout:
    """How one ggml type lies on the device; its ggml block sizes come from gguf.blocks."""

    qtype: T
    kind: str  # "nibble" | "int8" | "float"
    group: int  # elements per scale in the repacked layout (0 for float)
    scale_dtype: str  # numpy dtype name of the s/m planes ("" for float)
    has_min: bool

    @property
    def name(self) -> str:
        """The kernels' name of the type: entry names, the manifest's `qtype`, `Repacked.qtype`."""
        return self.qtype.name

    @property
    def block_elems(self) -> int:
        return BLOCKS[self.qtype].elems

    @property
    def block_bytes(self) -> int:
        return BLOCKS[self.qtype].nbytes


LAYOUTS: dict[T, DeviceLayout] = {lay.qtype: lay for lay in (
    DeviceLayout(T.Q4_0, "nibble", 32, "float16", True),
    DeviceLayout(T.Q4_1, "nibble", 32, "float16", True),
    DeviceLayout(T.Q5_0, "int8", 32, "float16", False),
    DeviceLayout(T.Q8_0, "int8", 32, "float16", False),
    DeviceLayout(T.Q4_K, "nibble", 32, "float32", True),
    DeviceLayout(T.Q6_K, "int8", 16, "float32", False),
    DeviceLayout(T.F16, "float", 0, "", False),
    DeviceLayout(T.F32, "float", 0, "", False),
)}
# The same layouts by kernel name, for code that starts from a manifest entry or an entry name.
FORMATS: dict[str, DeviceLayout] = {lay.name: lay for lay in LAYOUTS.values()}


@dataclass
class Repacked:
    """Device planes of one (N, K) weight; `s`/`m` are None where the kind has none."""

    qtype: str
    n_rows: int
    n_cols: int
    q: np.ndarray
    s: np.ndarray | None
    m: np.ndarray | None

    def planes(self) -> dict[str, np.ndarray]:
        out = {"q": self.q}
        if self.s is not None:
            out["s"] = self.s
        if self.m is not None:
            out["m"] = self.m
        return out


def get_format(qtype: str) -> DeviceLayout:
    if qtype not in FORMATS:
        raise RepackError(f"no device layout for {qtype!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[qtype]


def _blocks(raw: np.ndarray, fmt: DeviceLayout, n_rows: int, n_cols: int) -> np.ndarray:
    """raw bytes -> (N * K/block_elems, block_bytes) uint8 view, blocks in row-major order."""
    if n_cols % fmt.block_elems:
        raise RepackError(f"{fmt.name} rows need a multiple of {fmt.block_elems} columns, got {n_cols}")
    nb = n_cols // fmt.block_elems
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.size != n_rows * nb * fmt.block_bytes:
        raise RepackError(
            f"{fmt.name} ({n_rows}, {n_cols}) needs {n_rows * nb * fmt.block_bytes} bytes, "
            f"got {raw.size}: pass the tensor's raw GGUF data and its numpy-order shape"
        )
    return raw.reshape(n_rows * nb, fmt.block_bytes)


def _nibbles_to_bytes(q: np.ndarray) -> np.ndarray:
    """(M, 32j) uint8 values 0..15 -> (M, 16j) nibble-packed (element i | element i+16 << 4 per 32)."""
    g = q.reshape(len(q), -1, 2, 16)
    return (g[:, :, 0, :] | (g[:, :, 1, :] << 4)).reshape(len(q), -1)


# Each `_planes_*`: ggml blocks (M, block_bytes) -> (q, s, m) per block, in ggml's element order;
# the field views and decoders are quants' own, so this file states no byte offset or bit layout.

def _planes_q4_0(b: np.ndarray) -> tuple:
    d = Q4_0.field(b, "d")  # (M, 1) float16
    return Q4_0.field(b, "qs"), d, (d.astype(np.float32) * -8.0).astype(np.float16)


def _planes_q4_1(b: np.ndarray) -> tuple:
    return Q4_1.field(b, "qs"), Q4_1.field(b, "d"), Q4_1.field(b, "m")


def _planes_q5_0(b: np.ndarray) -> tuple:
    return Q5_0.signed_quants(b), Q5_0.field(b, "d"), None


def _planes_q8_0(b: np.ndarray) -> tuple:
    return Q8_0.field(b, "qs"), Q8_0.field(b, "d"), None


def _planes_q4_k(b: np.ndarray) -> tuple:
    step, offset = k4_sub_scales(Q4_K, b)  # (M, 8) float32
    q = k4_nibbles(Q4_K.field(b, "qs")).reshape(len(b), -1)  # sub-block 2c = low, 2c+1 = high
    return _nibbles_to_bytes(q), step, -offset


def _planes_q6_k(b: np.ndarray) -> tuple:
    return Q6_K.signed_quants(b), Q6_K.sub_scales(b), None


_PLANES = {
    T.Q4_0: _planes_q4_0,
    T.Q4_1: _planes_q4_1,
    T.Q5_0: _planes_q5_0,
    T.Q8_0: _planes_q8_0,
    T.Q4_K: _planes_q4_k,
    T.Q6_K: _planes_q6_k,
}


def _plane(a: np.ndarray | None, n_rows: int) -> np.ndarray | None:
    """Per-block values (M, ...) -> a new C-contiguous (n_rows, -1) array (never a view of raw)."""
    if a is None:
        return None
    out = np.empty(a.shape, a.dtype)
    out[...] = a
    return out.reshape(n_rows, -1)


def _repack_float(raw: np.ndarray, fmt: DeviceLayout, n: int, k: int) -> Repacked:
    arr = np.ascontiguousarray(raw).view(np.uint8).reshape(-1).view(BLOCKS[fmt.qtype].field("x").dtype)
    if arr.size != n * k:
        raise RepackError(f"{fmt.name} ({n}, {k}) needs {n * k} values, got {arr.size}")
    return Repacked(fmt.name, n, k, arr.reshape(n, k).copy(), None, None)


def repack(raw: np.ndarray, qtype: str, n_rows: int, n_cols: int) -> Repacked:
    """Raw GGUF blocks of an (n_rows, n_cols) weight -> device planes (see module docstring)."""
    fmt = get_format(qtype)
    if fmt.kind == "float":
        return _repack_float(raw, fmt, n_rows, n_cols)
    q, s, m = _PLANES[fmt.qtype](_blocks(raw, fmt, n_rows, n_cols))
    return Repacked(qtype, n_rows, n_cols, _plane(q, n_rows), _plane(s, n_rows), _plane(m, n_rows))


def dequantize_repacked(r: Repacked) -> np.ndarray:
    """Device planes -> (N, K) float32, exactly as the kernels compute each weight."""
    fmt = get_format(r.qtype)
    if fmt.kind == "float":
        return r.q.astype(np.float32)
    n, k = r.n_rows, r.n_cols
    if fmt.kind == "nibble":
        g = r.q.reshape(n, k // 32, 16)
        q = np.concatenate([g & 0x0F, g >> 4], -1).reshape(n, k).astype(np.float32)
    else:
        q = r.q.astype(np.float32)
    s = np.repeat(r.s.astype(np.float32), fmt.group, axis=1)
    w = s * q
    if r.m is not None:
        w = w + np.repeat(r.m.astype(np.float32), fmt.group, axis=1)
    return w.astype(np.float32)
