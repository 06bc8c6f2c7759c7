"""ggml tensor formats: dequantization and quantization, one class per type.

The block facts (elements and bytes per block, field offsets and dtypes) are the table in
`gguf.blocks`, `BLOCKS`, keyed by gguf's `GGMLQuantizationType`; each class here takes its
`block` from it and adds the arithmetic:

    field(blocks, name)        a view of one field, shape (n_blocks, size/itemsize)
    dequantize_blocks(blocks)  uint8[n_blocks, nbytes] -> float32[n_blocks, elems]
    quantize_blocks(values)    float32[n_blocks, elems] -> uint8[n_blocks, nbytes]
                               (Q8_0, Q4_1, Q4_K, Q6_K; Q5_K, Q3_K, Q2_K in quants_k;
                               `quantize` hands Q4_0, Q5_0,
                               Q5_1, F16 and BF16 to gguf-py's reference quantizer)

Element order inside a block (what `dequantize_blocks` returns) is the order of
the row; the comments on each class say which bits of which field make element e.
The arithmetic follows ggml's reference order so results are bit-exact with it.
The bit unpacking other layouts reuse is public here: `k4_scales` (the Q4_K/Q5_K six-bit
scales, jitted as is by the numba kernels), `k4_nibbles`, `k4_sub_scales`, and the
`signed_quants` / `sub_scales` of Q5_0 and Q6_K, `crumbs` (the Q2_K/Q3_K 2-bit fields) and
`Q3_K.scales6` (ptx_kernels/repack.py builds on them)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as _gguf_quants

from ukgpu.llama_core.errors import QuantError
from ukgpu.llama_core.gguf import quants_k
from ukgpu.llama_core.gguf.blocks import BLOCKS, Block, block_of

_CHUNK_BLOCKS = 1 << 14  # bounds the temporaries of one dequantize call


class QuantFormat:
    """One ggml tensor format's arithmetic; subclasses are registered in FORMATS."""

    qtype: ClassVar[T]
    block: ClassVar[Block]

    def __init_subclass__(cls) -> None:
        cls.block = BLOCKS[cls.qtype]
        FORMATS[cls.qtype] = cls

    @classmethod
    def field(cls, blocks: np.ndarray, name: str) -> np.ndarray:
        """blocks uint8[..., nbytes] -> field view [..., size/itemsize] (no copy)."""
        f = cls.block.field(name)
        return blocks[..., f.offset : f.offset + f.size].view(np.dtype(f.dtype))

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError(cls.__name__)

    @classmethod
    def quantize_blocks(cls, values: np.ndarray) -> np.ndarray:
        raise QuantError(f"ukgpu has no {cls.qtype.name} quantizer")

    @classmethod
    def _f32(cls, blocks: np.ndarray, name: str) -> np.ndarray:
        return cls.field(blocks, name).astype(np.float32)


FORMATS: dict[T, type[QuantFormat]] = {}


def _pack(cls: type[QuantFormat], n: int, **arrays: np.ndarray) -> np.ndarray:
    """Assemble blocks uint8[n, nbytes] from per-field arrays."""
    out = np.empty((n, cls.block.nbytes), dtype=np.uint8)
    for f in cls.block.fields:
        field = np.ascontiguousarray(arrays[f.name], dtype=f.dtype)
        out[:, f.offset : f.offset + f.size] = field.view(np.uint8).reshape(n, f.size)
    return out


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8[n, k] -> uint8[n, 2k]: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(words: np.ndarray, count: int) -> np.ndarray:
    """uint32[n, 1] -> uint8[n, count]: bit j of each word."""
    return ((words >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


class F32(QuantFormat):
    qtype = T.F32

    @classmethod
    def dequantize_blocks(cls, blocks):
        return cls.field(blocks, "x").astype(np.float32)

    @classmethod
    def quantize_blocks(cls, values):
        return _pack(cls, len(values), x=values)


class F16(QuantFormat):
    qtype = T.F16

    @classmethod
    def dequantize_blocks(cls, blocks):
        return cls._f32(blocks, "x")


class BF16(QuantFormat):
    """The top 16 bits of a float32."""

    qtype = T.BF16

    @classmethod
    def dequantize_blocks(cls, blocks):
        return (cls.field(blocks, "x").astype(np.uint32) << 16).view(np.float32)


class Q4_0(QuantFormat):
    """e = d * (q - 8); q of element j<16 is the low nibble of qs[j], of j+16 the high nibble."""

    qtype = T.Q4_0

    @classmethod
    def dequantize_blocks(cls, blocks):
        q = _nibbles(cls.field(blocks, "qs")).astype(np.int8) - np.int8(8)
        return cls._f32(blocks, "d") * q


class Q4_1(QuantFormat):
    """e = d * q + m; nibble order as Q4_0."""

    qtype = T.Q4_1

    @classmethod
    def dequantize_blocks(cls, blocks):
        q = _nibbles(cls.field(blocks, "qs"))
        return cls._f32(blocks, "d") * q + cls._f32(blocks, "m")

    @classmethod
    def quantize_blocks(cls, values):
        lo = values.min(axis=1, keepdims=True)  # [n, 1]
        d = (values.max(axis=1, keepdims=True) - lo) / np.float32(15)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        q = np.minimum(15, ((values - lo) * inv + np.float32(0.5)).astype(np.int8)).astype(np.uint8)
        return _pack(cls, len(values), d=d, m=lo, qs=q[:, :16] | (q[:, 16:] << 4))


def _q5(cls: type[QuantFormat], blocks: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 quants uint8[n, 32]: nibble (as Q4_0) | bit j of the little-endian u32 qh << 4."""
    return _nibbles(cls.field(blocks, "qs")) | (_bits(cls.field(blocks, "qh"), 32) << 4)


class Q5_0(QuantFormat):
    """e = d * (q - 16); q from _q5."""

    qtype = T.Q5_0

    @classmethod
    def signed_quants(cls, blocks: np.ndarray) -> np.ndarray:
        """int8[n, 32]: q - 16, in element order."""
        return _q5(cls, blocks).astype(np.int8) - np.int8(16)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return cls._f32(blocks, "d") * cls.signed_quants(blocks)


class Q5_1(QuantFormat):
    """e = d * q + m; q from _q5."""

    qtype = T.Q5_1

    @classmethod
    def dequantize_blocks(cls, blocks):
        return cls._f32(blocks, "d") * _q5(cls, blocks) + cls._f32(blocks, "m")


class Q8_0(QuantFormat):
    """e = d * qs[e] (int8)."""

    qtype = T.Q8_0

    @classmethod
    def dequantize_blocks(cls, blocks):
        return cls._f32(blocks, "d") * cls.field(blocks, "qs")

    @classmethod
    def quantize_blocks(cls, values):
        d = np.abs(values).max(axis=1, keepdims=True) / np.float32(127)  # [n, 1]
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        x = values * inv
        q = np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))  # round half away from zero
        return _pack(cls, len(values), d=d, qs=q.astype(np.int8))


def crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit fields of K-quant qs uint8[n, 64] -> uint8[n, 256].

    Element e = 128h + 32j + l is bits 2j..2j+1 of qs[32h + l].
    """
    halves = qs.reshape(len(qs), 2, 1, 32)
    return ((halves >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(len(qs), 256)


def k4_scales(a, b, c):
    """The one Q4_K/Q5_K scale unpack: bytes j, j+4, j+8 (j = 0..3) of `scales` -> the six-bit
    (scale j, min j, scale j+4, min j+4).  Sub-blocks 4..7 take their low four bits from byte
    j+8 (scale: low nibble, min: high) and their top two from bits 6-7 of bytes j and j+4.
    Plain operators: numpy runs it on columns (k4_sub_scales), numba jits it for single bytes."""
    return a & 63, b & 63, (c & 0x0F) | ((a >> 6) << 4), (c >> 4) | ((b >> 6) << 4)


class Q2_K(QuantFormat):
    """16 sub-blocks of 16; e = d * (sc & 15) * q - dmin * (sc >> 4), sc = scales[e // 16], q = crumbs."""

    qtype = T.Q2_K

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = len(blocks)
        sc = cls.field(blocks, "scales")
        dl = cls._f32(blocks, "d") * (sc & 0x0F)  # [n, 16]
        ml = cls._f32(blocks, "dmin") * (sc >> 4)
        q = crumbs(cls.field(blocks, "qs")).reshape(n, 16, 16)
        return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, 256)

    @classmethod
    def quantize_blocks(cls, values):
        return quants_k.quantize_q2_k(cls, values)


class Q3_K(QuantFormat):
    """16 sub-blocks of 16; e = d * (s - 32) * (crumb - 4 * (1 - hbit)).

    crumb = crumbs(qs)[e]; hbit = bit e//32 of hmask[e % 32]; s (6 bits) of sub-block i:
    low 4 bits = scales[i] & 15 (i<8) or scales[i-8] >> 4, top 2 bits = bits 2(i//4).. of scales[8 + i%4].
    """

    qtype = T.Q3_K

    @classmethod
    def scales6(cls, blocks: np.ndarray) -> np.ndarray:
        """uint8[n, 16]: the unpacked 6-bit sub-block scales (before the -32)."""
        b = cls.field(blocks, "scales")
        low = np.concatenate([b[:, 0:8] & 0x0F, b[:, 0:8] >> 4], axis=1)
        high = (b[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [n, 4, 4]
        return low | (high.reshape(len(b), 16) << 4)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = len(blocks)
        hm = cls.field(blocks, "hmask")
        hbit = (hm[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [n, 8, 32]
        q = crumbs(cls.field(blocks, "qs")).astype(np.int8) - ((1 - hbit.reshape(n, 256)) << 2).astype(np.int8)
        dl = cls._f32(blocks, "d") * (cls.scales6(blocks).astype(np.int8) - np.int8(32))  # [n, 16]
        return (dl[:, :, None] * q.reshape(n, 16, 16)).reshape(n, 256)

    @classmethod
    def quantize_blocks(cls, values):
        return quants_k.quantize_q3_k(cls, values)


def k4_sub_scales(cls, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K blocks -> (d * scale, dmin * min), float32[n, 8]: sub-block s is d1[s] * q - m1[s]."""
    b = cls.field(blocks, "scales")
    sc_lo, mn_lo, sc_hi, mn_hi = k4_scales(b[:, 0:4], b[:, 4:8], b[:, 8:12])
    d1 = cls._f32(blocks, "d") * np.concatenate([sc_lo, sc_hi], axis=1)  # [n, 8]
    m1 = cls._f32(blocks, "dmin") * np.concatenate([mn_lo, mn_hi], axis=1)
    return d1, m1


def _k4_values(cls, blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Shared tail of Q4_K/Q5_K: q uint8[n, 8, 32] -> d*sc*q - dmin*min."""
    d1, m1 = k4_sub_scales(cls, blocks)
    return (d1[:, :, None] * q - m1[:, :, None]).reshape(len(blocks), 256)


def k4_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs uint8[n, 128] -> uint8[n, 8, 32]: sub-block 2c is the low nibbles of qs[32c:32c+32], 2c+1 the high."""
    chunks = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(len(qs), 8, 32)


class Q4_K(QuantFormat):
    """8 sub-blocks of 32; e = d * sc[s] * q - dmin * min[s] (sc/min from k4_scales, q from k4_nibbles)."""

    qtype = T.Q4_K

    @classmethod
    def dequantize_blocks(cls, blocks):
        return _k4_values(cls, blocks, k4_nibbles(cls.field(blocks, "qs")))

    @classmethod
    def quantize_blocks(cls, values):
        """Min/max per sub-block (not ggml's search): fine for synthetic weights."""
        n = len(values)
        x = values.reshape(n, 8, 32)
        lo = np.minimum(x.min(axis=2), 0)  # [n, 8]; min is stored as a subtracted magnitude
        scale = (x.max(axis=2) - lo) / np.float32(15)
        d = scale.max(axis=1, keepdims=True) / np.float32(63)  # [n, 1]
        dmin = -lo.min(axis=1, keepdims=True) / np.float32(63)
        d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
        sc = _round_div(scale, d16, 63)
        mn = _round_div(-lo, dmin16, 63)
        step, offset = (d16 * sc)[:, :, None], (dmin16 * mn)[:, :, None]
        q = np.clip(np.rint(_safe_div(x + offset, step)), 0, 15).astype(np.uint8).reshape(n, 4, 2, 32)
        packed = np.empty((n, 12), dtype=np.uint8)
        packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
        packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
        packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
        return _pack(cls, n, d=d, dmin=dmin, scales=packed, qs=qs)


class Q5_K(QuantFormat):
    """As Q4_K with a 5th bit: q[s][l] |= (bit s of qh[l]) << 4."""

    qtype = T.Q5_K

    @classmethod
    def dequantize_blocks(cls, blocks):
        qh = cls.field(blocks, "qh")
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [n, 8, 32]
        return _k4_values(cls, blocks, k4_nibbles(cls.field(blocks, "qs")) | (high << 4))

    @classmethod
    def quantize_blocks(cls, values):
        return quants_k.quantize_q5_k(cls, values)


class Q6_K(QuantFormat):
    """16 sub-blocks of 16; e = d * scales[e // 16] * (q - 32), q 6 bits.

    Half h (128 elements) uses ql[64h:64h+64] and qh[32h:32h+32]; inside it, element
    32g + l takes its low 4 bits from ql (g=0: ql[l] low, 1: ql[l+32] low, 2: ql[l] high,
    3: ql[l+32] high) and its top 2 bits from bits 2g..2g+1 of qh[l].
    """

    qtype = T.Q6_K

    @classmethod
    def signed_quants(cls, blocks: np.ndarray) -> np.ndarray:
        """int8[n, 256]: q - 32, in element order."""
        n = len(blocks)
        ql = cls.field(blocks, "ql").reshape(n, 2, 64)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, 2, 128]
        qh = cls.field(blocks, "qh").reshape(n, 2, 1, 32)
        high = ((qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(n, 2, 128)
        return ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 256)

    @classmethod
    def sub_scales(cls, blocks: np.ndarray) -> np.ndarray:
        """float32[n, 16]: d * scales[s], the step of sub-block s."""
        return cls._f32(blocks, "d") * cls.field(blocks, "scales")

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = len(blocks)
        q = cls.signed_quants(blocks).reshape(n, 16, 16)
        return (cls.sub_scales(blocks)[:, :, None] * q).reshape(n, 256)

    @classmethod
    def quantize_blocks(cls, values):
        """Absmax per sub-block of 16, int8 sub-block scales: fine for synthetic weights."""
        n = len(values)
        x = values.reshape(n, 16, 16)
        scale = np.abs(x).max(axis=2) / np.float32(31)  # [n, 16]
        d = scale.max(axis=1, keepdims=True) / np.float32(127)
        d16 = d.astype(np.float16).astype(np.float32)
        sc = _round_div(scale, d16, 127).astype(np.int8)
        q = np.clip(np.rint(_safe_div(x, (d16 * sc)[:, :, None])) + 32, 0, 63).astype(np.uint8)
        q = q.reshape(n, 2, 4, 32)  # [n, half, g, l]
        lo, hi = q & 0x0F, q >> 4
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        return _pack(cls, n, ql=ql.reshape(n, 128), qh=qh.reshape(n, 64), scales=sc, d=d)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _round_div(a: np.ndarray, b: np.ndarray, top: int) -> np.ndarray:
    return np.clip(np.rint(_safe_div(a, b)), 0, top).astype(np.uint8)


def row_bytes(qtype: T, n_cols: int) -> int:
    """Bytes of one row of n_cols elements (n_cols must be a multiple of the block size)."""
    block = block_of(qtype)
    if n_cols % block.elems:
        raise QuantError(f"a {T(qtype).name} row of {n_cols} elements is not a whole number of "
                         f"{block.elems}-element blocks")
    return n_cols // block.elems * block.nbytes


def dequantize(raw: np.ndarray, qtype: T, n_elements: int) -> np.ndarray:
    """raw uint8[n_bytes] (whole blocks) -> float32[n_elements]."""
    block = block_of(qtype)
    elems, nbytes = block.elems, block.nbytes
    n_blocks = n_elements // elems
    if n_elements % elems or raw.size != n_blocks * nbytes:
        need = n_elements // elems * nbytes
        raise QuantError(f"{n_elements} {T(qtype).name} elements need {need} bytes in whole blocks, got {raw.size}")
    blocks = raw.reshape(n_blocks, nbytes)
    fmt = FORMATS[T(qtype)]
    out = np.empty((n_blocks, elems), dtype=np.float32)
    for start in range(0, n_blocks, _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = fmt.dequantize_blocks(blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(n_elements)


def quantize(values: np.ndarray, qtype: T) -> np.ndarray:
    """float32[..., k] (k a multiple of the block size) -> uint8 raw blocks, shape [..., row_bytes]."""
    qtype = T(qtype)
    values = np.asarray(values, dtype=np.float32)
    nbytes = row_bytes(qtype, values.shape[-1])
    fmt = FORMATS[qtype]
    if "quantize_blocks" not in vars(fmt):  # no quantizer here: use gguf-py's
        try:
            raw = _gguf_quants.quantize(values, qtype)
        except NotImplementedError:
            raise QuantError(f"no {qtype.name} quantizer here or in gguf-py: use Q4_K or Q6_K instead") from None
        return raw.view(np.uint8).reshape(*values.shape[:-1], nbytes)
    blocks = fmt.quantize_blocks(values.reshape(-1, fmt.block.elems))
    return blocks.reshape(*values.shape[:-1], nbytes)
