"""Split-K residual mat-vec for one-row decode: y += x @ W.T with K cut into `splits` chunks.

`matvec_split_add_<q>_b1`: a (1, K) x times a (N, K) weight whose rows are too few to fill the
GPU (the down projection of Qwen2.5-1.5B: 1,536 rows, K = 8,960, 384 programs of 4 rows, each
walking 9 steps of 1,024 columns).  Program (r, s) owns rows 4r..4r+3 and the s-th chunk of K
(chunks of whole 256-column blocks, the last one shorter), writes its partial sums to
`part[s, rows]`, then takes a ticket from `count[r]` (atomic add, acquire-release at GPU scope,
after a block barrier so every thread's partial is written).  The program that draws the last
ticket adds the partials in split order 0, 1, .. to y and puts `count[r]` back to 0 for the next
launch: one graph node, and the same sums in the same order on every run whichever program
arrives last, so tokens do not depend on scheduling.

Host contract: `count` holds cdiv(N, 4) int32 zeros before the first launch (each launch leaves
them zero), `part` holds splits * N float32 (scratch), launches that share them run one after the
other (one stream).  Limits: as `matvec.py`; 1 <= splits <= 8.
Reference: `reference.matvec_add` (the split changes the float32 summation order only).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import unused_planes, weight_constexprs, weight_limits, weight_params
from .pdl import grid_dependency
from .repack import FORMATS
from .row_dot import row_block_dot
from .spec import KernelSpec


@triton.jit
def matvec_split_add_kernel(w_q, w_s, w_m, x_ptr, y_ptr, part_ptr, count_ptr, N, K, splits,
                            KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    blk = tl.program_id(0)
    s = tl.program_id(1)
    rn = blk * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    chunk = tl.cdiv(tl.cdiv(K, 256), splits) * 256
    k_lo = s * chunk
    k_hi = tl.minimum(K, k_lo + chunk)
    partial, _, _ = row_block_dot(w_q, w_s, w_m, w_q, w_s, w_m, x_ptr, x_ptr, rn[:, None, None],
                                  rn[:, None, None] < N, k_lo, k_hi, K, False, False, KIND, HAS_MIN, BLOCK_N, BLOCK_K)
    row_ok = rn < N
    tl.store(part_ptr + s * N + rn, partial, mask=row_ok)
    tl.debug_barrier()  # every thread's partial is written before the ticket is taken
    ticket = tl.atomic_add(count_ptr + blk, 1, sem="acq_rel", scope="gpu")
    if ticket == splits - 1:  # the last of this row block's programs: reduce in split order
        total = tl.zeros((BLOCK_N,), tl.float32)
        for t in range(0, splits):
            total += tl.load(part_ptr + t * N + rn, mask=row_ok, other=0, cache_modifier=".cg")
        y = tl.load(y_ptr + rn, mask=row_ok, other=0)
        tl.store(y_ptr + rn, y + total, mask=row_ok)
        tl.atomic_xchg(count_ptr + blk, 0, sem="relaxed", scope="gpu")


# (BLOCK_N, BLOCK_K, num_warps): the geometry of the b1 `matvec_add` it replaces
GEOMETRY = (4, 1024, 4)


def specs() -> list[KernelSpec]:
    bn, bk, warps = GEOMETRY
    return [KernelSpec(
        name=f"matvec_split_add_{qtype.lower()}_b1",
        family="matvec_split",
        fn="matvec_split_add_kernel",
        params=weight_params(qtype) + (("x", "*fp32"), ("y", "*fp32"), ("part", "*fp32"),
                                       ("count", "*i32"), ("N", "i32"), ("K", "i32"),
                                       ("splits", "i32")),
        constexprs={**weight_constexprs(qtype), "BLOCK_N": bn, "BLOCK_K": bk},
        grid=(f"cdiv(N, {bn})", "splits", "1"),
        sizes={},
        limits=weight_limits(qtype, "K") + ("N >= 1", "1 <= splits <= 8"),
        reference="reference.matvec_add",
        num_warps=warps,
        num_stages=1,
        aligned=("w_q", "w_s", "w_m", "x", "y", "part", "K"),
        unused=unused_planes(qtype),
        doc=f"y (1, N) f32 += x (1, K) f32 @ W.T, K in `splits` chunks (partials in part (splits, N), "
            f"tickets in count (cdiv(N, {bn}) int32 zeros, left zero)); W {qtype} repacked",
        deps=("dequant", "repack", "row_dot", "spec"),
        qtype=qtype,
    ) for qtype in FORMATS]
