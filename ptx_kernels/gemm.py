"""Prefill GEMM on tensor cores: y (M, N) f32 = x (M, K) f32 @ W.T, W dequantized on the fly.

Each program computes a BLOCK_M x BLOCK_N tile of y, walking K in BLOCK_K steps: the x tile is
rounded to float16 and the W tile (repacked layout, see repack.py) is dequantized in registers
to float16, then `tl.dot` accumulates in float32 (mma.sync on sm_80, wgmma on sm_90a).
Power-of-two scaling keeps x inside float16's range: in each K step, a row whose max |x| over
the BLOCK_K tile reaches 2^15 (biased f32 exponent E >= 142) is multiplied by 2^-e, e = E - 141,
before the cast (its max lands in [2^14, 2^15), far from 65504), and the accumulator goes through
the dot in the same units: acc = dot(x 2^-e, W, acc 2^-e) 2^e.  All three multiplications are
exact (powers of two from integer arithmetic on the f32 bits, no log2), and a tile below 2^15
multiplies by 1: bit for bit the unscaled GEMM.  Why: real checkpoints feed `down` rows with
channels in the thousands ("massive activations"); a value past 65504 became inf, then NaN
logits.  Measurements, costs and the choice against bf16/tf32 operands and a separate row-max
pass: docs/benchmarks/cuda.md.  Cost: no extra memory traffic; per K step a row max over the x
tile (already in registers) and two multiplies of the accumulator.
Precision: both operands pass through float16 (relative rounding 2^-11 each); in a scaled tile,
elements below 2^(e-14) become f16 subnormals (absolute error <= 2^(e-25), negligible against
the tile's max of 2^(e+14)).
Limits: K % 32 == 0 (K % 256 for the K-quants), pointers 16-byte aligned, K divisible by 16.
Reference: `reference.matvec` (same math, any M).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import load_runs, unused_planes, weight_constexprs, weight_limits, weight_params
from .pdl import grid_dependency
from .repack import FORMATS
from .spec import KernelSpec


@triton.jit
def _w_tile(w_q, w_s, w_m, n3, gi, i, K, ok, KIND: tl.constexpr, HAS_MIN: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BN, BK) float32 W tile of rows n3 at 32-groups gi (dequantized)."""
    # built as (rows, 32-groups, [low run, high run], 16) by dequant.load_runs (contiguous quant
    # loads, one scale load per run), then flattened
    w_lo, w_hi = load_runs(w_q, w_s, w_m, n3, gi, i, K, ok, KIND, HAS_MIN)
    w = tl.join(w_lo, w_hi)  # (BN, NG, 16, 2)
    w = tl.permute(w, (0, 1, 3, 2))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def gemm_loop(w_q, w_s, w_m, u_q, u_s, u_m, x_ptr, g_ptr, rm, rn, M, N, K,
              USE_G: tl.constexpr, DUAL: tl.constexpr, KIND: tl.constexpr, HAS_MIN: tl.constexpr,
              X_EXP_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """The K loop of a (BM, BN) tile: (acc, acc_u, sq) with acc = (x [* g]) @ W.T over rows rm and
    columns rn, acc_u the same with U when DUAL (else zeros), sq the sum of x^2 of each row when
    USE_G (the rmsnorm's, from the same x loads; else zeros).  x passes through float16 with the
    power-of-two row scaling described above."""
    NG: tl.constexpr = BLOCK_K // 32
    m_ok = rm < M
    n3 = rn[:, None, None]  # (BN, 1, 1)
    n_ok3 = n3 < N
    g = tl.arange(0, NG)[None, :, None]  # (1, NG, 1)
    i = tl.arange(0, 16)[None, None, :]  # (1, 1, 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    sq = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0)
        if USE_G:
            sq += tl.sum(x * x, axis=1)
            x = x * tl.load(g_ptr + rk, mask=rk < K, other=0)[None, :]
        amax = tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True)  # (BM,) f32 bits of the row max
        e = tl.maximum(((amax >> 23) & 255) - X_EXP_SHIFT, 0)  # 0 unless the tile reaches 2^15
        down = ((127 - e) << 23).to(tl.float32, bitcast=True)[:, None]  # 2^-e
        up = ((127 + e) << 23).to(tl.float32, bitcast=True)[:, None]  # 2^e
        gi = k0 // 32 + g
        ok = n_ok3 & (gi * 32 < K)
        w = _w_tile(w_q, w_s, w_m, n3, gi, i, K, ok, KIND, HAS_MIN, BLOCK_N, BLOCK_K)
        acc = tl.dot((x * down).to(tl.float16), tl.trans(w.to(tl.float16)), acc * down) * up  # (the shipped order)
        if DUAL:
            u = _w_tile(u_q, u_s, u_m, n3, gi, i, K, ok, KIND, HAS_MIN, BLOCK_N, BLOCK_K)
            acc_u = tl.dot((x * down).to(tl.float16), tl.trans(u.to(tl.float16)), acc_u * down) * up
    return acc, acc_u, sq


@triton.jit
def gemm_kernel(w_q, w_s, w_m, x_ptr, y_ptr, M, N, K,
                KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                X_EXP_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr,
                PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    acc, _, _ = gemm_loop(w_q, w_s, w_m, w_q, w_s, w_m, x_ptr, x_ptr, rm, rn, M, N, K, False, False,
                          KIND, HAS_MIN, X_EXP_SHIFT, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
X_EXP_SHIFT = 141  # 127 + 14: an x tile row whose max |x| has exponent >= 15 is scaled by 2^-(E - 141)


def specs() -> list[KernelSpec]:
    return [
        KernelSpec(
            name=f"gemm_{qtype.lower()}",
            family="gemm",
            fn="gemm_kernel",
            params=weight_params(qtype) + (("x", "*fp32"), ("y", "*fp32"),
                                           ("M", "i32"), ("N", "i32"), ("K", "i32")),
            constexprs={**weight_constexprs(qtype), "X_EXP_SHIFT": X_EXP_SHIFT,
                        "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K},
            grid=(f"cdiv(M, {BLOCK_M})", f"cdiv(N, {BLOCK_N})", "1"),
            sizes={},
            limits=weight_limits(qtype, "K") + ("M >= 1", "N >= 1"),
            reference="reference.matvec",
            num_warps=4,
            num_stages=3,
            aligned=("w_q", "w_s", "w_m", "x", "y", "K"),
            unused=unused_planes(qtype),
            doc="y (M, N) f32 = x (M, K) f32 @ W.T via f16 tensor cores (x rows scaled by powers of "
                f"two into f16 range), W {qtype} repacked",
            deps=("dequant", "repack", "spec"),
            qtype=qtype,
        )
        for qtype in FORMATS
    ]
