"""Rotary position embedding from a per-pair frequency table: NORM (adjacent pairs 2i, 2i+1:
llama, gemma3, phi3) and NEOX (i, i + n_rot/2: qwen2, qwen3).

x (T, H, head_dim) f32 -> y with token stride `stride_x` / `stride_y` (elements), heads contiguous
(stride head_dim), so one launch can rotate a Q or K slice of a fused QKV row; y may alias x.
The first n_rot dims of each head rotate; dims n_rot..head_dim are copied unchanged.

freqs (n_rot/2,) float64 is the angle per position of each pair with every scaling folded in
(`RopeConfig.inv_freq()`: base^(-2i/n_rot), llama3/phi3 frequency factors, linear and YaRN
scaling); cos and sin are multiplied by `mscale` (YaRN's attention factor, else 1).

Angle precision: pos * freq is formed in float64 and reduced to [-pi, pi) there, then only the
reduced angle is rounded to float32 for cos/sin.  The rotation's error is thus a few float32
ulps of |x| at any position (measured under the interpreter up to position 2^20: <= 1e-6 |x|),
where a float32 product pos * freq (as llama.cpp forms it) loses ~pos * 2^-24 radians: 2e-3 at
position 32k.
Grid (T, H).  Limits: n_rot even, n_rot <= D (the entry's constexpr: 64, 128 or 256) and
n_rot <= head_dim.  Reference: `reference.rope`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import grid_dependency
from .spec import ROPE_DIMS, KernelSpec


@triton.jit
def rope_kernel(x_ptr, y_ptr, pos_ptr, freq_ptr, stride_x, stride_y, head_dim, n_rot, mscale,
                HALF: tl.constexpr, NEOX: tl.constexpr,
                PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    t = tl.program_id(0)
    h = tl.program_id(1)
    half = n_rot // 2
    i = tl.arange(0, HALF)  # (HALF,) pair index
    ok = i < half
    if NEOX:
        ia = i
        ib = i + half
    else:
        ia = 2 * i
        ib = 2 * i + 1
    pos = tl.load(pos_ptr + t).to(tl.float64)
    ang = pos * tl.load(freq_ptr + i, mask=ok, other=0)  # float64 (HALF,)
    turns = tl.floor(ang * 0.15915494309189535 + 0.5)  # whole turns, 1/(2 pi)
    ang = (ang - turns * 6.283185307179586).to(tl.float32)  # [-pi, pi)
    c = tl.cos(ang) * mscale
    s = tl.sin(ang) * mscale
    xb = x_ptr + t.to(tl.int64) * stride_x + h * head_dim
    yb = y_ptr + t.to(tl.int64) * stride_y + h * head_dim
    a = tl.load(xb + ia, mask=ok, other=0)
    b = tl.load(xb + ib, mask=ok, other=0)
    tl.store(yb + ia, a * c - b * s, mask=ok)
    tl.store(yb + ib, a * s + b * c, mask=ok)
    for d0 in range(n_rot, head_dim, 2 * HALF):  # the unrotated tail (partial rotary)
        cols = d0 + tl.arange(0, 2 * HALF)
        tail = cols < head_dim
        tl.store(yb + cols, tl.load(xb + cols, mask=tail), mask=tail)


def specs() -> list[KernelSpec]:
    out = []
    for mode in ("norm", "neox"):
        for d in ROPE_DIMS:
            out.append(KernelSpec(
                name=f"rope_{mode}_d{d}",
                family="rope",
                fn="rope_kernel",
                params=(("x", "*fp32"), ("y", "*fp32"), ("pos", "*i32"), ("freqs", "*fp64"),
                        ("stride_x", "i32"), ("stride_y", "i32"), ("head_dim", "i32"),
                        ("n_rot", "i32"), ("mscale", "fp32")),
                constexprs={"HALF": d // 2, "NEOX": mode == "neox"},
                grid=("T", "H", "1"),
                sizes={"T": "tokens", "H": "heads to rotate"},
                limits=("T >= 1", "H >= 1", "n_rot % 2 == 0", f"2 <= n_rot <= {d}",
                        "n_rot <= head_dim", "stride_x >= H * head_dim",
                        "stride_y >= H * head_dim"),
                reference="reference.rope",
                num_warps=1,
                num_stages=1,
                aligned=("x", "y", "freqs"),
                doc=f"{mode.upper()} rope of the first n_rot <= {d} dims of each head from a "
                    "float64 frequency table, x (T, H, head_dim) f32 -> y",
                deps=("spec",),
            ))
    return out
