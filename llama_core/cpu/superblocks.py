"""numba kernels on raw GGUF rows for the 256-element super-block formats (Q4_K, Q5_K, Q6_K).

Same contract and lane scheme as `blocks32` (read that first): `mv_*` multiplies a few
activation rows, `dq_*` dequantizes a slab of rows for BLAS.  `s[t, b]` holds the sums of
x[t] over 32-element sub-blocks (computed first), which Q4_K/Q5_K's minimums multiply.

Super-block layouts (bytes; gguf.blocks.BLOCKS has them, the kernels spell them as literals for
the reason blocks32 gives):
    Q4_K (144): d f16, dmin f16, scales[12] (8 six-bit scales + 8 six-bit mins), qs[128]
    Q5_K (176): d, dmin, scales[12], qh[32], qs[128]
    Q6_K (210): ql[128], qh[64], scales int8[16], d f16
In Q4_K/Q5_K, 32-byte chunk c of qs holds sub-block 2c in its low nibbles and 2c+1 in its
high nibbles; Q5_K's fifth bit of sub-block k, element l is bit k of qh[l].  Q6_K has two
halves of 128 elements; in half h, element 32g + l takes the low (g < 2) or high nibble of
ql[64h + 32(g % 2) + l] and bits 2g..2g+1 of qh[32h + l], minus 32; its scale is
scales[8h + 2g + l // 16].
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ukgpu.llama_core.cpu.blocks32 import (
    CHUNKS,
    OPTS,
    SERIAL,
    U4,
    U15,
    R,
    block_sums,
    chunk_range,
    f16,
)
from ukgpu.llama_core.gguf.quants import k4_scales

_k4_scales = njit(inline="always")(k4_scales)  # quants' unpack itself, compiled for bytes


@njit(inline="always")
def scale_min_k4(wr, o, k):
    """Six-bit scale and min of sub-block k (0..7) from the 12 packed bytes at wr[o:]."""
    j = k & 3
    sc, mn, sc_hi, mn_hi = _k4_scales(wr[o + j], wr[o + j + 4], wr[o + j + 8])
    if k < 4:
        return np.float32(sc), np.float32(mn)
    return np.float32(sc_hi), np.float32(mn_hi)


@njit(inline="always")
def k45_lanes(wr, o, li, xr, xb, sr, sb, five):
    """Add one Q4_K/Q5_K super-block's 256 products to the lanes; returns its minimums' term."""
    qo = o + (48 if five else 16)
    d = f16(wr[o], wr[o + 1])
    dmin = f16(wr[o + 2], wr[o + 3])
    bias = np.float32(0.0)
    for cc in range(4):
        sc1, m1 = scale_min_k4(wr, o + 4, 2 * cc)
        sc2, m2 = scale_min_k4(wr, o + 4, 2 * cc + 1)
        d1, d2 = d * sc1, d * sc2
        bias -= dmin * (m1 * sr[sb * 8 + 2 * cc] + m2 * sr[sb * 8 + 2 * cc + 1])
        qb, x1 = qo + 32 * cc, xb + 64 * cc
        if five:
            for l in range(32):
                q = wr[qb + l]
                h = wr[o + 16 + l] >> (2 * cc)
                lo = np.uint8(q & U15) | np.uint8((h & 1) << 4)
                hi = np.uint8(q >> U4) | np.uint8((h & 2) << 3)
                li[l] += d1 * (np.float32(lo) * xr[x1 + l]) + d2 * (np.float32(hi) * xr[x1 + 32 + l])
        else:
            for l in range(32):
                q = wr[qb + l]
                li[l] += (d1 * (np.float32(np.uint8(q & U15)) * xr[x1 + l])
                          + d2 * (np.float32(np.uint8(q >> U4)) * xr[x1 + 32 + l]))
    return bias


@njit(**OPTS)
def mv_q4_k(w, x, y):
    s = block_sums(x)  # [n, in/32]
    out, n, nsb = w.shape[0], x.shape[0], x.shape[1] // 256
    ntiles = (out + R - 1) // R
    nch = min(ntiles, CHUNKS)
    for c in prange(nch):
        lanes = np.empty((R, 32), np.float32)
        bias = np.empty(R, np.float32)
        t0, t1 = chunk_range(c, nch, ntiles)
        for tile in range(t0, t1):
            r0 = tile * R
            rn = min(R, out - r0)
            for t in range(n):
                lanes[:] = 0
                bias[:] = 0
                for sb in range(nsb):
                    for i in range(rn):
                        bias[i] += k45_lanes(w[r0 + i], sb * 144, lanes[i], x[t], sb * 256, s[t], sb, False)
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum() + bias[i]


@njit(**OPTS)
def mv_q5_k(w, x, y):
    s = block_sums(x)  # [n, in/32]
    out, n, nsb = w.shape[0], x.shape[0], x.shape[1] // 256
    ntiles = (out + R - 1) // R
    nch = min(ntiles, CHUNKS)
    for c in prange(nch):
        lanes = np.empty((R, 32), np.float32)
        bias = np.empty(R, np.float32)
        t0, t1 = chunk_range(c, nch, ntiles)
        for tile in range(t0, t1):
            r0 = tile * R
            rn = min(R, out - r0)
            for t in range(n):
                lanes[:] = 0
                bias[:] = 0
                for sb in range(nsb):
                    for i in range(rn):
                        bias[i] += k45_lanes(w[r0 + i], sb * 176, lanes[i], x[t], sb * 256, s[t], sb, True)
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum() + bias[i]


@njit(inline="always")
def q6(lq, hq, shift, high):
    """Signed six-bit value: nibble of ql byte lq (high or low), bits shift..shift+1 of qh byte hq."""
    nib = (np.int32(lq) >> 4) if high else (np.int32(lq) & 15)
    return np.float32((nib | (((np.int32(hq) >> shift) & 3) << 4)) - 32)


@njit(inline="always")
def q6_half(wr, o, h, li, xr, xh, d, l0):
    """Lanes l0..l0+15 of half h of the super-block at wr[o:]: 4 weights per lane."""
    sc = o + 192 + 8 * h + l0 // 16
    s0 = d * np.float32(np.int8(wr[sc]))
    s1 = d * np.float32(np.int8(wr[sc + 2]))
    s2 = d * np.float32(np.int8(wr[sc + 4]))
    s3 = d * np.float32(np.int8(wr[sc + 6]))
    ql, qh = o + 64 * h, o + 128 + 32 * h
    for l in range(l0, l0 + 16):
        a, b, hq = wr[ql + l], wr[ql + 32 + l], wr[qh + l]
        li[l] += (s0 * (q6(a, hq, 0, False) * xr[xh + l]) + s1 * (q6(b, hq, 2, False) * xr[xh + 32 + l])
                  + s2 * (q6(a, hq, 4, True) * xr[xh + 64 + l]) + s3 * (q6(b, hq, 6, True) * xr[xh + 96 + l]))


@njit(**OPTS)
def mv_q6_k(w, x, y):
    out, n, nsb = w.shape[0], x.shape[0], x.shape[1] // 256
    ntiles = (out + R - 1) // R
    nch = min(ntiles, CHUNKS)
    for c in prange(nch):
        lanes = np.empty((R, 32), np.float32)
        t0, t1 = chunk_range(c, nch, ntiles)
        for tile in range(t0, t1):
            r0 = tile * R
            rn = min(R, out - r0)
            for t in range(n):
                xr = x[t]
                lanes[:] = 0
                for sb in range(nsb):
                    o = sb * 210
                    for i in range(rn):
                        wr, li = w[r0 + i], lanes[i]
                        d = f16(wr[o + 208], wr[o + 209])
                        for h in range(2):
                            q6_half(wr, o, h, li, xr, sb * 256 + 128 * h, d, 0)
                            q6_half(wr, o, h, li, xr, sb * 256 + 128 * h, d, 16)
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum()


@njit(inline="always")
def dq_k45_row(wr, dst, bpb, five):
    for sb in range(dst.shape[0] // 256):
        o, xb = sb * bpb, sb * 256
        qo = o + (48 if five else 16)
        d = f16(wr[o], wr[o + 1])
        dmin = f16(wr[o + 2], wr[o + 3])
        for cc in range(4):
            sc1, m1 = scale_min_k4(wr, o + 4, 2 * cc)
            sc2, m2 = scale_min_k4(wr, o + 4, 2 * cc + 1)
            d1, d2, b1, b2 = d * sc1, d * sc2, dmin * m1, dmin * m2
            qb, x1 = qo + 32 * cc, xb + 64 * cc
            for l in range(32):
                q = wr[qb + l]
                lo = np.uint8(q & U15)
                hi = np.uint8(q >> U4)
                if five:
                    h = wr[o + 16 + l] >> (2 * cc)
                    lo |= np.uint8((h & 1) << 4)
                    hi |= np.uint8((h & 2) << 3)
                dst[x1 + l] = d1 * np.float32(lo) - b1
                dst[x1 + 32 + l] = d2 * np.float32(hi) - b2


@njit(**SERIAL)
def dq_q4_k(w, r0, out):
    for i in range(out.shape[0]):
        dq_k45_row(w[r0 + i], out[i], 144, False)


@njit(**SERIAL)
def dq_q5_k(w, r0, out):
    for i in range(out.shape[0]):
        dq_k45_row(w[r0 + i], out[i], 176, True)


@njit(**SERIAL)
def dq_q6_k(w, r0, out):
    for i in range(out.shape[0]):
        wr, dst = w[r0 + i], out[i]
        for sb in range(dst.shape[0] // 256):
            o = sb * 210
            d = f16(wr[o + 208], wr[o + 209])
            for h in range(2):
                ql, qh, xh = o + 64 * h, o + 128 + 32 * h, sb * 256 + 128 * h
                for l in range(32):
                    sc = o + 192 + 8 * h + l // 16
                    a, b, hq = wr[ql + l], wr[ql + 32 + l], wr[qh + l]
                    dst[xh + l] = d * np.float32(np.int8(wr[sc])) * q6(a, hq, 0, False)
                    dst[xh + 32 + l] = d * np.float32(np.int8(wr[sc + 2])) * q6(b, hq, 2, False)
                    dst[xh + 64 + l] = d * np.float32(np.int8(wr[sc + 4])) * q6(a, hq, 4, True)
                    dst[xh + 96 + l] = d * np.float32(np.int8(wr[sc + 6])) * q6(b, hq, 6, True)
