"""Fused prefill GEMMs (ptx_kernels/gemm_fused.py) vs numpy, every qtype, interpreter mode:
normed q/k/v (+bias) in one launch (and a lone normed weight), the normed GLU (SiLU and
GELU-tanh), the residual add in place; M and N not multiples of the tiles, K past one tile.

Bound: f16 tensor-core operands (x*g and W rounded to f16, as `gemm_<q>`): |y - ref| <=
4e-3 * (|h| @ |W|.T) with h the normed input (+ the up product's share in the GLU).  Outputs
start as NaN (or the residual) so a skipped element fails; rows with values past float16's
range (the row scaling of gemm.py) stay finite.
"""

import numpy as np
import pytest
from conftest import abs_product, check_qkv, run_spec, three_blocks, weight_arrays

from ukgpu.ptx_kernels import reference as R

REL = 4e-3
M = 70


def _inputs(rng, k):
    x = (rng.standard_normal((M, k)) * 3).astype(np.float32)
    x[5] *= 3e4  # a row whose x*g passes 65504: scaled by a power of two, not inf
    return x, rng.uniform(0.5, 1.5, k).astype(np.float32)


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("widths", [(67, 9, 9), (80, 16, 0), (67, 0, 0)], ids=["qkv", "two", "one"])
def test_gemm_qkv(qtype, widths, rng):
    k, eps = three_blocks(qtype), 1e-6
    x, g = _inputs(rng, k)
    check_qkv(f"gemm_qkv_{qtype.lower()}", qtype, widths, x, g, eps, REL, {"M": M}, rng)


@pytest.mark.parametrize("qtype", R.QTYPES)
def test_gemm_qkv_without_bias_leaves_the_bias_unread(qtype, rng):
    k, eps, n = three_blocks(qtype), 1e-5, 40
    w = R.random_repacked(qtype, n, k, rng)
    x, g = _inputs(rng, k)
    y = np.full((M, n), np.nan, np.float32)
    absent = weight_arrays(w, "u") | weight_arrays(w, "v") | {"y1": np.zeros(1, np.float32), "y2": np.zeros(1, np.float32)}
    absent |= {f"bias{i}": np.full(n, np.nan, np.float32) for i in range(3)}  # NaN if read
    out = run_spec(f"gemm_qkv_{qtype.lower()}", weight_arrays(w) | absent | {"x": x, "g": g, "y0": y},
                   {"M": M, "N0": n, "N1": 0, "N2": 0, "K": k, "eps": eps, "has_bias": 0})
    err = np.abs(out["y0"] - R.matvec_norm(w, x, g, eps))
    assert np.all(err <= REL * abs_product(R.rmsnorm(x, g, eps), w) + 1e-6), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("act", [0, 1])
def test_gemm_glu(qtype, act, rng):
    n, k, eps = 45, three_blocks(qtype), 1e-6
    wg, wu = R.random_repacked(qtype, n, k, rng), R.random_repacked(qtype, n, k, rng)
    x, g = _inputs(rng, k)
    y = np.full((M, n), np.nan, np.float32)
    out = run_spec(f"gemm_glu_{qtype.lower()}", weight_arrays(wg) | weight_arrays(wu, "u") | {"x": x, "g": g, "y": y},
                   {"M": M, "N": n, "K": k, "eps": eps, "flag": act})
    want = R.matvec_glu(wg, wu, x, g, eps, act)
    h = R.rmsnorm(x, g, eps)
    gate, up = R.matvec(wg, h), R.matvec(wu, h)
    # d(act(a) b) = act'(a) b da + act(a) db, with |act'| <= 1.13 and |act(a)| <= |a| + 0.2
    bound = REL * (1.2 * np.abs(up) * abs_product(h, wg) + (np.abs(gate) + 0.2) * abs_product(h, wu)) + 1e-6
    err = np.abs(out["y"] - want)
    assert np.all(err <= bound), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", R.QTYPES)
def test_gemm_add_updates_the_residual_in_place(qtype, rng):
    n, k = 67, three_blocks(qtype)
    w = R.random_repacked(qtype, n, k, rng)
    x, _ = _inputs(rng, k)
    resid = rng.standard_normal((M, n)).astype(np.float32)
    out = run_spec(f"gemm_add_{qtype.lower()}", weight_arrays(w) | {"x": x, "y": resid.copy()},
                   {"M": M, "N": n, "K": k})
    assert np.isfinite(out["y"]).all()
    err = np.abs(out["y"] - R.matvec_add(w, x, resid))
    assert np.all(err <= REL * abs_product(x, w) + 1e-6), f"max err {np.nanmax(err)}"
