"""Rotary position embedding, NORM (adjacent pairs 2i, 2i+1: llama) and NEOX (i, i+D/2: qwen2).

x (T, H, D) f32 -> y (T, H, D) f32 with token stride `stride_x` / `stride_y` (elements), heads
contiguous (stride D), so one launch can rotate a Q or K slice of a fused QKV row; y may alias x.
Angle = pos[t] * base^(-2i/D), computed in float32 as exp2(-2i/D * log2_base).
Grid (T, H).  Limits: head_dim is a constexpr (64 or 128).  Reference: `reference.rope`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .spec import KernelSpec


@triton.jit
def rope_kernel(x_ptr, y_ptr, pos_ptr, stride_x, stride_y, log2_base,
                HEAD_DIM: tl.constexpr, NEOX: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HEAD_DIM // 2)  # (D/2,)
    if NEOX:
        ia = i
        ib = i + HEAD_DIM // 2
    else:
        ia = 2 * i
        ib = 2 * i + 1
    pos = tl.load(pos_ptr + t).to(tl.float32)
    inv_freq = tl.exp2(-(2 * i).to(tl.float32) / HEAD_DIM * log2_base)
    ang = pos * inv_freq
    c = tl.cos(ang)
    s = tl.sin(ang)
    xb = x_ptr + t.to(tl.int64) * stride_x + h * HEAD_DIM
    yb = y_ptr + t.to(tl.int64) * stride_y + h * HEAD_DIM
    a = tl.load(xb + ia)
    b = tl.load(xb + ib)
    tl.store(yb + ia, a * c - b * s)
    tl.store(yb + ib, a * s + b * c)


def specs() -> list[KernelSpec]:
    out = []
    for mode in ("norm", "neox"):
        for hd in (64, 128):
            out.append(KernelSpec(
                name=f"rope_{mode}_d{hd}",
                family="rope",
                fn="rope_kernel",
                params=(("x", "*fp32"), ("y", "*fp32"), ("pos", "*i32"),
                        ("stride_x", "i32"), ("stride_y", "i32"), ("log2_base", "fp32")),
                constexprs={"HEAD_DIM": hd, "NEOX": mode == "neox"},
                grid=("T", "H", "1"),
                sizes={"T": "tokens", "H": "heads to rotate"},
                limits=("T >= 1", "H >= 1", f"stride_x >= H * {hd}", f"stride_y >= H * {hd}"),
                reference="reference.rope",
                num_warps=1,
                num_stages=1,
                aligned=("x", "y"),
                doc=f"{mode.upper()} rope, head_dim {hd}, x (T, H, {hd}) f32 -> y",
                deps=("spec",),
            ))
    return out
