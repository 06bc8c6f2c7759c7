"""Prefill GEMMs with their neighbours fused in: what `matvec_fused.py` does for decode rows,
for a prompt's M > 8 rows, on the tensor-core tile loop of `gemm.py` (`gemm_loop`).

- `gemm_qkv_<q>`: y_i = rmsnorm(x, g) @ W_i.T (+ bias_i) for up to three weights of one type
  (q, k, v) in one launch: the N tiles of the three outputs form grid axis 1.  A lone weight
  (N1 = N2 = 0) is the plain normed GEMM (the output matrix, a v of another type).  Replaces
  rmsnorm + up to three GEMMs + three bias adds.
- `gemm_glu_<q>`: out = act(h @ Wg.T) * (h @ Wu.T), h = rmsnorm(x, g): gate and up tiles from
  the same x loads in one loop; `flag` 0 = SiLU, 1 = GELU-tanh.  Replaces rmsnorm + two GEMMs +
  swiglu/geglu (and the gate and up products' round trip through memory).
- `gemm_add_<q>`: y += x @ W.T, the residual update in place (x the attention or FFN output; they
  never alias).  Replaces GEMM + add.

The norm: the loop sums x^2 of its rows from the x tiles it loads anyway (every program walks the
whole of K), multiplies x by g before the float16 cast, and scales the tile by 1/rms at the end:
(x*g) W.T / rms, the decode kernels' order.  The x rounding is as `gemm.py`'s (per-row powers of
two keep x*g inside float16), so the bounds of `ukgpu verify`'s "gemm" row hold.
Tiles: 64 x 64 x 64 over 4 warps as `gemm.py` (its cost is known on the H200); the GLU's two
accumulators take 64 x 32 tiles of each weight, the same registers as one 64 x 64 tile.
Limits: as `gemm.py`.  References: `reference.matvec_qkv`, `reference.matvec_glu`,
`reference.matvec_add` (the same math for any M).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import unused_planes, weight_constexprs, weight_limits, weight_params
from .gemm import BLOCK_K, BLOCK_M, BLOCK_N, X_EXP_SHIFT, gemm_loop
from .pdl import grid_dependency
from .repack import FORMATS
from .spec import KernelSpec


@triton.jit
def _normed_tile(w_q, w_s, w_m, x_ptr, g_ptr, bias_ptr, y_ptr, M, N, K, eps, rm, blk, has_bias,
                 KIND: tl.constexpr, HAS_MIN: tl.constexpr, X_EXP_SHIFT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile (rm, column block blk) of y = rmsnorm(x, g) @ W.T (+ bias)."""
    rn = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, _, sq = gemm_loop(w_q, w_s, w_m, w_q, w_s, w_m, x_ptr, g_ptr, rm, rn, M, N, K, True, False,
                           KIND, HAS_MIN, X_EXP_SHIFT, BLOCK_M, BLOCK_N, BLOCK_K)
    y = acc * tl.rsqrt(sq / K + eps)[:, None]
    if has_bias != 0:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def gemm_qkv_kernel(w_q, w_s, w_m, u_q, u_s, u_m, v_q, v_s, v_m, x_ptr, g_ptr, bias0, bias1, bias2,
                    y0, y1, y2, M, N0, N1, N2, K, eps, has_bias,
                    KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                    X_EXP_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr,
                    PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    # column blocks 0 .. nb0-1 make y0 = h W.T, the next nb1 y1 = h U.T, the rest y2 = h V.T
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    blk = tl.program_id(1)
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    if blk < nb0:
        _normed_tile(w_q, w_s, w_m, x_ptr, g_ptr, bias0, y0, M, N0, K, eps, rm, blk, has_bias,
                     KIND, HAS_MIN, X_EXP_SHIFT, BLOCK_M, BLOCK_N, BLOCK_K)
    elif blk < nb0 + nb1:
        _normed_tile(u_q, u_s, u_m, x_ptr, g_ptr, bias1, y1, M, N1, K, eps, rm, blk - nb0, has_bias,
                     KIND, HAS_MIN, X_EXP_SHIFT, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _normed_tile(v_q, v_s, v_m, x_ptr, g_ptr, bias2, y2, M, N2, K, eps, rm, blk - nb0 - nb1,
                     has_bias, KIND, HAS_MIN, X_EXP_SHIFT, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def gemm_glu_kernel(w_q, w_s, w_m, u_q, u_s, u_m, x_ptr, g_ptr, y_ptr, M, N, K, eps, flag,
                    KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                    X_EXP_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr,
                    PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate, up, sq = gemm_loop(w_q, w_s, w_m, u_q, u_s, u_m, x_ptr, g_ptr, rm, rn, M, N, K, True, True,
                             KIND, HAS_MIN, X_EXP_SHIFT, BLOCK_M, BLOCK_N, BLOCK_K)
    inv = tl.rsqrt(sq / K + eps)[:, None]
    gate = gate * inv
    up = up * inv
    if flag == 0:
        y = gate / (1.0 + tl.exp(-gate)) * up
    else:  # GELU-tanh as x * sigmoid(2 * sqrt(2/pi) (x + 0.044715 x^3))
        two_u = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)
        y = gate / (1.0 + tl.exp(-two_u)) * up
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def gemm_add_kernel(w_q, w_s, w_m, x_ptr, y_ptr, M, N, K,
                    KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                    X_EXP_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr,
                    PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, _, _ = gemm_loop(w_q, w_s, w_m, w_q, w_s, w_m, x_ptr, x_ptr, rm, rn, M, N, K, False, False,
                          KIND, HAS_MIN, X_EXP_SHIFT, BLOCK_M, BLOCK_N, BLOCK_K)
    out = rm[:, None] * N + rn[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + out, acc + tl.load(y_ptr + out, mask=ok, other=0), mask=ok)


ALIGNED = ("w_q", "w_s", "w_m", "u_q", "u_s", "u_m", "v_q", "v_s", "v_m", "x", "g", "y", "K")
GLU_BLOCK_N = 32  # two accumulators of 64 x 32: one 64 x 64 tile's registers


def _planes_as(qtype: str, prefix: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}_{name[2:]}", t) for name, t in weight_params(qtype))


def _spec(qtype: str, kind: str, params: tuple, grid: tuple, limits: tuple, block_n: int,
          unused: list[str], doc: str, reference: str) -> KernelSpec:
    return KernelSpec(
        name=f"gemm_{kind}_{qtype.lower()}",
        family="gemm_fused",
        fn=f"gemm_{kind}_kernel",
        params=params,
        constexprs={**weight_constexprs(qtype), "X_EXP_SHIFT": X_EXP_SHIFT,
                    "BLOCK_M": BLOCK_M, "BLOCK_N": block_n, "BLOCK_K": BLOCK_K},
        grid=grid,
        sizes={},
        limits=weight_limits(qtype, "K") + ("M >= 1",) + limits,
        reference=reference,
        num_warps=4,
        num_stages=3,
        aligned=tuple(a for a in ALIGNED if a in dict(params)),
        unused=tuple(unused),
        doc=f"{doc}; f16 tensor cores as gemm_{qtype.lower()}, weights {qtype} repacked (N, K)",
        deps=("dequant", "gemm", "repack", "spec"),
        qtype=qtype,
    )


def specs() -> list[KernelSpec]:
    out = []
    for qtype in FORMATS:
        w, u, v = weight_params(qtype), _planes_as(qtype, "u"), _planes_as(qtype, "v")
        unused = list(unused_planes(qtype))
        out.append(_spec(
            qtype, "qkv", w + u + v + (
                ("x", "*fp32"), ("g", "*fp32"), ("bias0", "*fp32"), ("bias1", "*fp32"),
                ("bias2", "*fp32"), ("y0", "*fp32"), ("y1", "*fp32"), ("y2", "*fp32"), ("M", "i32"),
                ("N0", "i32"), ("N1", "i32"), ("N2", "i32"), ("K", "i32"), ("eps", "fp32"),
                ("has_bias", "i32")),
            (f"cdiv(M, {BLOCK_M})", f"cdiv(N0, {BLOCK_N}) + cdiv(N1, {BLOCK_N}) + cdiv(N2, {BLOCK_N})", "1"),
            ("N0 >= 1", "N1 >= 0", "N2 >= 0"), BLOCK_N,
            [f"{pre}_{p[2:]}" for pre in "wuv" for p in unused],
            "y_i (M, N_i) f32 = rmsnorm(x (M, K), g) @ W_i.T (+ bias_i), i < 3", "reference.matvec_qkv"))
        out.append(_spec(
            qtype, "glu", w + u + (("x", "*fp32"), ("g", "*fp32"), ("y", "*fp32"), ("M", "i32"),
                                   ("N", "i32"), ("K", "i32"), ("eps", "fp32"), ("flag", "i32")),
            (f"cdiv(M, {BLOCK_M})", f"cdiv(N, {GLU_BLOCK_N})", "1"), ("N >= 1",), GLU_BLOCK_N,
            [f"{pre}_{p[2:]}" for pre in "wu" for p in unused],
            "y (M, N) f32 = act(h @ W.T) * (h @ U.T), h = rmsnorm(x, g); flag = act (0 silu, 1 gelu)",
            "reference.matvec_glu"))
        out.append(_spec(
            qtype, "add", w + (("x", "*fp32"), ("y", "*fp32"), ("M", "i32"), ("N", "i32"), ("K", "i32")),
            (f"cdiv(M, {BLOCK_M})", f"cdiv(N, {BLOCK_N})", "1"), ("N >= 1",), BLOCK_N, unused,
            "y (M, N) f32 += x (M, K) f32 @ W.T (the residual update in place)", "reference.matvec_add"))
    return out
