"""Quantized mat-vec for decode: y (B, N) = x (B, K) @ W.T, batch 1..8, W in the repacked layout.

Versions: `b1` (one activation row per program, batch on grid axis 1) and `b8` (up to eight rows
per program so W is read once for the whole batch).  Geometry: each program owns BLOCK_N output
rows and walks K in BLOCK_K steps; the 4-bit kinds load BLOCK_K/2 contiguous bytes per row and
split them into the low/high halves of each 32-element run (no interleave needed).
Limits: K % 32 == 0 (K % 256 for Q4_K/Q6_K), pointers 16-byte aligned, K divisible by 16.
x and y are float32, rows contiguous (row stride K for x, N for y).
Reference: `reference.matvec`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import load_weights, unused_planes, weight_constexprs, weight_limits, weight_params
from .repack import FORMATS
from .spec import KernelSpec


@triton.jit
def matvec_kernel(w_q, w_s, w_m, x_ptr, y_ptr, N, K, B,
                  KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    n_ok = rn < N
    b_ok = rb < B
    acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if KIND == 0:
            j = tl.arange(0, BLOCK_K // 2)  # byte within the tile
            klo = k0 + (j // 16) * 32 + j % 16  # element in the low nibble; high = klo + 16
            k_ok = klo < K
            w_ok = n_ok[:, None] & k_ok[None, :]
            byte = tl.load(w_q + rn[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=w_ok, other=0)
            byte = byte.to(tl.int32)  # (BN, BK/2)
            grp = rn[:, None] * (K // 32) + (klo // 32)[None, :]
            s = tl.load(w_s + grp, mask=w_ok, other=0).to(tl.float32)
            w_lo = (byte & 15).to(tl.float32) * s
            w_hi = (byte >> 4).to(tl.float32) * s
            if HAS_MIN:
                m = tl.load(w_m + grp, mask=w_ok, other=0).to(tl.float32)
                w_lo += m
                w_hi += m
            x_ok = b_ok[:, None] & k_ok[None, :]
            x_lo = tl.load(x_ptr + rb[:, None] * K + klo[None, :], mask=x_ok, other=0)  # (BB, BK/2)
            x_hi = tl.load(x_ptr + rb[:, None] * K + (klo + 16)[None, :], mask=x_ok, other=0)
            prod = w_lo[None, :, :] * x_lo[:, None, :] + w_hi[None, :, :] * x_hi[:, None, :]
            acc += tl.sum(prod, axis=2)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = load_weights(w_q, w_s, w_m, rn[:, None], rk[None, :], K,
                             n_ok[:, None] & k_ok[None, :], KIND, HAS_MIN, GROUP)  # (BN, BK)
            x = tl.load(x_ptr + rb[:, None] * K + rk[None, :],
                        mask=b_ok[:, None] & k_ok[None, :], other=0)  # (BB, BK)
            acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
    tl.store(y_ptr + rb[:, None] * N + rn[None, :], acc, mask=b_ok[:, None] & n_ok[None, :])


# version -> (BLOCK_B, BLOCK_N, BLOCK_K, num_warps)
VERSIONS = {"b1": (1, 8, 256, 4), "b8": (8, 4, 128, 4)}


def specs() -> list[KernelSpec]:
    out = []
    for qtype in FORMATS:
        for version, (bb, bn, bk, warps) in VERSIONS.items():
            out.append(KernelSpec(
                name=f"matvec_{qtype.lower()}_{version}",
                family="matvec",
                fn="matvec_kernel",
                params=weight_params(qtype) + (("x", "*fp32"), ("y", "*fp32"),
                                               ("N", "i32"), ("K", "i32"), ("B", "i32")),
                constexprs={**weight_constexprs(qtype), "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_B": bb},
                grid=(f"cdiv(N, {bn})", f"cdiv(B, {bb})", "1"),
                sizes={},
                limits=weight_limits(qtype, "K") + ("1 <= B <= 8", "N >= 1"),
                reference="reference.matvec",
                num_warps=warps,
                num_stages=1,
                aligned=("w_q", "w_s", "w_m", "x", "y", "K"),
                unused=unused_planes(qtype),
                doc=f"y (B, N) f32 = x (B, K) f32 @ W.T, W {qtype} repacked (N, K)",
                deps=("dequant", "repack", "spec"),
                qtype=qtype,
            ))
    return out
