"""Embedding lookup from quantized rows: out (T, K) f32 = dequant(W)[ids], W (V, K) repacked.

Grid (T, cdiv(K, BLOCK_K)): one program per token and column block.
Limits: K % 32 == 0 (K % 256 for Q4_K/Q6_K), 0 <= ids < V (not checked on the device).
Reference: `reference.embedding`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import load_weights, unused_planes, weight_constexprs, weight_limits, weight_params
from .repack import FORMATS
from .spec import KernelSpec


@triton.jit
def embedding_kernel(w_q, w_s, w_m, ids_ptr, out_ptr, K,
                     KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    ok = cols < K
    row = tl.load(ids_ptr + t)
    w = load_weights(w_q, w_s, w_m, row, cols, K, ok, KIND, HAS_MIN, GROUP)
    tl.store(out_ptr + t * K + cols, w, mask=ok)


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
