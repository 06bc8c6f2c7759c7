"""Embedding lookup from quantized rows: out (T, K) f32 = dequant(W)[ids], W (V, K) repacked.

Grid (T, cdiv(K, BLOCK_K)): one program per token and column block.
Limits: K % 32 == 0 (K % 256 for the K-quants), 0 <= ids < V (not checked on the device).
Reference: `reference.embedding`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import load_runs, unused_planes, weight_constexprs, weight_limits, weight_params
from .pdl import grid_dependency
from .repack import FORMATS
from .spec import KernelSpec


@triton.jit
def embedding_kernel(w_q, w_s, w_m, ids_ptr, out_ptr, K,
                     KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    NG: tl.constexpr = BLOCK_K // 32
    t = tl.program_id(0)
    gi = tl.program_id(1) * NG + tl.arange(0, NG)[:, None]  # (NG, 1) 32-groups of the row
    i = tl.arange(0, 16)[None, :]  # (1, 16)
    ok = gi * 32 < K
    row = tl.load(ids_ptr + t)
    lo, hi = load_runs(w_q, w_s, w_m, row, gi, i, K, ok, KIND, HAS_MIN)
    tl.store(out_ptr + t * K + gi * 32 + i, lo, mask=ok)
    tl.store(out_ptr + t * K + gi * 32 + 16 + i, hi, mask=ok)


BLOCK_K = 256


def specs() -> list[KernelSpec]:
    return [
        KernelSpec(
            name=f"embedding_{qtype.lower()}",
            family="embedding",
            fn="embedding_kernel",
            params=weight_params(qtype) + (("ids", "*i32"), ("out", "*fp32"), ("K", "i32")),
            constexprs={**weight_constexprs(qtype), "BLOCK_K": BLOCK_K},
            grid=("T", f"cdiv(K, {BLOCK_K})", "1"),
            sizes={"T": "number of token ids"},
            limits=weight_limits(qtype, "K") + ("T >= 1",),
            reference="reference.embedding",
            num_warps=2,
            num_stages=1,
            aligned=("w_q", "w_s", "w_m", "out", "K"),
            unused=unused_planes(qtype),
            doc=f"out (T, K) f32 = rows ids of W {qtype} repacked (V, K)",
            deps=("dequant", "repack", "spec"),
            qtype=qtype,
        )
        for qtype in FORMATS
    ]
