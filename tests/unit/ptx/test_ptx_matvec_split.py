"""Split-K residual mat-vec (ptx_kernels/matvec_split.py) vs numpy, every qtype, interpreter mode:
y += x @ W.T for 1..5 splits (more splits than K has 256-blocks included: empty chunks), the
ticket counters left at zero, and the same bits on a second launch (deterministic reduction).

Bound: as the fused mat-vecs, |y - ref| <= 1e-5 * (|x| @ |W|.T) + 1e-6.
"""

import numpy as np
import pytest
from conftest import run_spec

from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.repack import dequantize_repacked, get_format


def _cols(qtype: str) -> int:
    unit = max(get_format(qtype).block_elems, 32)
    return unit * 5 if unit == 256 else 32 * 21  # 5 K-quant blocks; 672 columns: a partial 256-chunk


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_matvec_split_add(qtype, splits, rng):
    n, k = 37, _cols(qtype)
    w = R.random_repacked(qtype, n, k, rng)
    planes = {f"w_{p}": v for p, v in w.planes().items()}
    x = rng.standard_normal((1, k)).astype(np.float32)
    resid = rng.standard_normal((1, n)).astype(np.float32)
    count = np.zeros(-(-n // 4), np.int32)
    part = np.full((splits, n), np.nan, np.float32)
    values = {"N": n, "K": k, "splits": splits}
    out = run_spec(f"matvec_split_add_{qtype.lower()}_b1",
                   planes | {"x": x, "y": resid.copy(), "part": part, "count": count}, values)
    want = R.matvec_add(w, x, resid)
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(dequantize_repacked(w)).astype(np.float64).T) + 1e-6
    err = np.abs(out["y"] - want)
    assert np.all(err <= bound), f"max err {np.nanmax(err)}"
    assert not out["count"].any(), "ticket counters must be left at zero"
    again = run_spec(f"matvec_split_add_{qtype.lower()}_b1",
                     planes | {"x": x, "y": resid.copy(), "part": part, "count": out["count"]}, values)
    assert np.array_equal(again["y"], out["y"])


def test_more_splits_than_blocks_leaves_empty_chunks_harmless(rng):
    n, k, splits = 9, 512, 5  # two 256-blocks, five splits: three programs a row block sum nothing
    w = R.random_repacked("Q4_K", n, k, rng)
    x = rng.standard_normal((1, k)).astype(np.float32)
    resid = rng.standard_normal((1, n)).astype(np.float32)
    out = run_spec("matvec_split_add_q4_k_b1",
                   {f"w_{p}": v for p, v in w.planes().items()}
                   | {"x": x, "y": resid.copy(), "part": np.zeros((splits, n), np.float32),
                      "count": np.zeros(3, np.int32)},
                   {"N": n, "K": k, "splits": splits})
    np.testing.assert_allclose(out["y"], R.matvec_add(w, x, resid), rtol=1e-5, atol=1e-4)
    assert not out["count"].any()
