"""Mat-vec products on activations rounded to 8 bits, the way llama.cpp's CPU backend rounds them.

    mv_int8(kind, w, n_out, row_bytes, x, y)   y[n, n_out] = W @ round8(x[n, in]).T

Before each product llama.cpp rounds the activation row to the block format its weight format
multiplies with (its `vec_dot_type`), and `quantize` does the same rounding here:

    Q8_0 (32 values): d = amax / 127 (kept as f16), q = round-half-even(x * 127 / amax)
    Q8_1 (32 values): the same codes and d, and s = d * sum(q) (f16)
    Q8_K (256 values): with m the value of largest magnitude, q = min(127, round(-127 / m * x)),
                       d = 1 / (-127 / m) (float32), and the sums of each 16 codes

Every code, scale and sum matches llama.cpp's (its AVX2 rounding for Q8_0/Q8_1, its reference
rounding for Q8_K), so the integer block sums agree exactly; only the float32 order of the
scaled sums can differ.  The activation data of row t sits at `aq[t * in]` and `af[t * nf]`:
per block [d, 8 x 16 lane sums] (Q8_0), [d, s] (Q8_1) or [d, 16 sums] (Q8_K).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ukgpu.llama_core.cpu import int8_dot as dot
from ukgpu.llama_core.cpu.blocks32 import CHUNKS, OPTS, chunk_range

# kind -> weight format; the kind also picks the activation format (ACT below)
KINDS = {T.Q4_0: 0, T.Q4_1: 1, T.Q5_0: 2, T.Q5_1: 3, T.Q8_0: 4, T.Q4_K: 5, T.Q6_K: 6}
ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2
ACT = np.array([ACT_Q8_0, ACT_Q8_1, ACT_Q8_0, ACT_Q8_1, ACT_Q8_0, ACT_Q8_K, ACT_Q8_K], np.int64)
BLOCK = np.array([32, 32, 32, 32, 32, 256, 256], np.int64)  # weights per block, per kind
FLOATS = np.array([9, 2, 17], np.int64)  # float32 per activation block, per activation format


@intrinsic
def f16_round(typingctx, x):
    """float32 -> the nearest IEEE half (ties to even), back as float32."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(cache=True, nogil=True)
def _q8_32(x, aq, af, fo, with_s):  # pragma: no cover - compiled
    """One row into Q8_0 blocks (af[fo + 9b] = d, then 16 times the sums of codes 4k..4k+3, the
    lanes of the products: what unsigned 5-bit codes subtract) or Q8_1 blocks (af[fo + 2b] = d,
    af[fo + 2b + 1] = s)."""
    stride = 2 if with_s else 9
    for b in range(x.shape[0] // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[32 * b + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        o = fo + stride * b
        total = 0
        for k in range(8):
            lane = 0
            for j in range(32 * b + 4 * k, 32 * b + 4 * k + 4):
                q = np.int32(np.rint(x[j] * inv))
                aq[j] = q
                lane += q
            if not with_s:
                af[o + 1 + k] = 16 * lane
            total += lane
        af[o] = f16_round(d)
        if with_s:
            af[o + 1] = f16_round(d * np.float32(total))


@njit(cache=True, nogil=True)
def _q8_k(x, aq, af, fo):  # pragma: no cover - compiled
    """One row into Q8_K super-blocks: af[fo + 17b] = d, then the 16 sums of 16 codes."""
    for b in range(x.shape[0] // 256):
        xb = x[256 * b:256 * (b + 1)]
        amax, m = np.float32(0.0), np.float32(0.0)
        for j in range(256):
            if abs(xb[j]) > amax:
                amax, m = abs(xb[j]), xb[j]
        o = fo + 17 * b
        if amax == 0:
            aq[256 * b:256 * (b + 1)] = 0
            af[o:o + 17] = 0
            continue
        iscale = np.float32(-127.0) / m
        for g in range(16):
            total = 0
            for j in range(16 * g, 16 * g + 16):
                q = min(127, np.int32(np.rint(iscale * xb[j])))
                aq[256 * b + j] = q
                total += q
            af[o + 1 + g] = total
        af[o] = np.float32(1.0) / iscale


@njit(cache=True, nogil=True)
def quantize(x, act):  # pragma: no cover - compiled
    """x float32[n, in] -> (aq int8[n * in], af float32[n * nf], nf) in activation format `act`."""
    n, k = x.shape
    block = 256 if act == ACT_Q8_K else 32
    nf = k // block * FLOATS[act]
    aq = np.empty(n * k, np.int8)
    af = np.empty(n * nf, np.float32)
    for t in range(n):
        if act == ACT_Q8_K:
            _q8_k(x[t], aq[t * k:(t + 1) * k], af, t * nf)
        else:
            _q8_32(x[t], aq[t * k:(t + 1) * k], af, t * nf, act == ACT_Q8_1)
    return aq, af, nf


@njit(**OPTS)
def _rows(kind, w, n_out, rb, nb, aq, af, k, nf, y):  # pragma: no cover - compiled
    nch = min(n_out, CHUNKS)
    n = y.shape[0]
    for c in prange(nch):
        r0, r1 = chunk_range(c, nch, n_out)
        for r in range(r0, r1):
            for t in range(n):
                if kind == 0:
                    y[t, r] = dot.dot_q4_0(w, r * rb, nb, aq, t * k, af, t * nf)
                elif kind == 1:
                    y[t, r] = dot.dot_q4_1(w, r * rb, nb, aq, t * k, af, t * nf)
                elif kind == 2:
                    y[t, r] = dot.dot_q5_0(w, r * rb, nb, aq, t * k, af, t * nf)
                elif kind == 3:
                    y[t, r] = dot.dot_q5_1(w, r * rb, nb, aq, t * k, af, t * nf)
                elif kind == 4:
                    y[t, r] = dot.dot_q8_0(w, r * rb, nb, aq, t * k, af, t * nf)
                elif kind == 5:
                    y[t, r] = dot.dot_q4_k(w, r * rb, nb, aq, t * k, af, t * nf)
                else:
                    y[t, r] = dot.dot_q6_k(w, r * rb, nb, aq, t * k, af, t * nf)


@njit(cache=True, nogil=True)
def mv_int8(kind, w, n_out, rb, x, y):  # pragma: no cover - compiled
    """y[n, n_out] = W @ round8(x).T for W the flat GGUF rows `w` (row_bytes `rb`) of kind `kind`."""
    aq, af, nf = quantize(x, ACT[kind])
    _rows(kind, w, n_out, rb, x.shape[1] // BLOCK[kind], aq, af, x.shape[1], nf, y)


def warmup() -> None:
    """Compile (or load from numba's cache) the products for every kind, with the argument
    types a model passes (read-only mapped rows, one and several activation rows)."""
    from ukgpu.llama_core.cpu import matmul

    rng = np.random.default_rng(0)
    for qtype, kind in KINDS.items():
        rows = np.ascontiguousarray(matmul.random_blocks(qtype, 2, 256, rng)).reshape(-1)
        rows.flags.writeable = False
        for n in (1, 2):
            mv_int8(kind, rows, 2, rows.size // 2, np.ones((n, 256), np.float32), np.empty((n, 2), np.float32))
