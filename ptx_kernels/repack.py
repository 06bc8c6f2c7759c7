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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ukgpu.llama_core.errors import UkgpuError


class RepackError(UkgpuError):
    """A weight cannot be repacked (unknown type, bad shape, wrong byte count)."""


@dataclass(frozen=True)
class QFormat:
    name: str
    block_elems: int  # elements per ggml block
    block_bytes: int  # bytes per ggml block
    kind: str  # "nibble" | "int8" | "float"
    group: int  # elements per scale in the repacked layout (0 for float)
    scale_dtype: str  # numpy dtype name of the s/m planes ("" for float)
    has_min: bool


FORMATS: dict[str, QFormat] = {
    "Q4_0": QFormat("Q4_0", 32, 18, "nibble", 32, "float16", True),
    "Q4_1": QFormat("Q4_1", 32, 20, "nibble", 32, "float16", True),
    "Q5_0": QFormat("Q5_0", 32, 22, "int8", 32, "float16", False),
    "Q8_0": QFormat("Q8_0", 32, 34, "int8", 32, "float16", False),
    "Q4_K": QFormat("Q4_K", 256, 144, "nibble", 32, "float32", True),
    "Q6_K": QFormat("Q6_K", 256, 210, "int8", 16, "float32", False),
    "F16": QFormat("F16", 1, 2, "float", 0, "", False),
    "F32": QFormat("F32", 1, 4, "float", 0, "", False),
}


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


def get_format(qtype: str) -> QFormat:
    if qtype not in FORMATS:
        raise RepackError(f"no device layout for {qtype!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[qtype]


def _blocks(raw: np.ndarray, fmt: QFormat, n_rows: int, n_cols: int) -> np.ndarray:
    """raw bytes -> (N, K/block_elems, block_bytes) uint8 view."""
    if n_cols % fmt.block_elems:
        raise RepackError(f"{fmt.name} rows need a multiple of {fmt.block_elems} columns, got {n_cols}")
    nb = n_cols // fmt.block_elems
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.size != n_rows * nb * fmt.block_bytes:
        raise RepackError(
            f"{fmt.name} ({n_rows}, {n_cols}) needs {n_rows * nb * fmt.block_bytes} bytes, "
            f"got {raw.size}: pass the tensor's raw GGUF data and its numpy-order shape"
        )
    return raw.reshape(n_rows, nb, fmt.block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float16"""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _nibbles_to_bytes(q: np.ndarray) -> np.ndarray:
    """(N, K) uint8 values 0..15 -> (N, K/2) nibble-packed (element i | element i+16 << 4 per 32)."""
    n, k = q.shape
    g = q.reshape(n, k // 32, 2, 16)
    return (g[:, :, 0, :] | (g[:, :, 1, :] << 4)).reshape(n, k // 2).astype(np.uint8)


def _q4_k_scales(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, nb, 12) packed 6-bit scales -> scales, mins, each (N, nb, 8) uint8."""
    s = sc12.astype(np.uint8)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return np.concatenate([lo_sc, hi_sc], -1), np.concatenate([lo_m, hi_m], -1)


def _repack_q4_0(b: np.ndarray, n: int, k: int) -> Repacked:
    d = _f16(b[..., 0:2])  # (N, nb)
    m = (d.astype(np.float32) * -8.0).astype(np.float16)
    return Repacked("Q4_0", n, k, b[..., 2:18].reshape(n, k // 2).copy(), d.copy(), m)


def _repack_q4_1(b: np.ndarray, n: int, k: int) -> Repacked:
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return Repacked("Q4_1", n, k, b[..., 4:20].reshape(n, k // 2).copy(), d.copy(), m.copy())


def _repack_q5_0(b: np.ndarray, n: int, k: int) -> Repacked:
    d = _f16(b[..., 0:2])
    qh = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)  # (N, nb, 1)
    qs = b[..., 6:22]  # (N, nb, 16)
    lo = qs & 0x0F
    hi = qs >> 4
    bits = (qh >> np.arange(32, dtype=np.uint32)) & 1  # (N, nb, 32)
    q = np.concatenate([lo, hi], -1).astype(np.int16) | (bits.astype(np.int16) << 4)
    return Repacked("Q5_0", n, k, (q - 16).astype(np.int8).reshape(n, k), d.copy(), None)


def _repack_q8_0(b: np.ndarray, n: int, k: int) -> Repacked:
    d = _f16(b[..., 0:2])
    q = np.ascontiguousarray(b[..., 2:34]).view(np.int8).reshape(n, k)
    return Repacked("Q8_0", n, k, q.copy(), d.copy(), None)


def _repack_q4_k(b: np.ndarray, n: int, k: int) -> Repacked:
    d = _f16(b[..., 0:2]).astype(np.float32)[..., None]  # (N, nb, 1)
    dmin = _f16(b[..., 2:4]).astype(np.float32)[..., None]
    sc, mn = _q4_k_scales(b[..., 4:16])  # (N, nb, 8)
    qs = b[..., 16:144].reshape(n, -1, 4, 32)  # (N, nb, chunk, 32)
    q = np.stack([qs & 0x0F, qs >> 4], 3).reshape(n, k)  # sub-block 2c = low, 2c+1 = high
    s = (d * sc.astype(np.float32)).reshape(n, k // 32)
    m = (-(dmin * mn.astype(np.float32))).reshape(n, k // 32)
    return Repacked("Q4_K", n, k, _nibbles_to_bytes(q), s, m)


def _repack_q6_k(b: np.ndarray, n: int, k: int) -> Repacked:
    ql = b[..., 0:128].reshape(n, -1, 2, 64)  # (N, nb, half, 64)
    qh = b[..., 128:192].reshape(n, -1, 2, 32)  # (N, nb, half, 32)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8)  # (N, nb, 16)
    d = _f16(b[..., 208:210]).astype(np.float32)[..., None]
    lo = np.stack([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], 3)
    hi = np.stack([(qh >> sh) & 3 for sh in (0, 2, 4, 6)], 3)  # (N, nb, half, 4, 32)
    q = (lo.astype(np.int16) | (hi.astype(np.int16) << 4)) - 32
    s = (d * sc.astype(np.float32)).reshape(n, k // 16)
    return Repacked("Q6_K", n, k, q.astype(np.int8).reshape(n, k), s, None)


def _repack_float(raw: np.ndarray, qtype: str, n: int, k: int) -> Repacked:
    dt = np.float16 if qtype == "F16" else np.float32
    arr = np.ascontiguousarray(raw).view(np.uint8).reshape(-1).view(dt)
    if arr.size != n * k:
        raise RepackError(f"{qtype} ({n}, {k}) needs {n * k} values, got {arr.size}")
    return Repacked(qtype, n, k, arr.reshape(n, k).copy(), None, None)


_REPACK = {
    "Q4_0": _repack_q4_0,
    "Q4_1": _repack_q4_1,
    "Q5_0": _repack_q5_0,
    "Q8_0": _repack_q8_0,
    "Q4_K": _repack_q4_k,
    "Q6_K": _repack_q6_k,
}


def repack(raw: np.ndarray, qtype: str, n_rows: int, n_cols: int) -> Repacked:
    """Raw GGUF blocks of an (n_rows, n_cols) weight -> device planes (see module docstring)."""
    fmt = get_format(qtype)
    if fmt.kind == "float":
        return _repack_float(raw, qtype, n_rows, n_cols)
    return _REPACK[qtype](_blocks(raw, fmt, n_rows, n_cols), n_rows, n_cols)


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
