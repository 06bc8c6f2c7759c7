"""Fused decode mat-vecs (ptx_kernels/matvec_fused.py) vs numpy, every qtype, interpreter mode:
norm (+bias), q/k/v in one launch, GLU (SiLU and GELU-tanh, two weights), residual add in place.

Bound: f32 math, |y - ref| <= 1e-5 * (|h| @ |W|.T) (+ the same for the up product in the GLU),
h the normed input.  Outputs start as NaN (or the residual) so a skipped element fails.
"""

import numpy as np
import pytest
from conftest import abs_product, check_qkv, run_spec, three_blocks, weight_arrays

from ukgpu.ptx_kernels import reference as R

CASES = [("b1", 1), ("b8", 3), ("b8", 8)]


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("version,batch", CASES)
@pytest.mark.parametrize("has_bias", [0, 1])
def test_matvec_norm(qtype, version, batch, has_bias, rng):
    n, k, eps = 37, three_blocks(qtype), 1e-6
    w = R.random_repacked(qtype, n, k, rng)
    x = (rng.standard_normal((batch, k)) * 3).astype(np.float32)
    g = rng.uniform(0.5, 1.5, k).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = np.full((batch, n), np.nan, np.float32)
    out = run_spec(f"matvec_norm_{qtype.lower()}_{version}",
                   weight_arrays(w) | {"x": x, "g": g, "bias": bias, "y": y},
                   {"N": n, "K": k, "B": batch, "eps": eps, "flag": has_bias})
    want = R.matvec_norm(w, x, g, eps, bias if has_bias else None)
    err = np.abs(out["y"] - want)
    assert np.all(err <= 1e-5 * abs_product(R.rmsnorm(x, g, eps), w) + 1e-6), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("version,batch", CASES)
@pytest.mark.parametrize("widths", [(37, 9, 9), (40, 16, 0)], ids=["qkv", "two"])
def test_matvec_qkv(qtype, version, batch, widths, rng):
    k, eps = three_blocks(qtype), 1e-6
    x = (rng.standard_normal((batch, k)) * 3).astype(np.float32)
    g = rng.uniform(0.5, 1.5, k).astype(np.float32)
    check_qkv(f"matvec_qkv_{qtype.lower()}_{version}", qtype, widths, x, g, eps, 1e-5, {"B": batch}, rng)


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("version,batch", CASES)
@pytest.mark.parametrize("act", [0, 1])
def test_matvec_glu(qtype, version, batch, act, rng):
    n, k, eps = 37, three_blocks(qtype), 1e-6
    wg, wu = R.random_repacked(qtype, n, k, rng), R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    g = rng.uniform(0.5, 1.5, k).astype(np.float32)
    y = np.full((batch, n), np.nan, np.float32)
    out = run_spec(f"matvec_glu_{qtype.lower()}_{version}",
                   weight_arrays(wg) | weight_arrays(wu, "u") | {"x": x, "g": g, "y": y},
                   {"N": n, "K": k, "B": batch, "eps": eps, "flag": act})
    want = R.matvec_glu(wg, wu, x, g, eps, act)
    h = R.rmsnorm(x, g, eps)
    gate, up = R.matvec(wg, h), R.matvec(wu, h)
    # d(act(a) b) = act'(a) b da + act(a) db, with |act'| <= 1.13 and |act(a)| <= |a| + 0.2
    bound = 1e-5 * (1.2 * np.abs(up) * abs_product(h, wg) + (np.abs(gate) + 0.2) * abs_product(h, wu)) + 1e-6
    err = np.abs(out["y"] - want)
    assert np.all(err <= bound), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("version,batch", CASES)
def test_matvec_add_updates_the_residual_in_place(qtype, version, batch, rng):
    n, k = 37, three_blocks(qtype)
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    resid = rng.standard_normal((batch, n)).astype(np.float32)
    out = run_spec(f"matvec_add_{qtype.lower()}_{version}", weight_arrays(w) | {"x": x, "y": resid.copy()},
                   {"N": n, "K": k, "B": batch, "eps": 0.0, "flag": 0})
    err = np.abs(out["y"] - R.matvec_add(w, x, resid))
    assert np.all(err <= 1e-5 * abs_product(x, w) + 1e-6), f"max err {np.nanmax(err)}"
