"""Decode mat-vecs with their neighbours fused in: one graph node where the plain ops take two
to four.  Batch 1..8 (`b1`, `b8`), every weight type, the same weight loads as `matvec.py`.

- `matvec_norm_<q>_<b>`: y = rmsnorm(x, g) @ W.T (+ bias): the RMS of each x row is computed in
  the prologue (every program reads the whole row anyway), the weights multiply x*g, and the
  dot product is scaled by 1/rms at the end; `has_bias` != 0 adds bias[N].  Replaces rmsnorm +
  mat-vec (+ add_bias).
- `matvec_glu_<q>_<b>`: out = act(h @ Wg.T) * (h @ Wu.T), h = rmsnorm(x, g), two weights of one
  type read in the same loop; `act` 0 = SiLU, 1 = GELU-tanh (as `elementwise.py`).  Replaces
  rmsnorm + two mat-vecs + swiglu/geglu.
- `matvec_qkv_<q>_<b>`: y_i = rmsnorm(x, g) @ W_i.T (+ bias_i) for up to three weights of one
  type (q, k, v) in one launch: the programs of the three outputs form one grid, so k and v
  (few rows) fill SMs beside q.  Replaces rmsnorm + three mat-vecs (+ three add_bias).
- `matvec_add_<q>_<b>`: y += x @ W.T, the residual update in place (y is the residual stream,
  x the attention or FFN output; they never alias).  Replaces mat-vec + add.

Geometry as `matvec.py` (BLOCK_N rows per program, BLOCK_K per step, batch rows on grid axis 1).
One activation row (b1) runs the K loop of `row_dot.py` (no shared memory or barrier in it; the
norm's sum of squares from the same x loads, the GLU's two weights in one loop); batch rows keep
a pass over x for the norm and, in the GLU, a loop a weight.
Numerics: float32 throughout; the norm is applied as (sum w*x*g) * inv_rms instead of
sum w*(x*inv_rms*g): the same value up to float32 rounding (checked against the references).
Limits: as `matvec.py`; x, y, g, bias rows contiguous.  References: `reference.matvec_norm`,
`reference.matvec_qkv`, `reference.matvec_glu`, `reference.matvec_add`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import load_runs, unused_planes, weight_constexprs, weight_limits, weight_params
from .pdl import grid_dependency
from .repack import FORMATS
from .row_dot import row_block_dot
from .spec import KernelSpec


@triton.jit
def _row_inv_rms(x_ptr, rb, b_ok, K, eps, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BB,) 1 / sqrt(mean(x_b^2) + eps) of each batch row."""
    sq = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(x_ptr + rb[:, None] * K + kk, mask=b_ok[:, None] & (kk < K), other=0)
        sq += x * x
    return tl.rsqrt(tl.sum(sq, axis=1) / K + eps)


@triton.jit
def _dot_rows(w_q, w_s, w_m, x_ptr, g_ptr, n3, b3, n_ok, b_ok, K, USE_G: tl.constexpr,
              KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """(BB, BN) sum_k W[n, k] * x[b, k] (* g[k] when USE_G), loads as `matvec.matvec_kernel`
    (batch rows; one row takes `row_dot`)."""
    NG: tl.constexpr = BLOCK_K // 32
    g = tl.arange(0, NG)[None, :, None]  # (1, NG, 1)
    i = tl.arange(0, 16)[None, None, :]  # (1, 1, 16)
    acc = tl.zeros((BLOCK_B, BLOCK_N, NG, 16), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        gi = k0 // 32 + g
        kg = gi * 32
        g_ok = kg < K
        w_lo, w_hi = load_runs(w_q, w_s, w_m, n3, gi, i, K, n_ok & g_ok, KIND, HAS_MIN)
        x_ok = b_ok & g_ok
        x_lo = tl.load(x_ptr + b3 * K + kg + i, mask=x_ok, other=0)
        x_hi = tl.load(x_ptr + b3 * K + kg + 16 + i, mask=x_ok, other=0)
        if USE_G:
            x_lo = x_lo * tl.load(g_ptr + kg + i, mask=g_ok, other=0)
            x_hi = x_hi * tl.load(g_ptr + kg + 16 + i, mask=g_ok, other=0)
        acc += w_lo[None, :, :, :] * x_lo[:, None, :, :] + w_hi[None, :, :, :] * x_hi[:, None, :, :]
    return tl.sum(tl.sum(acc, axis=3), axis=2)


@triton.jit
def _inv_rms(sq, K, eps):
    """1 / rms of the row from `row_dot`'s sums of squares: every row of the tile holds the row's
    sum (rows past N hold 0: x is masked with them), so the largest is it."""
    return tl.rsqrt(tl.max(sq, axis=0) / K + eps)


@triton.jit
def matvec_fused_kernel(w_q, w_s, w_m, u_q, u_s, u_m, x_ptr, g_ptr, bias_ptr, y_ptr, N, K, B, eps, flag,
                        MODE: tl.constexpr, KIND: tl.constexpr, HAS_MIN: tl.constexpr,
                        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_B: tl.constexpr,
                        PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    # MODE 0: norm (+bias if flag); 1: norm + GLU of W (gate) and U (up), act = flag; 2: y += x W^T
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    n3, b3 = rn[:, None, None], rb[:, None, None]
    n_ok3, b_ok3 = n3 < N, b3 < B
    out_ok = b_ok[:, None] & (rn[None, :] < N)
    out = rb[:, None] * N + rn[None, :]
    if BLOCK_B == 1:  # one row: row_dot's loop, the norm's sum of squares from the same loads
        if MODE == 1:  # gate and up in one loop
            gate, up1, sq = row_block_dot(w_q, w_s, w_m, u_q, u_s, u_m, x_ptr + b3 * K, g_ptr, n3,
                                          n_ok3 & b_ok3, 0, K, K, True, True, KIND, HAS_MIN, BLOCK_N, BLOCK_K)
            up = up1[None, :]
        else:
            gate, _, sq = row_block_dot(w_q, w_s, w_m, w_q, w_s, w_m, x_ptr + b3 * K, g_ptr, n3, n_ok3 & b_ok3,
                                        0, K, K, MODE != 2, False, KIND, HAS_MIN, BLOCK_N, BLOCK_K)
        y = gate[None, :]
        if MODE != 2:
            inv = _inv_rms(sq, K, eps)
    else:
        y = _dot_rows(w_q, w_s, w_m, x_ptr, g_ptr, n3, b3, n_ok3, b_ok3, K, MODE != 2,
                      KIND, HAS_MIN, GROUP, BLOCK_N, BLOCK_K, BLOCK_B)
        if MODE == 1:
            up = _dot_rows(u_q, u_s, u_m, x_ptr, g_ptr, n3, b3, n_ok3, b_ok3, K, True,
                           KIND, HAS_MIN, GROUP, BLOCK_N, BLOCK_K, BLOCK_B)
        if MODE != 2:
            inv = _row_inv_rms(x_ptr, rb, b_ok, K, eps, BLOCK_B, BLOCK_K)[:, None]
    if MODE == 2:
        y += tl.load(y_ptr + out, mask=out_ok, other=0)
    else:
        y = y * inv
        if MODE == 0:
            if flag != 0:
                y += tl.load(bias_ptr + rn, mask=rn < N, other=0)[None, :]
        else:
            up = up * inv
            if flag == 0:
                y = y / (1.0 + tl.exp(-y)) * up
            else:
                two_u = 1.5957691216057308 * (y + 0.044715 * y * y * y)
                y = y / (1.0 + tl.exp(-two_u)) * up
    tl.store(y_ptr + out, y, mask=out_ok)


@triton.jit
def _norm_rows_out(w_q, w_s, w_m, x_ptr, g_ptr, bias_ptr, y_ptr, N, K, B, eps, rb, b_ok, blk, has_bias,
                   KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """Rows blk*BLOCK_N.. of y = rmsnorm(x, g) @ W.T (+ bias) for this program's batch rows."""
    rn = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n3, b3 = rn[:, None, None], rb[:, None, None]
    if BLOCK_B == 1:
        dot, _, sq = row_block_dot(w_q, w_s, w_m, w_q, w_s, w_m, x_ptr + b3 * K, g_ptr, n3, (n3 < N) & (b3 < B),
                                   0, K, K, True, False, KIND, HAS_MIN, BLOCK_N, BLOCK_K)
        y = (dot * _inv_rms(sq, K, eps))[None, :]
    else:
        y = _dot_rows(w_q, w_s, w_m, x_ptr, g_ptr, n3, b3, n3 < N, b3 < B, K, True,
                      KIND, HAS_MIN, GROUP, BLOCK_N, BLOCK_K, BLOCK_B)
        y = y * _row_inv_rms(x_ptr, rb, b_ok, K, eps, BLOCK_B, BLOCK_K)[:, None]
    if has_bias != 0:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0)[None, :]
    tl.store(y_ptr + rb[:, None] * N + rn[None, :], y, mask=b_ok[:, None] & (rn[None, :] < N))


@triton.jit
def matvec_qkv_kernel(w_q, w_s, w_m, u_q, u_s, u_m, v_q, v_s, v_m, x_ptr, g_ptr, bias0, bias1, bias2,
                      y0, y1, y2, N0, N1, N2, K, B, eps, has_bias,
                      KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
                      PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    # Three weights of one type over the same normed input (q, k, v): programs 0 .. nb0-1 make
    # y0 = h W.T, the next nb1 y1 = h U.T, the rest y2 = h V.T (N1 or N2 may be 0: fewer weights).
    blk = tl.program_id(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    if blk < nb0:
        _norm_rows_out(w_q, w_s, w_m, x_ptr, g_ptr, bias0, y0, N0, K, B, eps, rb, b_ok, blk, has_bias,
                       KIND, HAS_MIN, GROUP, BLOCK_N, BLOCK_K, BLOCK_B)
    elif blk < nb0 + nb1:
        _norm_rows_out(u_q, u_s, u_m, x_ptr, g_ptr, bias1, y1, N1, K, B, eps, rb, b_ok, blk - nb0,
                       has_bias, KIND, HAS_MIN, GROUP, BLOCK_N, BLOCK_K, BLOCK_B)
    else:
        _norm_rows_out(v_q, v_s, v_m, x_ptr, g_ptr, bias2, y2, N2, K, B, eps, rb, b_ok, blk - nb0 - nb1,
                       has_bias, KIND, HAS_MIN, GROUP, BLOCK_N, BLOCK_K, BLOCK_B)


# version -> (BLOCK_B, BLOCK_N, BLOCK_K, num_warps).  b1: 4 rows x 1024 columns a step, 4 warps,
# every mode (row_dot.py): 16 bytes of 4-bit quants a thread in one vector load, and a
# K = 1,536 row in 2 steps instead of 3 (a step is about one DRAM round trip: on an H200 the
# old kernels took ~3.2 us + ~0.8 us a step, docs/benchmarks/cuda.md), the 8,960-column down
# projection in 9 instead of 17.5; 72-141 registers, no spills (sm_90a).  b8 streams 256 columns
# a step: on an H200 four sequences through the batch graph went 581 -> 752 t/s (Qwen2.5-1.5B)
# and 2,448 -> 2,665 (SmolLM2) against 128 (tools/dev/kernel_sweep.py, k256s3).
VERSIONS = {"b1": (1, 4, 1024, 4), "b8": (8, 4, 256, 4)}
GLU_VERSIONS = {"b1": (1, 4, 1024, 4), "b8": (8, 4, 256, 4)}
MODES = {"norm": 0, "glu": 1, "add": 2}
_DOCS = {
    "norm": "y (B, N) f32 = rmsnorm(x (B, K), g) @ W.T (+ bias if has_bias); flag = has_bias",
    "glu": "y (B, N) f32 = act(h @ W.T) * (h @ U.T), h = rmsnorm(x, g); flag = act (0 silu, 1 gelu)",
    "add": "y (B, N) f32 += x (B, K) f32 @ W.T (the residual update in place)",
}


def _up_params(qtype: str) -> tuple[tuple[str, str], ...]:
    return _planes_as(qtype, "u")


def specs() -> list[KernelSpec]:
    out = []
    for qtype in FORMATS:
        for mode, code in MODES.items():
            unused = list(unused_planes(qtype))
            if mode != "glu":
                unused += [f"u_{p[2:]}" for p, _ in weight_params(qtype)]
            else:
                unused += [f"u_{p[2:]}" for p in unused_planes(qtype)]
            if mode == "add":
                unused += ["g", "bias"]
            elif mode == "glu":
                unused += ["bias"]
            for version, (bb, bn, bk, warps) in (GLU_VERSIONS if mode == "glu" else VERSIONS).items():
                out.append(KernelSpec(
                    name=f"matvec_{mode}_{qtype.lower()}_{version}",
                    family="matvec_fused",
                    fn="matvec_fused_kernel",
                    params=weight_params(qtype) + _up_params(qtype) + (
                        ("x", "*fp32"), ("g", "*fp32"), ("bias", "*fp32"), ("y", "*fp32"),
                        ("N", "i32"), ("K", "i32"), ("B", "i32"), ("eps", "fp32"), ("flag", "i32")),
                    constexprs={"MODE": code, **weight_constexprs(qtype), "BLOCK_N": bn, "BLOCK_K": bk,
                                "BLOCK_B": bb},
                    grid=(f"cdiv(N, {bn})", f"cdiv(B, {bb})", "1"),
                    sizes={},
                    limits=weight_limits(qtype, "K") + ("1 <= B <= 8", "N >= 1"),
                    reference=f"reference.matvec_{mode}",
                    num_warps=warps,
                    num_stages=1,
                    aligned=("w_q", "w_s", "w_m", "u_q", "u_s", "u_m", "x", "g", "y", "K"),
                    unused=tuple(unused),
                    doc=f"{_DOCS[mode]}; W, U {qtype} repacked (N, K)",
                    deps=("dequant", "repack", "row_dot", "spec"),
                    qtype=qtype,
                ))
    return out + qkv_specs()


def _planes_as(qtype: str, prefix: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}_{name[2:]}", t) for name, t in weight_params(qtype))


def qkv_specs() -> list[KernelSpec]:
    """`matvec_qkv_<q>_<b>`: rmsnorm(x, g) times up to three weights of one type (q, k, v),
    each with an optional bias (`has_bias`), in one launch."""
    out = []
    for qtype in FORMATS:
        unused = [f"{pre}_{p[2:]}" for pre in ("w", "u", "v") for p in unused_planes(qtype)]
        for version, (bb, bn, bk, warps) in VERSIONS.items():
            out.append(KernelSpec(
                name=f"matvec_qkv_{qtype.lower()}_{version}",
                family="matvec_fused",
                fn="matvec_qkv_kernel",
                params=weight_params(qtype) + _planes_as(qtype, "u") + _planes_as(qtype, "v") + (
                    ("x", "*fp32"), ("g", "*fp32"), ("bias0", "*fp32"), ("bias1", "*fp32"),
                    ("bias2", "*fp32"), ("y0", "*fp32"), ("y1", "*fp32"), ("y2", "*fp32"),
                    ("N0", "i32"), ("N1", "i32"), ("N2", "i32"), ("K", "i32"), ("B", "i32"),
                    ("eps", "fp32"), ("has_bias", "i32")),
                constexprs={**weight_constexprs(qtype), "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_B": bb},
                grid=(f"cdiv(N0, {bn}) + cdiv(N1, {bn}) + cdiv(N2, {bn})", f"cdiv(B, {bb})", "1"),
                sizes={},
                limits=weight_limits(qtype, "K") + ("1 <= B <= 8", "N0 >= 1", "N1 >= 0", "N2 >= 0"),
                reference="reference.matvec_qkv",
                num_warps=warps,
                num_stages=1,
                aligned=("w_q", "w_s", "w_m", "u_q", "u_s", "u_m", "v_q", "v_s", "v_m", "x", "g", "K"),
                unused=tuple(unused),
                doc=f"y_i (B, N_i) f32 = rmsnorm(x (B, K), g) @ W_i.T (+ bias_i), i < 3, {qtype} repacked",
                deps=("dequant", "repack", "row_dot", "spec"),
                qtype=qtype,
            ))
    return out
