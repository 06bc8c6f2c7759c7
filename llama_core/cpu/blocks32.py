"""numba kernels on raw GGUF rows for the 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

Layout read here is the file's own: `w` is uint8[out, row_bytes], each row `in / 32`
consecutive blocks.  Two kinds of kernel per format:

    mv_*(w, x, y)               y[t, r] = sum_k x[t, k] * W[r, k]   (few activation rows t)
    dq_*(w, r0, out)            out[i, :] = W[r0 + i, :]           (float32 slab, for BLAS)

`s[t, b]`, the sum of x[t] over block b (32 elements), is computed first: offsets and
minimums of a block (Q4_0's -8, Q4_1's m) multiply it once per block, not per element.

The product is exact float arithmetic on the dequantized weights (float32 accumulation): a
weight block is decoded to floats and multiplied into 32 float lanes per output row; lanes
are summed once per output.  Decoding R rows per step gives the out-of-order core
independent chains.  Measured on this machine's AVX-512 core, this is ~2x faster than an
int8 (activations quantized to Q8) integer dot product written in numba, whose horizontal
per-block sums LLVM does not vectorize: so the kernels take float activations, and
llama.cpp's Q8 activation rounding, where wanted, is applied by the caller beforehand.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
# Slab dequantization runs on one thread: BLAS, which multiplies each slab right after, has
# its own thread pool, and two spinning pools on two cores stall each other (measured 100x).
SERIAL = dict(fastmath=True, cache=True, nogil=True)
R = 4  # weight rows decoded per step
CHUNKS = 64  # parallel work items per call (each allocates its scratch once)
U15 = np.uint8(15)
U4 = np.uint8(4)


@intrinsic
def f16(typingctx, lo, hi):
    """Two little-endian bytes of an IEEE half -> float32 (one vcvtph2ps)."""
    sig = types.float32(types.uint8, types.uint8)

    def codegen(context, builder, signature, args):
        i16 = ir.IntType(16)
        h = builder.or_(builder.zext(args[0], i16), builder.shl(builder.zext(args[1], i16), ir.Constant(i16, 8)))
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def h2f(typingctx, h):
    """uint16 bits of an IEEE half -> float32."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(inline="always")
def u32(wr, o):
    """Little-endian uint32 at byte o of a uint8 row."""
    return (np.uint32(wr[o]) | (np.uint32(wr[o + 1]) << 8) | (np.uint32(wr[o + 2]) << 16)
            | (np.uint32(wr[o + 3]) << 24))


@njit(inline="always")
def chunk_range(c, nch, total):
    return c * total // nch, (c + 1) * total // nch


@njit(cache=True, fastmath=True)
def block_sums(x):
    """float32[n, in] -> float32[n, in/32]: sums over 32-element blocks."""
    n, nb = x.shape[0], x.shape[1] // 32
    s = np.empty((n, nb), np.float32)
    for t in range(n):
        for b in range(nb):
            s[t, b] = x[t, b * 32 : b * 32 + 32].sum()
    return s


# --- mat-vec kernels ---------------------------------------------------------------------

# Block geometry is spelled as literal constants in each kernel: numba passes values derived
# from arguments into the outlined parallel loop as variables, and LLVM then no longer
# vectorizes the block loops (measured 2.5x slower), hence one kernel per format.

@njit(**OPTS)
def mv_q4_0(w, x, y):
    """Q4_0 block (18 B): d f16, qs[16]; element j / j+16 = low / high nibble of qs[j], d*(q-8)."""
    s = block_sums(x)  # [n, in/32]
    out, n, nb = w.shape[0], x.shape[0], x.shape[1] // 32
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
                xr, sr = x[t], s[t]
                lanes[:] = 0
                bias[:] = 0
                for b in range(nb):
                    o, xb = b * 18, b * 32
                    for i in range(rn):
                        wr, li = w[r0 + i], lanes[i]
                        d = f16(wr[o], wr[o + 1])
                        bias[i] -= 8.0 * d * sr[b]
                        for j in range(16):
                            q = wr[o + 2 + j]
                            li[j] += d * (np.float32(np.uint8(q & U15)) * xr[xb + j])
                            li[j + 16] += d * (np.float32(np.uint8(q >> U4)) * xr[xb + 16 + j])
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum() + bias[i]


@njit(**OPTS)
def mv_q4_1(w, x, y):
    """Q4_1 block (20 B): d f16, m f16, qs[16]; value d*q + m."""
    s = block_sums(x)  # [n, in/32]
    out, n, nb = w.shape[0], x.shape[0], x.shape[1] // 32
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
                xr, sr = x[t], s[t]
                lanes[:] = 0
                bias[:] = 0
                for b in range(nb):
                    o, xb = b * 20, b * 32
                    for i in range(rn):
                        wr, li = w[r0 + i], lanes[i]
                        d = f16(wr[o], wr[o + 1])
                        bias[i] += f16(wr[o + 2], wr[o + 3]) * sr[b]
                        for j in range(16):
                            q = wr[o + 4 + j]
                            li[j] += d * (np.float32(np.uint8(q & U15)) * xr[xb + j])
                            li[j + 16] += d * (np.float32(np.uint8(q >> U4)) * xr[xb + 16 + j])
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum() + bias[i]


@njit(inline="always")
def q5_lanes(wr, qo, qh, li, d, xr, xb):
    """Add one Q5 block's 32 products to the lanes (qs at wr[qo:], fifth bits in qh, added
    as masked x values)."""
    for j in range(16):
        q = wr[qo + j]
        xl, xh = xr[xb + j], xr[xb + 16 + j]
        e = (xl if (qh >> j) & np.uint32(1) else np.float32(0)) + (
            xh if (qh >> (j + 16)) & np.uint32(1) else np.float32(0))
        li[j] += d * (np.float32(np.uint8(q & U15)) * xl + np.float32(np.uint8(q >> U4)) * xh
                      + np.float32(16) * e)


@njit(**OPTS)
def mv_q5_0(w, x, y):
    """Q5_0 block (22 B): d f16, qh u32 (bit j = fifth bit of element j), qs[16]; d*(q-16)."""
    s = block_sums(x)  # [n, in/32]
    out, n, nb = w.shape[0], x.shape[0], x.shape[1] // 32
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
                xr, sr = x[t], s[t]
                lanes[:] = 0
                bias[:] = 0
                for b in range(nb):
                    o, xb = b * 22, b * 32
                    for i in range(rn):
                        wr = w[r0 + i]
                        d = f16(wr[o], wr[o + 1])
                        bias[i] -= 16.0 * d * sr[b]
                        q5_lanes(wr, o + 6, u32(wr, o + 2), lanes[i], d, xr, xb)
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum() + bias[i]


@njit(**OPTS)
def mv_q5_1(w, x, y):
    """Q5_1 block (24 B): d f16, m f16, qh u32, qs[16]; d*q + m."""
    s = block_sums(x)  # [n, in/32]
    out, n, nb = w.shape[0], x.shape[0], x.shape[1] // 32
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
                xr, sr = x[t], s[t]
                lanes[:] = 0
                bias[:] = 0
                for b in range(nb):
                    o, xb = b * 24, b * 32
                    for i in range(rn):
                        wr = w[r0 + i]
                        d = f16(wr[o], wr[o + 1])
                        bias[i] += f16(wr[o + 2], wr[o + 3]) * sr[b]
                        q5_lanes(wr, o + 8, u32(wr, o + 4), lanes[i], d, xr, xb)
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum() + bias[i]


@njit(**OPTS)
def mv_q8_0(w, x, y):
    """Q8_0 block: d f16, qs int8[32]; value d*q."""
    out, n, nb = w.shape[0], x.shape[0], x.shape[1] // 32
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
                for b in range(nb):
                    o, xb = b * 34, b * 32
                    for i in range(rn):
                        wr, li = w[r0 + i], lanes[i]
                        d = f16(wr[o], wr[o + 1])
                        for j in range(32):
                            li[j] += d * (np.float32(np.int8(wr[o + 2 + j])) * xr[xb + j])
                for i in range(rn):
                    y[t, r0 + i] = lanes[i].sum()


# --- slab dequantization (prefill: dequantize a slab of rows, then BLAS) -----------------

@njit(inline="always")
def dq32_row(wr, dst, bpb, qo, ho, mo, offset):
    """Dequantize one row of 32-element blocks; called with literal geometry: block bytes,
    qs / qh / m offsets (0: absent) and the offset (in units of d) of formats without m."""
    for b in range(dst.shape[0] // 32):
        o = b * bpb
        d = f16(wr[o], wr[o + 1])
        m = f16(wr[o + mo], wr[o + mo + 1]) if mo else np.float32(offset) * d
        qh = u32(wr, o + ho) if ho else np.uint32(0)
        for j in range(16):
            q = wr[o + qo + j]
            lo = np.uint32(q & U15) | (((qh >> j) & np.uint32(1)) << 4)
            hi = np.uint32(q >> U4) | (((qh >> (j + 16)) & np.uint32(1)) << 4)
            dst[b * 32 + j] = d * np.float32(lo) + m
            dst[b * 32 + 16 + j] = d * np.float32(hi) + m


@njit(**SERIAL)
def dq_q4_0(w, r0, out):
    for i in range(out.shape[0]):
        dq32_row(w[r0 + i], out[i], 18, 2, 0, 0, -8.0)


@njit(**SERIAL)
def dq_q4_1(w, r0, out):
    for i in range(out.shape[0]):
        dq32_row(w[r0 + i], out[i], 20, 4, 0, 2, 0.0)


@njit(**SERIAL)
def dq_q5_0(w, r0, out):
    for i in range(out.shape[0]):
        dq32_row(w[r0 + i], out[i], 22, 6, 2, 0, -16.0)


@njit(**SERIAL)
def dq_q5_1(w, r0, out):
    for i in range(out.shape[0]):
        dq32_row(w[r0 + i], out[i], 24, 8, 4, 2, 0.0)


@njit(**SERIAL)
def dq_q8_0(w, r0, out):
    for i in range(out.shape[0]):
        wr, dst = w[r0 + i], out[i]
        for b in range(dst.shape[0] // 32):
            o = b * 34
            d = f16(wr[o], wr[o + 1])
            for j in range(32):
                dst[b * 32 + j] = d * np.float32(np.int8(wr[o + 2 + j]))
