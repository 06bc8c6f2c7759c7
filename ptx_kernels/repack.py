"""Repack raw GGUF (ggml) weight blocks into the device layout the kernels read.

The CUDA backend runs `repack(raw, qtype, n_rows, n_cols)` once per weight at upload time and
copies each plane of the result to the device.  Every layout is row-major over the numpy (out, in)
= (N, K) view of the weight (GGUF dims reversed), keeps the GGUF's own bits (Q4_K's 6-bit
sub-scales become bytes: +2.8%, every other type is exactly its GGUF size; Q5_K and Q3_K keep
theirs packed) and separates quants from scales so that a kernel reads each plane with contiguous, vectorizable loads.

Planes (N rows, K columns; "nibbles": every run of 32 elements is 16 bytes, byte i holds element
i in its low nibble and element i+16 in its high nibble, ggml's Q4_0 order):

| kind  | qtype | `q` plane               | `s` plane              | `m` plane           | w[n, k]          | B/256   |
|-------|-------|-------------------------|------------------------|---------------------|------------------|---------|
| q4    | Q4_0  | u8 nibbles (N, K/2)     | f16 d (N, K/32)        | none                | d*q - 8*d        | 144 =   |
| q4    | Q4_1  | u8 nibbles (N, K/2)     | f16 d (N, K/32)        | f16 m (N, K/32)     | d*q + m          | 160 =   |
| q5    | Q5_0  | u8 nibbles, low 4 bits  | f16 d (N, K/32)        | i32 qh (N, K/32)    | d*(q - 16)       | 176 =   |
| q5    | Q5_1  | u8 nibbles, low 4 bits  | f16 d, m (N, K/16)     | i32 qh (N, K/32)    | d*q + m          | 192 =   |
| k4    | Q4_K  | u8 nibbles (N, K/2)     | f16 d, dmin (N, K/128) | u8 sc, mn (N, K/16) | d*sc*q - dmin*mn | 148/144 |
| k6    | Q6_K  | u8 (N, 3K/4), see below | f16 d (N, K/256)       | i8 sc (N, K/16)     | d*sc*(q - 32)    | 210 =   |
| k5    | Q5_K  | u8 nibbles, low 4 bits  | f16 d, dmin (N, K/128) | i32 (N, 11K/256)    | d*sc*q - dmin*mn | 176 =   |
| k3    | Q3_K  | u8 crumbs (N, K/4)      | f16 d (N, K/256)       | i32 (N, 11K/256)    | d*(sc-32)*(q-4)  | 110 =   |
| k2    | Q2_K  | u8 crumbs (N, K/4)      | f16 d, dmin (N, K/128) | u8 sc (N, K/16)     | d*lo*q - dmin*hi | 84 =    |
| int8  | Q8_0  | i8 (N, K)               | f16 d (N, K/32)        | none                | d*q              | 272 =   |
| float | F16   | f16 (N, K) (F32: f32)   | none                   | none                | q                | 512 =   |
| bf16  | BF16  | u16 bf16 bits (N, K)    | none                   | none                | bits << 16       | 512 =   |

(B/256: device bytes per 256 elements, "=" where that is the GGUF size.)
Q5_0/Q5_1's qh is ggml's word: bit j is the fifth bit of element j of its 32-group.  A Q6_K `q` row
is, per 256-block, 128 bytes of nibbles (the low 4 bits) then 64 bytes of top bits in four
16-byte chunks: chunk c covers 32-groups 2c and 2c+1, its byte i holds the top two bits of
element i (bits 0-1) and i+16 (bits 2-3) of group 2c, then the same of group 2c+1 (bits 4-7),
so a run of 16 quants reads 16 contiguous nibble bytes and 16 contiguous top-bit bytes.  Q4_K's
`s` holds (d, dmin) per 256-block and `m` (sc, mn) per 32-group: the 6-bit values of ggml's
12-byte packing, one byte each.  Q5_K and Q3_K keep their 12 packed scale bytes (the kernels
unpack them): their `m` row is, per 256-block, 11 int32 words: 8 bit words (word g: bit j is the
fifth bit (Q5_K) or third bit (Q3_K, hmask) of element j of 32-group g, Q5_0's qh order) then
ggml's 12 `scales` bytes as 3 little-endian words.  Q3_K/Q2_K `q` holds the 2-bit quants
("crumbs") in the chunk order of Q6_K's top bits (64 B per 256); Q2_K's `m` is ggml's `scales`
byte per 16 (low nibble: scale, high nibble: min).  The kernels form d*sc and dmin*mn in
float32, one rounding as ggml does, so every repack is lossless: `dequantize_repacked` equals ggml's dequantization bit
for bit.

`LAYOUTS` (keyed by gguf's `GGMLQuantizationType`, as `TensorView.qtype` is) holds only what is
the device's own: kind, group, each plane's dtype and size per row.  Block sizes and field
offsets are llama_core's `gguf.blocks` table, the bit unpacking (Q5_0's fifth bit, Q4_K's six-bit
scales, Q6_K's split quants, the K-quants' 2-bit `crumbs` and nibbles, Q3_K's `scales6`) its
`gguf.quants`, both used here as they are.  `FORMATS` is the
same layouts by kernel name (the manifest's `qtype`, entry names, `Repacked.qtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.gguf.blocks import BLOCKS
from ukgpu.llama_core.gguf.quants import (
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    crumbs,
    k4_nibbles,
    k4_scales,
)

PLANE_NAMES = ("q", "s", "m")


@dataclass(frozen=True)
class PlaneSpec:
    """One plane of a layout: numpy dtype and `num` values per `den` elements of a row."""

    dtype: str
    num: int
    den: int

    def per_row(self, n_cols: int) -> int:
        return n_cols * self.num // self.den

    @property
    def bytes_per_element(self) -> float:
        return np.dtype(self.dtype).itemsize * self.num / self.den


@dataclass(frozen=True)
class DeviceLayout:
    """How one ggml type lies on the device; its ggml block sizes come from gguf.blocks."""

    qtype: T
    kind: str  # "q4" | "q5" | "k4" | "k6" | "int8" | "float" | "bf16" | "k5" | "k3" | "k2" (KIND)
    group: int  # elements per sub-scale (0 for float)
    planes: dict[str, PlaneSpec]  # "q", "s", "m" (the ones this type has)
    has_min: bool = False  # Q4_1/Q5_1: w = d*q + m (Q4_0's offset -8*d is computed)

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

    @property
    def bytes_per_element(self) -> float:
        """Device bytes per weight element, all planes (what a mat-vec streams)."""
        return sum(p.bytes_per_element for p in self.planes.values())


def _layout(qtype: T, kind: str, group: int, has_min: bool = False, **planes: tuple[str, int, int]) -> DeviceLayout:
    return DeviceLayout(qtype, kind, group, {k: PlaneSpec(*v) for k, v in planes.items()}, has_min)


LAYOUTS: dict[T, DeviceLayout] = {lay.qtype: lay for lay in (
    _layout(T.Q4_0, "q4", 32, q=("uint8", 1, 2), s=("float16", 1, 32)),
    _layout(T.Q4_1, "q4", 32, True, q=("uint8", 1, 2), s=("float16", 1, 32), m=("float16", 1, 32)),
    _layout(T.Q5_0, "q5", 32, q=("uint8", 1, 2), s=("float16", 1, 32), m=("int32", 1, 32)),
    _layout(T.Q5_1, "q5", 32, True, q=("uint8", 1, 2), s=("float16", 2, 32), m=("int32", 1, 32)),
    _layout(T.Q8_0, "int8", 32, q=("int8", 1, 1), s=("float16", 1, 32)),
    _layout(T.Q4_K, "k4", 32, q=("uint8", 1, 2), s=("float16", 2, 256), m=("uint8", 2, 32)),
    _layout(T.Q6_K, "k6", 16, q=("uint8", 3, 4), s=("float16", 1, 256), m=("int8", 1, 16)),
    _layout(T.Q5_K, "k5", 32, q=("uint8", 1, 2), s=("float16", 2, 256), m=("int32", 11, 256)),
    _layout(T.Q3_K, "k3", 16, q=("uint8", 1, 4), s=("float16", 1, 256), m=("int32", 11, 256)),
    _layout(T.Q2_K, "k2", 16, q=("uint8", 1, 4), s=("float16", 2, 256), m=("uint8", 1, 16)),
    _layout(T.F16, "float", 0, q=("float16", 1, 1)),
    _layout(T.F32, "float", 0, q=("float32", 1, 1)),
    _layout(T.BF16, "bf16", 0, q=("uint16", 1, 1)),  # the bf16 bits; kernels read them via *fp16
)}
# The same layouts by kernel name, for code that starts from a manifest entry or an entry name.
FORMATS: dict[str, DeviceLayout] = {lay.name: lay for lay in LAYOUTS.values()}


class RepackError(UkgpuError):
    """A weight cannot be repacked (unknown type, bad shape, wrong byte count)."""


@dataclass
class Repacked:
    """Device planes of one (N, K) weight; `s`/`m` are None where the layout has none."""

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


def _bytes_to_nibbles(b: np.ndarray) -> np.ndarray:
    """Inverse of `_nibbles_to_bytes`: (M, 16j) -> (M, 32j) values 0..15."""
    g = b.reshape(len(b), -1, 1, 16)
    return np.concatenate([g & 0x0F, g >> 4], axis=2).reshape(len(b), -1)


def _top_bits_to_bytes(top: np.ndarray) -> np.ndarray:
    """(M, 256) 2-bit values -> (M, 64): chunk c byte i = groups 2c, 2c+1 x elements i, i+16."""
    t = top.reshape(len(top), 4, 2, 2, 16).astype(np.uint8)  # (M, chunk, group in pair, half, i)
    shift = (np.arange(2)[:, None] * 4 + np.arange(2)[None, :] * 2).astype(np.uint8)  # (2, 2)
    return np.bitwise_or.reduce(t << shift[None, None, :, :, None], axis=(2, 3)).reshape(len(top), 64)


def _bytes_to_top_bits(b: np.ndarray) -> np.ndarray:
    """Inverse of `_top_bits_to_bytes`: (M, 64) -> (M, 256) values 0..3."""
    shift = (np.arange(2)[:, None] * 4 + np.arange(2)[None, :] * 2).astype(np.uint8)
    t = (b.reshape(len(b), 4, 1, 1, 16) >> shift[None, None, :, :, None]) & 3
    return t.reshape(len(b), 256)


# Each `_planes_*`: ggml blocks (M, block_bytes) -> (q, s, m) per block, in the device order;
# the field views and decoders are quants' own, so this file states no byte offset of a block.

def _planes_q4_0(b: np.ndarray) -> tuple:
    return Q4_0.field(b, "qs"), Q4_0.field(b, "d"), None


def _planes_q4_1(b: np.ndarray) -> tuple:
    return Q4_1.field(b, "qs"), Q4_1.field(b, "d"), Q4_1.field(b, "m")


def _planes_q5_0(b: np.ndarray) -> tuple:
    return Q5_0.field(b, "qs"), Q5_0.field(b, "d"), Q5_0.field(b, "qh").view(np.int32)  # the kernels' *i32


def _planes_q5_1(b: np.ndarray) -> tuple:
    s = np.concatenate([Q5_1.field(b, "d"), Q5_1.field(b, "m")], axis=1)  # (M, 2) float16
    return Q5_1.field(b, "qs"), s, Q5_1.field(b, "qh").view(np.int32)


def _planes_q8_0(b: np.ndarray) -> tuple:
    return Q8_0.field(b, "qs"), Q8_0.field(b, "d"), None


def _planes_q4_k(b: np.ndarray) -> tuple:
    sc_lo, mn_lo, sc_hi, mn_hi = k4_scales(*(Q4_K.field(b, "scales")[:, i:i + 4] for i in (0, 4, 8)))
    sc = np.concatenate([sc_lo, sc_hi], axis=1)  # (M, 8) 6-bit sub-scales
    mn = np.concatenate([mn_lo, mn_hi], axis=1)
    s = np.concatenate([Q4_K.field(b, "d"), Q4_K.field(b, "dmin")], axis=1)  # (M, 2) float16
    q = k4_nibbles(Q4_K.field(b, "qs")).reshape(len(b), -1)  # sub-block 2c = low, 2c+1 = high
    return _nibbles_to_bytes(q), s, np.stack([sc, mn], axis=2).reshape(len(b), 16).astype(np.uint8)


def _planes_q6_k(b: np.ndarray) -> tuple:
    u = (Q6_K.signed_quants(b).astype(np.int16) + 32).astype(np.uint8)  # (M, 256) 6-bit quants
    q = np.concatenate([_nibbles_to_bytes(u & 0x0F), _top_bits_to_bytes(u >> 4)], axis=1)
    return q, Q6_K.field(b, "d"), Q6_K.field(b, "scales")


def _bit_words(bits: np.ndarray) -> np.ndarray:
    """ggml's 32 bit bytes of a 256-block (byte l, bit g: element 32g + l) -> (M, 8) int32 words,
    word g bit j = element 32g + j."""
    b = (bits[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (M, g, l)
    return np.bitwise_or.reduce(b.astype(np.uint32) << np.arange(32, dtype=np.uint32), axis=2).view(np.int32)


def _planes_q5_k(b: np.ndarray) -> tuple:
    m = np.concatenate([_bit_words(Q5_K.field(b, "qh")), Q5_K.field(b, "scales").view(np.int32)], axis=1)
    q = k4_nibbles(Q5_K.field(b, "qs")).reshape(len(b), -1)  # low 4 bits, element order
    return _nibbles_to_bytes(q), np.concatenate([Q5_K.field(b, "d"), Q5_K.field(b, "dmin")], axis=1), m


def _planes_q3_k(b: np.ndarray) -> tuple:
    m = np.concatenate([_bit_words(Q3_K.field(b, "hmask")), Q3_K.field(b, "scales").view(np.int32)], axis=1)
    return _top_bits_to_bytes(crumbs(Q3_K.field(b, "qs"))), Q3_K.field(b, "d"), m


def _planes_q2_k(b: np.ndarray) -> tuple:
    s = np.concatenate([Q2_K.field(b, "d"), Q2_K.field(b, "dmin")], axis=1)
    return _top_bits_to_bytes(crumbs(Q2_K.field(b, "qs"))), s, Q2_K.field(b, "scales")


_PLANES = {
    T.Q4_0: _planes_q4_0,
    T.Q4_1: _planes_q4_1,
    T.Q5_0: _planes_q5_0,
    T.Q5_1: _planes_q5_1,
    T.Q8_0: _planes_q8_0,
    T.Q4_K: _planes_q4_k,
    T.Q6_K: _planes_q6_k,
    T.Q5_K: _planes_q5_k,
    T.Q3_K: _planes_q3_k,
    T.Q2_K: _planes_q2_k,
}


def _plane(a: np.ndarray | None, spec: PlaneSpec | None, n_rows: int, n_cols: int) -> np.ndarray | None:
    """Per-block values (M, ...) -> a new C-contiguous (n_rows, per_row) array of the spec's dtype."""
    if a is None or spec is None:
        return None
    out = np.empty((n_rows, spec.per_row(n_cols)), spec.dtype)
    out.reshape(-1)[...] = a.reshape(-1)  # same dtype as the field: copies, never a view of raw
    return out


def _repack_float(raw: np.ndarray, fmt: DeviceLayout, n: int, k: int) -> Repacked:
    arr = np.ascontiguousarray(raw).view(np.uint8).reshape(-1).view(BLOCKS[fmt.qtype].field("x").dtype)
    if arr.size != n * k:
        raise RepackError(f"{fmt.name} ({n}, {k}) needs {n * k} values, got {arr.size}")
    return Repacked(fmt.name, n, k, arr.reshape(n, k).copy(), None, None)


def repack(raw: np.ndarray, qtype: str, n_rows: int, n_cols: int) -> Repacked:
    """Raw GGUF blocks of an (n_rows, n_cols) weight -> device planes (see module docstring)."""
    fmt = get_format(qtype)
    if fmt.block_elems == 1:
        return _repack_float(raw, fmt, n_rows, n_cols)
    arrays = _PLANES[fmt.qtype](_blocks(raw, fmt, n_rows, n_cols))
    q, s, m = (_plane(a, fmt.planes.get(p), n_rows, n_cols) for a, p in zip(arrays, PLANE_NAMES))
    assert q is not None
    return Repacked(qtype, n_rows, n_cols, q, s, m)


def _per_element(a: np.ndarray, n: int, k: int) -> np.ndarray:
    """(N, G) per-group values -> (N, K) float32, each repeated over its K/G elements."""
    return np.repeat(a.astype(np.float32), k // a.shape[1], axis=1)


def _word_bits(words: np.ndarray, n: int, k: int) -> np.ndarray:
    """(N, K/32) int32 words -> (N, K) int32: bit j of word g is element 32g + j."""
    bits = (words.view(np.uint32).reshape(n, -1, 1) >> np.arange(32, dtype=np.uint32)) & 1
    return bits.reshape(n, k).astype(np.int32)


def _k_words(r: Repacked) -> tuple[np.ndarray, np.ndarray]:
    """Q5_K/Q3_K `m` -> (N, K/32) bit words, (N*K/256, 12) ggml scale bytes."""
    assert r.m is not None
    blocks = r.m.reshape(-1, 11)
    return blocks[:, :8].reshape(r.n_rows, -1), blocks[:, 8:].copy().view(np.uint8)


def _quants(r: Repacked, fmt: DeviceLayout) -> np.ndarray:
    """(N, K) int32 unsigned quants of a nibble- or crumb-based kind, element order."""
    n, k = r.n_rows, r.n_cols
    if fmt.kind == "k6":
        blocks = r.q.reshape(n * k // 256, 192)
        q = _bytes_to_nibbles(blocks[:, :128]) | (_bytes_to_top_bits(blocks[:, 128:]) << 4)
        return q.reshape(n, k).astype(np.int32)
    if fmt.kind in ("k3", "k2"):
        q = _bytes_to_top_bits(r.q.reshape(n * k // 256, 64)).reshape(n, k).astype(np.int32)
        return q | (_word_bits(_k_words(r)[0], n, k) << 2) if fmt.kind == "k3" else q
    q = _bytes_to_nibbles(r.q.reshape(n, -1)).astype(np.int32)
    if fmt.kind == "q5":
        assert r.m is not None
        q |= _word_bits(r.m, n, k) << 4
    if fmt.kind == "k5":
        q |= _word_bits(_k_words(r)[0], n, k) << 4
    return q


def _dequantize_k(r: Repacked, fmt: DeviceLayout, q: np.ndarray) -> np.ndarray:
    """`dequantize_repacked` of the K-quants: step (d * sub-scale) * q - offset, float32."""
    n, k = r.n_rows, r.n_cols
    assert r.s is not None and r.m is not None
    if fmt.kind == "k3":  # s (N, K/256) d, scales as ggml packs them
        sc = Q3_K.scales6(np.pad(_k_words(r)[1], ((0, 0), (96, 2)))).reshape(n, -1).astype(np.float32)
        step = _per_element(_per_element(r.s, n, k // 16) * (sc - 32), n, k)
        return step * (q - 4).astype(np.float32)
    d, dmin = _per_element(r.s[:, 0::2], n, k // fmt.group), _per_element(r.s[:, 1::2], n, k // fmt.group)
    if fmt.kind == "k2":  # m: ggml's scale byte per 16
        sc, mn = (r.m & 15).astype(np.float32), (r.m >> 4).astype(np.float32)
    elif fmt.kind == "k5":
        by = _k_words(r)[1]
        lo = k4_scales(by[:, 0:4], by[:, 4:8], by[:, 8:12])
        sc = np.concatenate([lo[0], lo[2]], axis=1).reshape(n, -1).astype(np.float32)
        mn = np.concatenate([lo[1], lo[3]], axis=1).reshape(n, -1).astype(np.float32)
    else:  # k4: m (N, K/32 * [sc, mn])
        sc, mn = r.m[:, 0::2].astype(np.float32), r.m[:, 1::2].astype(np.float32)
    step, off = _per_element(d * sc, n, k), _per_element(dmin * mn, n, k)
    return step * q.astype(np.float32) - off


def dequantize_repacked(r: Repacked) -> np.ndarray:
    """Device planes -> (N, K) float32, exactly as the kernels compute each weight."""
    fmt = get_format(r.qtype)
    if fmt.kind == "float":
        return r.q.astype(np.float32)
    if fmt.kind == "bf16":
        return (r.q.astype(np.uint32) << 16).view(np.float32)
    n, k = r.n_rows, r.n_cols
    assert r.s is not None
    if fmt.kind == "int8":
        return _per_element(r.s, n, k) * r.q.astype(np.float32)
    q = _quants(r, fmt)
    if fmt.kind == "q4":
        d = _per_element(r.s, n, k)
        off = d * np.float32(-8) if r.m is None else _per_element(r.m, n, k)
        return d * q.astype(np.float32) + off
    if fmt.kind == "q5" and fmt.has_min:  # Q5_1: s (N, K/32 * [d, m])
        return _per_element(r.s[:, 0::2], n, k) * q.astype(np.float32) + _per_element(r.s[:, 1::2], n, k)
    if fmt.kind == "q5":
        return _per_element(r.s, n, k) * (q - 16).astype(np.float32)
    if fmt.kind != "k6":
        return _dequantize_k(r, fmt, q)
    assert r.m is not None
    step = _per_element(_per_element(r.s, n, k // 16) * r.m.astype(np.float32), n, k)  # k6: d * sc per 16
    return step * (q - 32).astype(np.float32)
