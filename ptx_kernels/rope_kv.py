"""Everything between the q/k/v projections and decode attention, in one launch: per-head
RMSNorm of q and k (qwen3, gemma3; `has_norm`), rope of q (in place) and k, and the store of k
and v into the float16 KV cache.  Replaces up to six nodes of a decode step (two head norms,
two ropes, two row stores) with one.

Grid (T, Hq + Hkv): program (t, h) handles head h of q's row t when h < Hq, else KV head
h - Hq of row t: k rotated and stored, v stored, at cache row rows[t] (the sequence's position,
or slot * n_ctx + position for a batch over a KV slab), i.e. at element (rows[t] * Hkv + j) *
head_dim of k_cache / v_cache.  q, k, v are float32 (T, H * head_dim), rows contiguous.
Rope as `rope.py` (float64 angle, reduced to [-pi, pi) before the float32 cos/sin, partial
rotation of the first n_rot dims, NORM or NEOX pairs); the norm as `rmsnorm.py` on one head.
Limits: head_dim <= D (the entry's constexpr), n_rot even, n_rot <= head_dim.
Reference: `reference.rope_kv`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import grid_dependency
from .spec import ROPE_DIMS, KernelSpec


@triton.jit
def rotation(freq_ptr, pos, n_rot, mscale, D: tl.constexpr, NEOX: tl.constexpr):
    """Per column of a D-wide head at the float64 position pos: cos and sin of its angle (times
    mscale), its rotation partner, whether it is the first of its pair and whether it rotates
    (< n_rot).  The float64 angle is reduced to [-pi, pi) before the float32 cos/sin."""
    cols = tl.arange(0, D)
    half = n_rot // 2
    if NEOX:
        pair = tl.where(cols < half, cols, cols - half)
        partner = tl.where(cols < half, cols + half, cols - half)
        first = cols < half
    else:
        pair = cols // 2
        partner = cols ^ 1
        first = (cols % 2) == 0
    rot = cols < n_rot
    ang = pos * tl.load(freq_ptr + pair, mask=rot, other=0)  # float64
    turns = tl.floor(ang * 0.15915494309189535 + 0.5)
    ang = (ang - turns * 6.283185307179586).to(tl.float32)
    return tl.cos(ang) * mscale, tl.sin(ang) * mscale, partner, first, rot


@triton.jit
def _head(x_ptr, w_ptr, pos, freq_ptr, head_dim, n_rot, mscale, eps, has_norm,
          D: tl.constexpr, NEOX: tl.constexpr):
    """The head at x_ptr normed (when has_norm) and rotated: (D,) float32, zero past head_dim.
    Each column's rotation partner is loaded again from memory (an L1 hit), not gathered."""
    cols = tl.arange(0, D)
    ok = cols < head_dim
    c, s, partner, first, rot = rotation(freq_ptr, pos, n_rot, mscale, D, NEOX)
    x = tl.load(x_ptr + cols, mask=ok, other=0)
    other = tl.load(x_ptr + partner, mask=rot, other=0)
    if has_norm != 0:
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / head_dim + eps)
        x = x * inv * tl.load(w_ptr + cols, mask=ok, other=0)
        other = other * inv * tl.load(w_ptr + partner, mask=rot, other=0)
    turned = tl.where(first, x * c - other * s, other * s + x * c)
    return tl.where(rot, turned, x)


@triton.jit
def rope_kv_kernel(q_ptr, k_ptr, v_ptr, q_norm, k_norm, pos_ptr, rows_ptr, freq_ptr, k_cache, v_cache,
                   Hq, Hkv, head_dim, n_rot, mscale, eps, has_norm,
                   D: tl.constexpr, NEOX: tl.constexpr,
                   PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.float64)
    cols = tl.arange(0, D)
    ok = cols < head_dim
    if h < Hq:
        base = q_ptr + (t.to(tl.int64) * Hq + h) * head_dim
        y = _head(base, q_norm, pos, freq_ptr, head_dim, n_rot, mscale, eps, has_norm, D, NEOX)
        tl.store(base + cols, y, mask=ok)
    else:
        j = h - Hq
        src = (t.to(tl.int64) * Hkv + j) * head_dim
        dst = (tl.load(rows_ptr + t).to(tl.int64) * Hkv + j) * head_dim
        y = _head(k_ptr + src, k_norm, pos, freq_ptr, head_dim, n_rot, mscale, eps, has_norm, D, NEOX)
        tl.store(k_cache + dst + cols, y.to(tl.float16), mask=ok)
        tl.store(v_cache + dst + cols, tl.load(v_ptr + src + cols, mask=ok, other=0).to(tl.float16), mask=ok)


def specs() -> list[KernelSpec]:
    out = []
    for mode in ("norm", "neox"):
        for d in ROPE_DIMS:
            out.append(KernelSpec(
                name=f"rope_kv_{mode}_d{d}",
                family="rope_kv",
                fn="rope_kv_kernel",
                params=(("q", "*fp32"), ("k", "*fp32"), ("v", "*fp32"), ("q_norm", "*fp32"),
                        ("k_norm", "*fp32"), ("pos", "*i32"), ("rows", "*i32"), ("freqs", "*fp64"),
                        ("k_cache", "*fp16"), ("v_cache", "*fp16"), ("Hq", "i32"), ("Hkv", "i32"),
                        ("head_dim", "i32"), ("n_rot", "i32"), ("mscale", "fp32"), ("eps", "fp32"),
                        ("has_norm", "i32")),
                constexprs={"D": d, "NEOX": mode == "neox"},
                grid=("T", "Hq + Hkv", "1"),
                sizes={"T": "rows (tokens of one sequence, or one per sequence of a batch)"},
                limits=("T >= 1", "Hq >= 1", "Hkv >= 1", "n_rot % 2 == 0", "2 <= n_rot",
                        "n_rot <= head_dim", f"head_dim <= {d}"),
                reference="reference.rope_kv",
                num_warps=1 if d <= 64 else 2,
                num_stages=1,
                aligned=("q", "k", "v", "freqs", "k_cache", "v_cache"),
                doc=f"per-head norm (has_norm), {mode.upper()} rope of q in place and of k, k and v "
                    f"stored f16 at cache rows[t]; heads of <= {d} dims",
                deps=("spec",),
            ))
    return out
