"""`row_block_dot`: the one-activation-row K loop shared by every b1 mat-vec (plain, fused, split-K).

Why a loop of its own: Triton gives each load its register layout from that load's shape and
element width.  A weight tile of (rows, 32-groups, 16) u8 quants and an x tile of (1, 32-groups,
16) float32 get two different layouts, so the products need a layout conversion inside the K
loop: a round trip through shared memory with a block barrier on each side (8 `bar.sync` a step
in the b1 kernels built before this loop).  Here x (and the norm weight g) are loaded with the
tile's full shape, every row of the tile reading the same x elements (L1 hits, no extra HBM
bytes), so quants, scales, x and g share one layout: the loop has no shared memory and no
barrier, each warp streams on its own, and a thread's quants are one contiguous vector load
(16 bytes when the tile holds 16 quant bytes a thread: 4-bit rows, BLOCK_N * BLOCK_K = 4096 over
128 threads).  `tests/unit/ptx/test_ptx_loop_barriers.py` checks the built PTX for it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import load_runs


@triton.jit
def row_block_dot(w_q, w_s, w_m, u_q, u_s, u_m, x_row, g_ptr, n3, n_ok, k_lo, k_hi, K,
                  USE_G: tl.constexpr, DUAL: tl.constexpr, KIND: tl.constexpr, HAS_MIN: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """((BN,) sum over k_lo <= k < k_hi of W[n, k] * x[k] (* g[k] when USE_G), the same with U when
    DUAL (both weights' loads of a step in flight together: the GLU's gate and up; else zeros),
    (BN,) sum of x[k]^2 over the same k when USE_G, else zeros), n = n3 (BN, 1, 1) masked by n_ok;
    x_row points at the activation row; k_lo and k_hi are multiples of 32.  The sum of squares
    (every row of the tile gets the same) is the rmsnorm's, from the x the loop loads anyway: no
    pass of its own."""
    NG: tl.constexpr = BLOCK_K // 32
    g = tl.arange(0, NG)[None, :, None]  # (1, NG, 1)
    i = tl.arange(0, 16)[None, None, :]  # (1, 1, 16)
    acc = tl.zeros((BLOCK_N, NG, 16), tl.float32)
    acc_u = tl.zeros((BLOCK_N, NG, 16), tl.float32)
    sq = tl.zeros((BLOCK_N, NG, 16), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        gi = k0 // 32 + g  # (1, NG, 1) 32-group of the row
        kg = gi * 32
        ok = n_ok & (kg < k_hi)  # (BN, NG, 1)
        w_lo, w_hi = load_runs(w_q, w_s, w_m, n3, gi, i, K, ok, KIND, HAS_MIN)  # (BN, NG, 16)
        if DUAL:
            u_lo, u_hi = load_runs(u_q, u_s, u_m, n3, gi, i, K, ok, KIND, HAS_MIN)
        xp = tl.broadcast_to(x_row + kg + i, (BLOCK_N, NG, 16))
        x_lo = tl.load(xp, mask=ok, other=0)
        x_hi = tl.load(xp + 16, mask=ok, other=0)
        if USE_G:
            sq += x_lo * x_lo + x_hi * x_hi
            gp = tl.broadcast_to(g_ptr + kg + i, (BLOCK_N, NG, 16))
            x_lo = x_lo * tl.load(gp, mask=ok, other=0)
            x_hi = x_hi * tl.load(gp + 16, mask=ok, other=0)
        acc += w_lo * x_lo + w_hi * x_hi
        if DUAL:
            acc_u += u_lo * x_lo + u_hi * x_hi
    return (tl.sum(tl.sum(acc, axis=2), axis=1), tl.sum(tl.sum(acc_u, axis=2), axis=1),
            tl.sum(tl.sum(sq, axis=2), axis=1))
