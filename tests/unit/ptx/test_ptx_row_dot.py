"""The one-row mat-vec loop (ptx_kernels/row_dot.py) over several K steps, the last one partial:
plain, residual-add, GLU (gate and up in one loop) and q/k/v b1 entries vs numpy, interpreter mode.

The other kernel tests use K below one step of the b1 entries (1,024 columns); here K is 2,304
for the 256-blocks (2.25 steps) and 1,120 for the 32-blocks (1.09 steps).  Bound as theirs:
|y - ref| <= 1e-5 * (|h| @ |W|.T).  Outputs start as NaN (or the residual).
"""

import numpy as np
import pytest
from conftest import SPECS, run_spec

from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.repack import dequantize_repacked, get_format


def _cols(qtype: str) -> int:
    k = 2304 if get_format(qtype).block_elems == 256 else 1120
    assert k > SPECS[f"matvec_{qtype.lower()}_b1"].constexprs["BLOCK_K"]
    return k


def _planes(w, prefix="w") -> dict:
    return {f"{prefix}_{k}": v for k, v in w.planes().items()}


def _bound(h, w):
    return 1e-5 * (np.abs(h).astype(np.float64) @ np.abs(dequantize_repacked(w)).astype(np.float64).T) + 1e-30


@pytest.mark.parametrize("qtype", R.QTYPES)
def test_plain_and_residual_add(qtype, rng):
    n, k = 9, _cols(qtype)
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((1, k)).astype(np.float32)
    y = np.full((1, n), np.nan, np.float32)
    out = run_spec(f"matvec_{qtype.lower()}_b1", _planes(w) | {"x": x, "y": y}, {"N": n, "K": k, "B": 1})
    assert np.all(np.abs(out["y"] - R.matvec(w, x)) <= _bound(x, w))
    res = rng.standard_normal((1, n)).astype(np.float32)
    out = run_spec(f"matvec_add_{qtype.lower()}_b1", _planes(w) | {"x": x, "y": res.copy()},
                   {"N": n, "K": k, "B": 1, "eps": 0.0, "flag": 0})
    assert np.all(np.abs(out["y"] - (res + R.matvec(w, x))) <= _bound(x, w) + 1e-6 * np.abs(res))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q4_1", "Q8_0", "Q5_K", "BF16"])
def test_glu_and_qkv(qtype, rng):
    n, k, eps = 5, _cols(qtype), 1e-6
    wg, wu, wv = (R.random_repacked(qtype, n, k, rng) for _ in range(3))
    x = rng.standard_normal((1, k)).astype(np.float32)
    g = rng.uniform(0.5, 1.5, k).astype(np.float32)
    h = R.rmsnorm(x, g, eps)
    y = np.full((1, n), np.nan, np.float32)
    out = run_spec(f"matvec_glu_{qtype.lower()}_b1", _planes(wg) | _planes(wu, "u") | {"x": x, "g": g, "y": y},
                   {"N": n, "K": k, "B": 1, "eps": eps, "flag": 0})
    gate, up = R.matvec(wg, h), R.matvec(wu, h)
    # d(act(a) b) = act'(a) b da + act(a) db, with |act'| <= 1.13 and |act(a)| <= |a| + 0.2
    bound = 1.2 * np.abs(up) * _bound(h, wg) + (np.abs(gate) + 0.2) * _bound(h, wu) + 1e-6
    assert np.all(np.abs(out["y"] - R.matvec_glu(wg, wu, x, g, eps, 0)) <= bound)
    ys = [np.full((1, n), np.nan, np.float32) for _ in range(3)]
    bias = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    out = run_spec(f"matvec_qkv_{qtype.lower()}_b1",
                   _planes(wg) | _planes(wu, "u") | _planes(wv, "v") | {"x": x, "g": g}
                   | {f"y{i}": ys[i] for i in range(3)} | {f"bias{i}": bias[i] for i in range(3)},
                   {"N0": n, "N1": n, "N2": n, "K": k, "B": 1, "eps": eps, "has_bias": 1})
    for i, w in enumerate((wg, wu, wv)):
        assert np.all(np.abs(out[f"y{i}"] - (R.matvec(w, h) + bias[i])) <= _bound(h, w) + 1e-6), i
