"""Prefill GEMM on tensor cores: y (M, N) f32 = x (M, K) f32 @ W.T, W dequantized on the fly.

Each program computes a BLOCK_M x BLOCK_N tile of y, walking K in BLOCK_K steps: the x tile is
rounded to float16 and the W tile (repacked layout, see repack.py) is dequantized in registers
to float16, then `tl.dot` accumulates in float32 (mma on sm_80, wgmma on sm_90a).
Precision: both operands pass through float16 (relative rounding 2^-11 each).
Limits: K % 32 == 0 (K % 256 for Q4_K/Q6_K), pointers 16-byte aligned, K divisible by 16.
Reference: `reference.matvec` (same math, any M).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import load_weights, unused_planes, weight_constexprs, weight_limits, weight_params
from .repack import FORMATS
from .spec import KernelSpec


@triton.jit
def gemm_kernel(w_q, w_s, w_m, x_ptr, y_ptr, M, N, K,
                KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = load_weights(w_q, w_s, w_m, rn[:, None], rk[None, :], K,
                         n_ok[:, None] & k_ok[None, :], KIND, HAS_MIN, GROUP)  # (BN, BK)
        acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64


def specs() -> list[KernelSpec]:
    return [
        KernelSpec(
            name=f"gemm_{qtype.lower()}",
            family="gemm",
            fn="gemm_kernel",
            params=weight_params(qtype) + (("x", "*fp32"), ("y", "*fp32"),
                                           ("M", "i32"), ("N", "i32"), ("K", "i32")),
            constexprs={**weight_constexprs(qtype), "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N,
                        "BLOCK_K": BLOCK_K},
            grid=(f"cdiv(M, {BLOCK_M})", f"cdiv(N, {BLOCK_N})", "1"),
            sizes={},
            limits=weight_limits(qtype, "K") + ("M >= 1", "N >= 1"),
            reference="reference.matvec",
            num_warps=4,
            num_stages=3,
            aligned=("w_q", "w_s", "w_m", "x", "y", "K"),
            unused=unused_planes(qtype),
            doc=f"y (M, N) f32 = x (M, K) f32 @ W.T via f16 tensor cores, W {qtype} repacked",
            deps=("dequant", "repack", "spec"),
            qtype=qtype,
        )
        for qtype in FORMATS
    ]
