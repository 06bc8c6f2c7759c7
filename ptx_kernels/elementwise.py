"""Small row/element kernels: swiglu, geglu, scale, residual add, argmax, KV-cache row store.

- swiglu: out[i] = silu(gate[i]) * up[i] over n elements (float32).   ref `reference.swiglu`
- geglu: out[i] = gelu_tanh(gate[i]) * up[i] (gemma3's FFN), with
  0.5 g (1 + tanh(u)) written as g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3): one exp,
  no overflow (exp(-2u) -> inf gives g / inf = -0).                  ref `reference.geglu`
- scale: out[i] = x[i] * s (gemma3's sqrt(d) embedding scale; out may alias x).
                                                                       ref `reference.scale`
- add: out[i] = a[i] + b[i] (residual; out may alias a).               ref `reference.add`
- add_bias: out[m, j] = x[m, j] + bias[j] over n = M*N elements (qwen2's
  Q/K/V biases; out may alias x).                                      ref `reference.add_bias`
- argmax: out[b] = first index of max(logits[b, :V]) as int32.         ref `reference.argmax`
- store_rows: dst[rows[t], :W] = f16(src[t, :W]), src rows `src_stride` apart (K/V into the cache;
  rows[t] = slot * n_ctx + position, read on the device so decode can be graph-captured).
                                                                       ref `reference.store_rows`
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import grid_dependency
from .spec import KernelSpec

BLOCK = 1024


@triton.jit
def swiglu_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr,
                  PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(gate_ptr + i, mask=ok, other=0)
    u = tl.load(up_ptr + i, mask=ok, other=0)
    tl.store(out_ptr + i, g / (1.0 + tl.exp(-g)) * u, mask=ok)


@triton.jit
def geglu_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr,
                 PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(gate_ptr + i, mask=ok, other=0)
    u = tl.load(up_ptr + i, mask=ok, other=0)
    two_u = 1.5957691216057308 * (g + 0.044715 * g * g * g)  # 2 * sqrt(2/pi) * (...)
    tl.store(out_ptr + i, g / (1.0 + tl.exp(-two_u)) * u, mask=ok)


@triton.jit
def scale_kernel(x_ptr, out_ptr, n, s, BLOCK: tl.constexpr,
                 PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=ok) * s, mask=ok)


@triton.jit
def add_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr,
               PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    tl.store(out_ptr + i, tl.load(a_ptr + i, mask=ok) + tl.load(b_ptr + i, mask=ok), mask=ok)


@triton.jit
def add_bias_kernel(x_ptr, bias_ptr, out_ptr, n, N, BLOCK: tl.constexpr,
                    PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=ok) + tl.load(bias_ptr + i % N, mask=ok), mask=ok)


@triton.jit
def first_max(logits_ptr, row, lo, hi, BLOCK: tl.constexpr):
    """(largest value, its first index) of logits[row + lo .. row + hi), BLOCK at a time."""
    best = -float("inf")
    best_i = lo
    for v0 in range(lo, hi, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row + cols, mask=cols < hi, other=-float("inf"))
        mx = tl.max(x, axis=0)
        first = tl.min(tl.where(x == mx, cols, hi), axis=0)
        better = mx > best
        best_i = tl.where(better, first, best_i)
        best = tl.where(better, mx, best)
    return best, best_i


@triton.jit
def argmax_kernel(logits_ptr, out_ptr, V, BLOCK: tl.constexpr,
                  PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    _, best_i = first_max(logits_ptr, tl.program_id(0).to(tl.int64) * V, 0, V, BLOCK)
    tl.store(out_ptr + tl.program_id(0), best_i)


@triton.jit
def store_rows_kernel(src_ptr, dst_ptr, rows_ptr, W, src_stride, BLOCK: tl.constexpr,
                      PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < W
    row = tl.load(rows_ptr + t).to(tl.int64)
    x = tl.load(src_ptr + t.to(tl.int64) * src_stride + cols, mask=ok)
    tl.store(dst_ptr + row * W + cols, x.to(tl.float16), mask=ok)


def _flat(name: str, fn: str, params: tuple, ref: str, doc: str) -> KernelSpec:
    return KernelSpec(
        name=name, family="elementwise", fn=fn, params=params,
        constexprs={"BLOCK": BLOCK}, grid=(f"cdiv(n, {BLOCK})", "1", "1"), sizes={},
        limits=("n >= 1",), reference=ref, num_warps=4, num_stages=1,
        aligned=tuple(p for p, t in params if t.startswith("*")), doc=doc, deps=("spec",),
    )


def specs() -> list[KernelSpec]:
    return [
        _flat("swiglu_f32", "swiglu_kernel",
              (("gate", "*fp32"), ("up", "*fp32"), ("out", "*fp32"), ("n", "i32")),
              "reference.swiglu", "out = silu(gate) * up, n float32 elements"),
        _flat("geglu_f32", "geglu_kernel",
              (("gate", "*fp32"), ("up", "*fp32"), ("out", "*fp32"), ("n", "i32")),
              "reference.geglu", "out = gelu_tanh(gate) * up, n float32 elements"),
        _flat("scale_f32", "scale_kernel",
              (("x", "*fp32"), ("out", "*fp32"), ("n", "i32"), ("s", "fp32")),
              "reference.scale", "out = x * s, n float32 elements"),
        _flat("add_f32", "add_kernel",
              (("a", "*fp32"), ("b", "*fp32"), ("out", "*fp32"), ("n", "i32")),
              "reference.add", "out = a + b, n float32 elements"),
        KernelSpec(
            name="add_bias_f32", family="elementwise", fn="add_bias_kernel",
            params=(("x", "*fp32"), ("bias", "*fp32"), ("out", "*fp32"), ("n", "i32"), ("N", "i32")),
            constexprs={"BLOCK": BLOCK}, grid=(f"cdiv(n, {BLOCK})", "1", "1"), sizes={},
            limits=("n >= 1", "N >= 1", "n % N == 0"), reference="reference.add_bias", num_warps=4,
            num_stages=1, aligned=("x", "bias", "out"),
            doc="out (M, N) = x (M, N) + bias (N,), n = M*N float32 elements", deps=("spec",),
        ),
        KernelSpec(
            name="argmax_f32", family="elementwise", fn="argmax_kernel",
            params=(("logits", "*fp32"), ("out", "*i32"), ("V", "i32")),
            constexprs={"BLOCK": BLOCK}, grid=("B", "1", "1"), sizes={"B": "rows"},
            limits=("B >= 1", "V >= 1"), reference="reference.argmax", num_warps=4, num_stages=1,
            aligned=("logits", "out"), doc="out (B,) i32 = argmax of logits (B, V) f32 rows",
            deps=("spec",),
        ),
        KernelSpec(
            name="store_rows_f16", family="elementwise", fn="store_rows_kernel",
            params=(("src", "*fp32"), ("dst", "*fp16"), ("rows", "*i32"), ("W", "i32"),
                    ("src_stride", "i32")),
            constexprs={"BLOCK": BLOCK}, grid=("T", f"cdiv(W, {BLOCK})", "1"),
            sizes={"T": "rows to store"}, limits=("T >= 1", "W >= 1", "src_stride >= W"),
            reference="reference.store_rows", num_warps=4, num_stages=1,
            aligned=("src", "dst", "W"),
            doc="dst[rows[t], :W] (f16) = src[t, :W] (f32, row stride src_stride: a K or V slice "
                "of a fused QKV row)",
            deps=("spec",),
        ),
    ]
