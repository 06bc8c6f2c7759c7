"""The prefill GEMM on rows past float16's range (interpreter mode): power-of-two scaling of each
row's x tile.

Rows with a 1e5 and a 3e6 channel (an f16 cast alone makes them inf) must come out finite and
within the f16 GEMM bound of test_ptx_matmul; rows below 2^15 must be the unscaled f16 GEMM,
which the numpy model below computes operand for operand (up to the order of f32 sums).
"""

import numpy as np
import pytest
from conftest import run_spec

from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.repack import dequantize_repacked


def _f16_gemm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x and W rounded to f16 as the kernel does (no scaling), products summed in float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        xs, ws = x.astype(np.float16).astype(np.float64), w.astype(np.float16).astype(np.float64)
        return xs @ ws.T


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_gemm_outlier_rows_stay_finite(qtype, rng):
    m, n, k = 70, 67, 512
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[3, 5], x[40, 300], x[41, 7] = 1e5, -3e6, 40000.0  # past 65504, far past it, in (2^15, 65504)
    y = np.full((m, n), np.nan, np.float32)
    out = run_spec(f"gemm_{qtype.lower()}", {f"w_{p}": a for p, a in w.planes().items()} | {"x": x, "y": y},
                   {"M": m, "N": n, "K": k})["y"]
    assert np.isfinite(out).all()
    wd = dequantize_repacked(w).astype(np.float64)
    bound = 4e-3 * (np.abs(x).astype(np.float64) @ np.abs(wd).T)
    assert np.all(np.abs(out - R.matvec(w, x)) <= bound)
    plain = np.setdiff1d(np.arange(m), [3, 40, 41])
    f16 = _f16_gemm(x[plain], wd)  # what the unscaled kernel computes on ordinary rows
    assert np.all(np.abs(out[plain] - f16) <= 1e-5 * (np.abs(x[plain]) @ np.abs(wd).T) + 1e-6)
    assert not np.isfinite(_f16_gemm(x[[3, 40]], wd)).all()  # the unscaled cast overflows
