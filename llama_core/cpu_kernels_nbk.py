"""numba kernels on raw GGUF rows for the 256-element super-block formats (Q4_K, Q5_K, Q6_K).

Same contract and lane scheme as `cpu_kernels_nb` (read that first): `mv_*` multiplies a few
activation rows, `dq_*` dequantizes a slab of rows for BLAS.  `s[t, b]` holds the sums of
x[t] over 32-element sub-blocks (computed first), which Q4_K/Q5_K's minimums multiply.

Super-block layouts (bytes):
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

from .cpu_kernels_nb import CHUNKS, OPTS, R, U4, U15, block_sums, chunk_range, f16


@njit(inline="always")
def scale_min_k4(wr, o, k):
    """Six-bit scale and min of sub-block k (0..7) from the 12 packed bytes at wr[o:]."""
    if k < 4:
        return np.float32(wr[o + k] & 63), np.float32(wr[o + k + 4] & 63)
    sc = (wr[o + k + 4] & 15) | ((wr[o + k - 4] >> 6) << 4)
    mn = (wr[o + k + 4] >> 4) | ((wr[o + k] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


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
def q6(wr, ql, qh, l, g):
    """Signed six-bit value of element 32g + l of a Q6_K half (ql, qh: byte offsets)."""
    lq = np.int32(wr[ql + 32 * (g % 2) + l])
    nib = (lq & 15) if g < 2 else (lq >> 4)
    return np.float32(np.int32(nib | (((np.int32(wr[qh + l]) >> (2 * g)) & 3) << 4)) - 32)


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
                            ql, qh = o + 64 * h, o + 128 + 32 * h
                            xh = sb * 256 + 128 * h
                            for g in range(4):
                                sa = d * np.float32(np.int8(wr[o + 192 + 8 * h + 2 * g]))
                                sbb = d * np.float32(np.int8(wr[o + 193 + 8 * h + 2 * g]))
                                xg = xh + 32 * g
                                for l in range(16):
                                    li[l] += sa * (q6(wr, ql, qh, l, g) * xr[xg + l])
                                for l in range(16, 32):
                                    li[l] += sbb * (q6(wr, ql, qh, l, g) * xr[xg + l])
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum()


@njit(**OPTS)
def dq_qk45(w, r0, out, five):
    bpb = 176 if five else 144
    qo = 48 if five else 16
    for i in prange(out.shape[0]):
        wr, dst = w[r0 + i], out[i]
        for sb in range(dst.shape[0] // 256):
            o, xb = sb * bpb, sb * 256
            d = f16(wr[o], wr[o + 1])
            dmin = f16(wr[o + 2], wr[o + 3])
            for cc in range(4):
                sc1, m1 = scale_min_k4(wr, o + 4, 2 * cc)
                sc2, m2 = scale_min_k4(wr, o + 4, 2 * cc + 1)
                d1, d2, b1, b2 = d * sc1, d * sc2, dmin * m1, dmin * m2
                qb, x1 = o + qo + 32 * cc, xb + 64 * cc
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


@njit(**OPTS)
def dq_q6_k(w, r0, out):
    for i in prange(out.shape[0]):
        wr, dst = w[r0 + i], out[i]
        for sb in range(dst.shape[0] // 256):
            o = sb * 210
            d = f16(wr[o + 208], wr[o + 209])
            for h in range(2):
                ql, qh = o + 64 * h, o + 128 + 32 * h
                for g in range(4):
                    xg = sb * 256 + 128 * h + 32 * g
                    for l in range(32):
                        sc = d * np.float32(np.int8(wr[o + 192 + 8 * h + 2 * g + l // 16]))
                        dst[xg + l] = sc * q6(wr, ql, qh, l, g)
