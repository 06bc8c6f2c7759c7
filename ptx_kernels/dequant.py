"""Per-qtype weight parameters, constexprs and limits shared by the mat-vec, GEMM and embedding
kernels, and `load_runs`: the one device-side dequantization of the repacked layout
(repack.py), two runs of 16 elements per 32-group, used by every kernel that reads weights."""

from __future__ import annotations

import triton
import triton.language as tl

from .repack import FORMATS, PLANE_NAMES

KIND_CODES = {"q4": 0, "q5": 1, "k4": 2, "k6": 3, "int8": 4, "float": 5, "bf16": 6, "k5": 7, "k3": 8, "k2": 9}

# Triton pointer type of a plane's numpy dtype (uint16: BF16's bits, loaded as f16 and bitcast).
_POINTER = {"uint8": "*u8", "int8": "*i8", "int32": "*i32", "float16": "*fp16", "float32": "*fp32",
            "uint16": "*fp16"}


def weight_params(qtype: str) -> tuple[tuple[str, str], ...]:
    """(name, triton type) of the three weight planes for one qtype (absent ones: *fp32, unused)."""
    planes = FORMATS[qtype].planes
    return tuple((f"w_{p}", _POINTER[planes[p].dtype] if p in planes else "*fp32") for p in PLANE_NAMES)


def weight_constexprs(qtype: str) -> dict:
    fmt = FORMATS[qtype]
    # GROUP is the sub-scale size (informative: load_runs indexes each kind's planes itself)
    return {"KIND": KIND_CODES[fmt.kind], "HAS_MIN": fmt.has_min, "GROUP": fmt.group or 32}


def unused_planes(qtype: str) -> tuple[str, ...]:
    planes = FORMATS[qtype].planes
    return tuple(f"w_{p}" for p in PLANE_NAMES if p not in planes)


def weight_limits(qtype: str, cols: str) -> tuple[str, ...]:
    """Launch limits on the column count `cols` of a weight of this qtype."""
    fmt = FORMATS[qtype]
    return (f"{cols} % {max(fmt.block_elems, 32)} == 0",)


@triton.jit
def _flat_runs(w_q, w_s, n, gi, i, K, ok, KIND: tl.constexpr):
    """`load_runs` of the one-value-per-element kinds: float, bf16, int8 (Q8_0)."""
    if KIND == 5:  # float
        lo = tl.load(w_q + n * K + gi * 32 + i, mask=ok, other=0).to(tl.float32)
        hi = tl.load(w_q + n * K + gi * 32 + 16 + i, mask=ok, other=0).to(tl.float32)
    elif KIND == 6:  # bf16 bits through an f16 pointer: the top half of a float32
        lo = tl.load(w_q + n * K + gi * 32 + i, mask=ok, other=0).to(tl.int16, bitcast=True).to(tl.int32)
        hi = tl.load(w_q + n * K + gi * 32 + 16 + i, mask=ok, other=0).to(tl.int16, bitcast=True).to(tl.int32)
        lo = (lo << 16).to(tl.float32, bitcast=True)
        hi = (hi << 16).to(tl.float32, bitcast=True)
    else:  # int8 (Q8_0)
        d = tl.load(w_s + n * (K // 32) + gi, mask=ok, other=0).to(tl.float32)
        lo = tl.load(w_q + n * K + gi * 32 + i, mask=ok, other=0).to(tl.float32) * d
        hi = tl.load(w_q + n * K + gi * 32 + 16 + i, mask=ok, other=0).to(tl.float32) * d
    return lo, hi


@triton.jit
def _k3_scale(mrow, t, ok):
    """Q3_K's six-bit scale of sub-block t (0..15) minus 32, from ggml's 12 bytes as 3 words."""
    low = (tl.load(mrow + 8 + (t % 8) // 4, mask=ok, other=0) >> ((t % 4) * 8 + (t // 8) * 4)) & 15
    top = (tl.load(mrow + 10, mask=ok, other=0) >> ((t % 4) * 8 + (t // 4) * 2)) & 3
    return ((low | (top << 4)) - 32).to(tl.float32)


@triton.jit
def _k_runs(w_q, w_s, w_m, n, gi, i, K, ok, KIND: tl.constexpr):
    """`load_runs` of Q5_K (k5), Q3_K (k3) and Q2_K (k2); planes as in repack.py."""
    g = gi % 8  # 32-group inside the 256-block
    mrow = w_m + n * (K // 256 * 11) + (gi // 8) * 11  # k5/k3: 8 bit words, 3 scale words
    if KIND == 7:  # Q5_K: nibbles, fifth bits in word g, k4_scales of bytes g%4 (+4, +8)
        byte = tl.load(w_q + n * tl.multiple_of(K // 2, 16) + gi * 16 + i, mask=ok, other=0).to(tl.int32)
        qh = tl.load(mrow + g, mask=ok, other=0)
        lo = (byte & 15) | (((qh >> i) & 1) << 4)
        hi = (byte >> 4) | (((qh >> (i + 16)) & 1) << 4)
        sh = (g % 4) * 8
        a = (tl.load(mrow + 8, mask=ok, other=0) >> sh) & 255
        b = (tl.load(mrow + 9, mask=ok, other=0) >> sh) & 255
        c = (tl.load(mrow + 10, mask=ok, other=0) >> sh) & 255
        sc = tl.where(g < 4, a & 63, (c & 15) | ((a >> 6) << 4)).to(tl.float32)
        mn = tl.where(g < 4, b & 63, (c >> 4) | ((b >> 6) << 4)).to(tl.float32)
        d = tl.load(w_s + n * (K // 128) + (gi // 8) * 2, mask=ok, other=0).to(tl.float32)
        dmin = tl.load(w_s + n * (K // 128) + (gi // 8) * 2 + 1, mask=ok, other=0).to(tl.float32)
        step = d * sc
        off = -(dmin * mn)
        lo = lo.to(tl.float32) * step + off
        hi = hi.to(tl.float32) * step + off
    else:  # 2-bit crumbs: group gi in chunk g//2, bits 4*(g%2) + {0-1: lo, 2-3: hi}
        row = n * tl.multiple_of(K // 4, 16)  # K % 256 == 0: 16-byte runs stay 16-byte aligned
        cr = tl.load(w_q + row + (gi // 8) * 64 + (g // 2) * 16 + i, mask=ok, other=0).to(tl.int32)
        lo = (cr >> ((g % 2) * 4)) & 3
        hi = (cr >> ((g % 2) * 4 + 2)) & 3
        if KIND == 8:  # Q3_K: third bit in word g, d * (sc - 32) * (q - 4), sub-blocks 2g, 2g+1
            hb = tl.load(mrow + g, mask=ok, other=0)
            d = tl.load(w_s + n * (K // 256) + gi // 8, mask=ok, other=0).to(tl.float32)
            lo = ((lo | (((hb >> i) & 1) << 2)) - 4).to(tl.float32) * (d * _k3_scale(mrow, g * 2, ok))
            hi = ((hi | (((hb >> (i + 16)) & 1) << 2)) - 4).to(tl.float32) * (d * _k3_scale(mrow, g * 2 + 1, ok))
        else:  # Q2_K: scale byte per 16, d * (sc & 15) * q - dmin * (sc >> 4)
            d = tl.load(w_s + n * (K // 128) + (gi // 8) * 2, mask=ok, other=0).to(tl.float32)
            dmin = tl.load(w_s + n * (K // 128) + (gi // 8) * 2 + 1, mask=ok, other=0).to(tl.float32)
            sc_lo = tl.load(w_m + n * (K // 16) + gi * 2, mask=ok, other=0).to(tl.int32)
            sc_hi = tl.load(w_m + n * (K // 16) + gi * 2 + 1, mask=ok, other=0).to(tl.int32)
            lo = lo.to(tl.float32) * (d * (sc_lo & 15).to(tl.float32)) - dmin * (sc_lo >> 4).to(tl.float32)
            hi = hi.to(tl.float32) * (d * (sc_hi & 15).to(tl.float32)) - dmin * (sc_hi >> 4).to(tl.float32)
    return lo, hi


@triton.jit
def load_runs(w_q, w_s, w_m, n, gi, i, K, ok, KIND: tl.constexpr, HAS_MIN: tl.constexpr):
    """Float32 weights (lo, hi) = w[n, 32 gi + i], w[n, 32 gi + 16 + i] of a repacked (N, K)
    weight; n, gi (32-group of the row) and i (0..15) broadcast, e.g. (BN,1,1), (1,NG,1),
    (1,1,16); `ok` masks (n, gi).  Quants are 16 contiguous bytes (or values) per run, the
    scales one load per (n, gi)."""
    if KIND >= 7:
        lo, hi = _k_runs(w_q, w_s, w_m, n, gi, i, K, ok, KIND)
    elif KIND >= 4:
        lo, hi = _flat_runs(w_q, w_s, n, gi, i, K, ok, KIND)
    else:
        if KIND == 3:  # Q6_K: per 256, 128 B of nibbles then 64 B of top bits
            blk = n * tl.multiple_of(K // 4 * 3, 16) + (gi // 8) * 192
            byte = tl.load(w_q + blk + (gi % 8) * 16 + i, mask=ok, other=0).to(tl.int32)
        else:
            byte = tl.load(w_q + n * tl.multiple_of(K // 2, 16) + gi * 16 + i, mask=ok, other=0).to(tl.int32)
        lo = byte & 15
        hi = byte >> 4
        if KIND == 0:  # Q4_0 / Q4_1
            d = tl.load(w_s + n * (K // 32) + gi, mask=ok, other=0).to(tl.float32)
            if HAS_MIN:
                off = tl.load(w_m + n * (K // 32) + gi, mask=ok, other=0).to(tl.float32)
            else:
                off = d * -8.0
            lo = lo.to(tl.float32) * d + off
            hi = hi.to(tl.float32) * d + off
        elif KIND == 1:  # Q5_0 / Q5_1: bit j of qh is the fifth bit of element j
            qh = tl.load(w_m + n * (K // 32) + gi, mask=ok, other=0)  # int32: ggml's u32 word
            lo = lo | (((qh >> i) & 1) << 4)
            hi = hi | (((qh >> (i + 16)) & 1) << 4)
            if HAS_MIN:  # Q5_1: s = (d, m) per 32
                d = tl.load(w_s + n * (K // 16) + gi * 2, mask=ok, other=0).to(tl.float32)
                off = tl.load(w_s + n * (K // 16) + gi * 2 + 1, mask=ok, other=0).to(tl.float32)
                lo = lo.to(tl.float32) * d + off
                hi = hi.to(tl.float32) * d + off
            else:
                d = tl.load(w_s + n * (K // 32) + gi, mask=ok, other=0).to(tl.float32)
                lo = (lo - 16).to(tl.float32) * d
                hi = (hi - 16).to(tl.float32) * d
        elif KIND == 2:  # Q4_K: s = (d, dmin) per 256, m = (sc, mn) per 32
            d = tl.load(w_s + n * (K // 128) + (gi // 8) * 2, mask=ok, other=0).to(tl.float32)
            dmin = tl.load(w_s + n * (K // 128) + (gi // 8) * 2 + 1, mask=ok, other=0).to(tl.float32)
            sc = tl.load(w_m + n * (K // 16) + gi * 2, mask=ok, other=0).to(tl.float32)
            mn = tl.load(w_m + n * (K // 16) + gi * 2 + 1, mask=ok, other=0).to(tl.float32)
            step = d * sc
            off = -(dmin * mn)
            lo = lo.to(tl.float32) * step + off
            hi = hi.to(tl.float32) * step + off
        else:  # Q6_K: top bits of group gi in chunk gi//2, bits 4*(gi%2) + {0-1: lo, 2-3: hi}
            top = tl.load(w_q + blk + 128 + ((gi % 8) // 2) * 16 + i, mask=ok, other=0).to(tl.int32)
            sh = (gi % 2) * 4
            d = tl.load(w_s + n * (K // 256) + gi // 8, mask=ok, other=0).to(tl.float32)
            sc_lo = tl.load(w_m + n * (K // 16) + gi * 2, mask=ok, other=0).to(tl.float32)
            sc_hi = tl.load(w_m + n * (K // 16) + gi * 2 + 1, mask=ok, other=0).to(tl.float32)
            lo = ((lo | (((top >> sh) & 3) << 4)) - 32).to(tl.float32) * (d * sc_lo)
            hi = ((hi | (((top >> (sh + 2)) & 3) << 4)) - 32).to(tl.float32) * (d * sc_hi)
    return lo, hi
