"""rmsnorm, rope, swiglu, add, argmax, store_rows vs numpy, interpreter mode, on ragged shapes.

Bounds: float32 element math 1e-5 relative (rmsnorm, swiglu, add); rope 1e-5 * |x| at positions
up to 4095 (float64 angle, float32 cos/sin: see test_ptx_families.py for scaled tables, partial
rotation and large positions); argmax and store_rows exact.
Outputs start as NaN (or a sentinel where NaN would be a legal value) so skipped elements fail.
"""

import numpy as np
import pytest
from conftest import run_spec

from ukgpu.ptx_kernels import reference as R


@pytest.mark.parametrize("d", [64, 896, 1500])
def test_rmsnorm(d, rng):
    m = 3
    x = (rng.standard_normal((m, d)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    out = run_spec("rmsnorm_f32", {"x": x, "weight": w, "y": np.full_like(x, np.nan)},
                   {"M": m, "D": d, "eps": 1e-6})
    np.testing.assert_allclose(out["y"], R.rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("hd", [64, 128])
def test_rope(neox, hd, rng):
    t, h, fused_heads = 5, 3, 7  # rotate 3 heads out of rows that hold 7 (a fused QKV row)
    base = 10000.0 if not neox else 1000000.0
    rows = rng.standard_normal((t, fused_heads * hd)).astype(np.float32)
    pos = np.array([0, 1, 17, 2047, 4095], np.int32)
    y = np.full((t, h * hd), np.nan, np.float32)
    name = f"rope_{'neox' if neox else 'norm'}_d{hd}"
    freqs = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    out = run_spec(name, {"x": rows, "y": y, "pos": pos, "freqs": freqs},
                   {"T": t, "H": h, "stride_x": fused_heads * hd, "stride_y": h * hd,
                    "head_dim": hd, "n_rot": hd, "mscale": 1.0})
    want = R.rope(rows[:, : h * hd].reshape(t, h, hd), pos, base, neox).reshape(t, -1)
    np.testing.assert_allclose(out["y"], want, atol=1e-5 * np.abs(rows).max(), rtol=0)
    # position 0 is the identity
    np.testing.assert_allclose(out["y"][0], rows[0, : h * hd], rtol=1e-6, atol=1e-7)


def test_rope_in_place(rng):
    t, h, hd = 4, 2, 64
    x = rng.standard_normal((t, h * hd)).astype(np.float32)
    pos = np.array([3, 9, 100, 5], np.int32)
    freqs = 1e4 ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    out = run_spec("rope_norm_d64", {"x": x.copy(), "pos": pos, "freqs": freqs},
                   {"T": t, "H": h, "stride_x": h * hd, "stride_y": h * hd, "head_dim": hd,
                    "n_rot": hd, "mscale": 1.0}, aliases={"y": "x"})
    want = R.rope(x.reshape(t, h, hd), pos, 1e4, False).reshape(t, -1)
    np.testing.assert_allclose(out["x"], want, atol=1e-4, rtol=0)



def test_swiglu_and_add(rng):
    n = 2500  # not a multiple of the 1024 block
    g, u = (rng.standard_normal(n).astype(np.float32) * 4 for _ in range(2))
    out = run_spec("swiglu_f32", {"gate": g, "up": u, "out": np.full(n, np.nan, np.float32)}, {"n": n})
    np.testing.assert_allclose(out["out"], R.swiglu(g, u), rtol=1e-5, atol=1e-6)
    out = run_spec("add_f32", {"a": g, "b": u, "out": np.full(n, np.nan, np.float32)}, {"n": n})
    np.testing.assert_allclose(out["out"], R.add(g, u), rtol=1e-6)


def test_add_bias_in_place(rng):
    m, n = 3, 896 + 128  # a fused q|k|v row width, not a multiple of the 1024 block in total
    x = rng.standard_normal((m, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    out = run_spec("add_bias_f32", {"x": x.copy(), "bias": bias}, {"n": m * n, "N": n},
                   aliases={"out": "x"})
    np.testing.assert_allclose(out["x"], R.add_bias(x, bias), rtol=1e-6)


def test_argmax_first_of_ties(rng):
    b, v = 4, 3000
    logits = rng.standard_normal((b, v)).astype(np.float32)
    logits[0, [5, 2999]] = 50.0  # tie: first wins
    logits[1, [1500, 2048]] = 60.0  # tie across two 1024-blocks
    logits[2, :] = -np.inf
    logits[2, 2999] = -1e30  # last element, everything else -inf
    out = run_spec("argmax_f32", {"logits": logits, "out": np.full(b, -7, np.int32)}, {"B": b, "V": v})
    np.testing.assert_array_equal(out["out"], R.argmax(logits))
    assert list(out["out"][:3]) == [5, 1500, 2999]


def test_store_rows(rng):
    n_rows, w, t, stride = 9, 192, 3, 448  # src rows are slices of wider (fused QKV) rows
    dst = np.full((n_rows, w), 7.0, np.float16)  # sentinel: untouched rows must keep it
    src = rng.standard_normal((t, stride)).astype(np.float32)
    rows = np.array([8, 0, 4], np.int32)
    out = run_spec("store_rows_f16", {"src": src, "dst": dst, "rows": rows},
                   {"T": t, "W": w, "src_stride": stride})
    np.testing.assert_array_equal(out["dst"], R.store_rows(dst, src[:, :w], rows))
