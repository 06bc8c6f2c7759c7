"""RMS norm: y (M, D) = x / sqrt(mean(x^2) + eps) * weight, float32 throughout.

Grid (M,): one program per row, two passes over D in BLOCK_D chunks (any D).
Limits: rows contiguous (stride D); y may alias x.  Reference: `reference.rmsnorm`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import grid_dependency
from .spec import KernelSpec


@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK_D: tl.constexpr,
                   PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    row = tl.program_id(0).to(tl.int64) * D
    sq = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row + cols, mask=cols < D, other=0)
        sq += x * x
    inv = tl.rsqrt(tl.sum(sq, axis=0) / D + eps)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(x_ptr + row + cols, mask=ok, other=0)
        w = tl.load(w_ptr + cols, mask=ok, other=0)
        tl.store(y_ptr + row + cols, x * inv * w, mask=ok)


def specs() -> list[KernelSpec]:
    return [KernelSpec(
        name="rmsnorm_f32",
        family="rmsnorm",
        fn="rmsnorm_kernel",
        params=(("x", "*fp32"), ("weight", "*fp32"), ("y", "*fp32"), ("D", "i32"), ("eps", "fp32")),
        constexprs={"BLOCK_D": 1024},
        grid=("M", "1", "1"),
        sizes={"M": "number of rows"},
        limits=("M >= 1", "D >= 1"),
        reference="reference.rmsnorm",
        num_warps=4,
        num_stages=1,
        aligned=("x", "weight", "y"),
        doc="y (M, D) f32 = rmsnorm(x (M, D) f32) * weight (D,) f32",
        deps=("spec",),
    )]
