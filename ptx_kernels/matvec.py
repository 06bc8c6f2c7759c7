"""Quantized mat-vec for decode: y (B, N) = x (B, K) @ W.T, batch 1..8, W in the repacked layout.

Versions: `b1` (one activation row per program, batch on grid axis 1) and `b8` (up to eight rows
per program so W is read once for the whole batch).  Geometry: each program owns BLOCK_N output
rows and walks K in BLOCK_K steps; the 4-bit kinds load 16 contiguous bytes per 32-group and
split them into its low/high halves (no interleave needed); every type loads through
`dequant.load_runs`.
Limits: K % 32 == 0 (K % 256 for the K-quants), pointers 16-byte aligned, K divisible by 16.
x and y are float32, rows contiguous (row stride K for x, N for y).
Reference: `reference.matvec`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import load_runs, unused_planes, weight_constexprs, weight_limits, weight_params
from .pdl import grid_dependency
from .repack import FORMATS
from .row_dot import row_block_dot
from .spec import KernelSpec


@triton.jit
def matvec_kernel(w_q, w_s, w_m, x_ptr, y_ptr, N, K, B,
                  KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
                  PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    # Tiles are (rows, 32-groups, 16): each group is two runs of 16 elements (i and i+16), the
    # quants of a run one contiguous vector load, its scales one load (dequant.load_runs).
    # Products accumulate elementwise and are reduced once after the K loop (no cross-thread
    # reduction inside it).
    NG: tl.constexpr = BLOCK_K // 32
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    if BLOCK_B == 1:  # one activation row: the barrier-free loop of row_dot.py
        b = tl.program_id(1)
        y1, _, _ = row_block_dot(w_q, w_s, w_m, w_q, w_s, w_m, x_ptr + b * K, x_ptr, rn[:, None, None],
                                 rn[:, None, None] < N, 0, K, K, False, False, KIND, HAS_MIN, BLOCK_N, BLOCK_K)
        tl.store(y_ptr + b * N + rn, y1, mask=rn < N)
        return
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    g = tl.arange(0, NG)[None, :, None]  # (1, NG, 1)
    i = tl.arange(0, 16)[None, None, :]  # (1, 1, 16)
    n3 = rn[:, None, None]  # (BN, 1, 1)
    b3 = rb[:, None, None]  # (BB, 1, 1)
    n_ok = n3 < N
    b_ok = b3 < B
    acc = tl.zeros((BLOCK_B, BLOCK_N, NG, 16), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        gi = k0 // 32 + g  # (1, NG, 1) 32-group of the row
        kg = gi * 32
        g_ok = kg < K
        w_lo, w_hi = load_runs(w_q, w_s, w_m, n3, gi, i, K, n_ok & g_ok, KIND, HAS_MIN)  # (BN, NG, 16)
        x_ok = b_ok & g_ok
        x_lo = tl.load(x_ptr + b3 * K + kg + i, mask=x_ok, other=0)  # (BB, NG, 16)
        x_hi = tl.load(x_ptr + b3 * K + kg + 16 + i, mask=x_ok, other=0)
        acc += w_lo[None, :, :, :] * x_lo[:, None, :, :] + w_hi[None, :, :, :] * x_hi[:, None, :, :]
    y = tl.sum(tl.sum(acc, axis=3), axis=2)  # (BB, BN)
    tl.store(y_ptr + rb[:, None] * N + rn[None, :], y, mask=(rb[:, None] < B) & (rn[None, :] < N))


# version -> (BLOCK_B, BLOCK_N, BLOCK_K, num_warps); b1 as the fused b1 mat-vecs (matvec_fused.py)
VERSIONS = {"b1": (1, 4, 1024, 4), "b8": (8, 4, 128, 4)}


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
                deps=("dequant", "repack", "row_dot", "spec"),
                qtype=qtype,
            ))
    return out
