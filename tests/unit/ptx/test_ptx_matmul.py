"""Mat-vec (decode), GEMM (prefill) and embedding kernels vs numpy, every qtype, interpreter mode.

Bounds: f32 math (mat-vec): |y - ref| <= 1e-5 * (|x| @ |W|.T); f16 tensor-core GEMM (both
operands rounded to f16): <= 4e-3 * (|x| @ |W|.T); embedding: exact up to f32 rounding (1e-6).
Outputs start as NaN so any element a kernel skips fails.
"""

import numpy as np
import pytest
from conftest import SPECS, run_spec

from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.repack import dequantize_repacked, get_format

QTYPES = R.QTYPES


def _cols(qtype: str, ragged: bool) -> int:
    """Smallest legal K, or one that is not a multiple of the kernels' K tiles."""
    unit = max(get_format(qtype).block_elems, 32)
    return unit * (3 if ragged else 1) if unit == 256 else (96 if ragged else 32)


def _planes(w) -> dict:
    p = w.planes()
    return {f"w_{k}": v for k, v in p.items()}


def _bound(x, w, rel):
    return rel * (np.abs(x).astype(np.float64) @ np.abs(dequantize_repacked(w)).astype(np.float64).T)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("version,batch", [("b1", 1), ("b1", 3), ("b8", 5), ("b8", 8)])
def test_matvec(qtype, version, batch, rng):
    n, k = 37, _cols(qtype, ragged=batch != 1)
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    y = np.full((batch, n), np.nan, np.float32)
    out = run_spec(f"matvec_{qtype.lower()}_{version}", _planes(w) | {"x": x, "y": y},
                   {"N": n, "K": k, "B": batch})
    err = np.abs(out["y"] - R.matvec(w, x))
    assert np.all(err <= _bound(x, w, 1e-5) + 1e-30), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", QTYPES)
def test_gemm(qtype, rng):
    m, n, k = 70, 67, _cols(qtype, ragged=True)
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = np.full((m, n), np.nan, np.float32)
    out = run_spec(f"gemm_{qtype.lower()}", _planes(w) | {"x": x, "y": y}, {"M": m, "N": n, "K": k})
    err = np.abs(out["y"] - R.matvec(w, x))
    assert np.all(err <= _bound(x, w, 4e-3)), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", QTYPES)
def test_embedding(qtype, rng):
    v, k = 11, _cols(qtype, ragged=True) + (256 if qtype.startswith("F") else 0)
    w = R.random_repacked(qtype, v, k, rng)
    ids = np.array([0, v - 1, 3, 3, 7], np.int32)
    o = np.full((len(ids), k), np.nan, np.float32)
    out = run_spec(f"embedding_{qtype.lower()}", _planes(w) | {"ids": ids, "out": o},
                   {"K": k, "T": len(ids)})
    np.testing.assert_allclose(out["out"], R.embedding(w, ids), rtol=1e-6, atol=0)


def test_every_weight_entry_is_tested():
    tested = {f"{fam}_{q.lower()}{suf}" for q in QTYPES
              for fam, suf in (("matvec", "_b1"), ("matvec", "_b8"), ("gemm", ""), ("embedding", ""))}
    shipped = {n for n, s in SPECS.items() if s.family in ("matvec", "gemm", "embedding")}  # fused: own test
    assert shipped == tested
