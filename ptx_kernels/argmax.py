"""Greedy sampling over a wide vocabulary row in two launches (`argmax_f32` in elementwise.py runs
one program per row: a 151,936-wide row is then one CTA's serial walk).

- argmax_part_f32, grid (B, cdiv(V, span)): program (b, p) takes columns [p*span, min((p+1)*span,
  V)) of row b and writes part_val[b, p] (its maximum, float32) and part_idx[b, p] (the first
  column holding it, int32).
- argmax_reduce_f32, grid (B,): out[b] = the part_idx of the first part holding the largest
  part_val of row b (parts are in column order, so that is the row's first maximum).
Ties resolve to the first index as numpy's argmax; a row of -inf gives 0.  NaN is not ordered
(as argmax_f32).  Pick span with `loader.argmax_split(V)`.  Reference: `reference.argmax`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .elementwise import first_max
from .pdl import grid_dependency
from .spec import KernelSpec

BLOCK = 1024
BLOCK_P = 256
NO_INDEX = 2**31 - 1


@triton.jit
def argmax_part_kernel(logits_ptr, val_ptr, idx_ptr, V, span, BLOCK: tl.constexpr,
                       PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    b = tl.program_id(0)
    p = tl.program_id(1)
    lo = p * span
    best, best_i = first_max(logits_ptr, b.to(tl.int64) * V, lo, tl.minimum(lo + span, V), BLOCK)
    part = b * tl.num_programs(1) + p
    tl.store(val_ptr + part, best)
    tl.store(idx_ptr + part, best_i)


@triton.jit
def argmax_reduce_kernel(val_ptr, idx_ptr, out_ptr, P, BLOCK_P: tl.constexpr, NO_INDEX: tl.constexpr,
                         PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    b = tl.program_id(0)
    row = b * P
    best = -float("inf")
    best_i = 0
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = ps < P
        x = tl.load(val_ptr + row + ps, mask=ok, other=-float("inf"))
        i = tl.load(idx_ptr + row + ps, mask=ok, other=NO_INDEX)
        mx = tl.max(x, axis=0)
        first = tl.min(tl.where((x == mx) & ok, i, NO_INDEX), axis=0)
        better = mx > best
        best_i = tl.where(better, first, best_i)
        best = tl.where(better, mx, best)
    tl.store(out_ptr + b, best_i)


def specs() -> list[KernelSpec]:
    return [
        KernelSpec(
            name="argmax_part_f32", family="argmax", fn="argmax_part_kernel",
            params=(("logits", "*fp32"), ("part_val", "*fp32"), ("part_idx", "*i32"), ("V", "i32"),
                    ("span", "i32")),
            constexprs={"BLOCK": BLOCK}, grid=("B", "cdiv(V, span)", "1"), sizes={"B": "rows"},
            limits=("B >= 1", "V >= 1", "span >= 1", f"span % {BLOCK} == 0"),
            reference="reference.argmax", num_warps=4, num_stages=1,
            aligned=("logits", "part_val", "part_idx"),
            doc="per span of each logits (B, V) f32 row: part_val (B, P) its max, part_idx (B, P) "
                "i32 its first column, P = cdiv(V, span); then argmax_reduce_f32",
            deps=("spec", "elementwise"),
        ),
        KernelSpec(
            name="argmax_reduce_f32", family="argmax", fn="argmax_reduce_kernel",
            params=(("part_val", "*fp32"), ("part_idx", "*i32"), ("out", "*i32"), ("P", "i32")),
            constexprs={"BLOCK_P": BLOCK_P, "NO_INDEX": NO_INDEX}, grid=("B", "1", "1"),
            sizes={"B": "rows"}, limits=("B >= 1", "P >= 1"), reference="reference.argmax",
            num_warps=4, num_stages=1, aligned=("part_val", "part_idx", "out"),
            doc="out (B,) i32 = the first column of each row's maximum from argmax_part_f32's parts",
            deps=("spec", "elementwise"),
        ),
    ]
