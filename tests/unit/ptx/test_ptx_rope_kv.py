"""rope_kv (ptx_kernels/rope_kv.py) vs numpy in interpreter mode: per-head norms, NORM and NEOX
rope with partial rotation, q rotated in place, k and v stored as float16 at each row's cache
row (a batch over slab slots), other cache rows untouched."""

import numpy as np
import pytest
from conftest import run_spec

from ukgpu.ptx_kernels import reference as R


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("hd,n_rot,d", [(64, 64, 64), (96, 64, 128), (128, 128, 128), (256, 256, 256)])
@pytest.mark.parametrize("has_norm", [0, 1])
def test_rope_kv(mode, hd, n_rot, d, has_norm, rng):
    t, hq, hkv, n_rows = 3, 6, 2, 40
    q = rng.standard_normal((t, hq, hd)).astype(np.float32)
    k = rng.standard_normal((t, hkv, hd)).astype(np.float32)
    v = rng.standard_normal((t, hkv, hd)).astype(np.float32)
    pos = np.array([5, 17, 3000], np.int32)
    rows = np.array([5, 16 + 17, 39], np.int32)  # slot * n_ctx + position in a slab
    freqs = 1e4 ** (-np.arange(0, n_rot, 2) / n_rot)
    qn, kn = (rng.uniform(0.5, 1.5, hd).astype(np.float32) for _ in range(2))
    kc = np.full((n_rows, hkv, hd), 7, np.float16)
    vc = np.full((n_rows, hkv, hd), 7, np.float16)
    out = run_spec(f"rope_kv_{mode}_d{d}",
                   {"q": q.copy(), "k": k, "v": v, "q_norm": qn, "k_norm": kn, "pos": pos, "rows": rows,
                    "freqs": freqs, "k_cache": kc, "v_cache": vc},
                   {"T": t, "Hq": hq, "Hkv": hkv, "head_dim": hd, "n_rot": n_rot, "mscale": 0.9,
                    "eps": 1e-6, "has_norm": has_norm})
    norms = (qn, kn) if has_norm else (None, None)
    wq, wk, wv = R.rope_kv(q, k, v, pos, freqs, mode == "neox", n_rot, 0.9, *norms)
    np.testing.assert_allclose(out["q"], wq, rtol=0, atol=2e-5 * np.abs(wq).max())
    # float32 rotation then one rounding to float16: at most one f16 step from the float64 value's
    np.testing.assert_allclose(out["k_cache"][rows].astype(np.float32), wk, rtol=2.0**-10, atol=1e-6)
    np.testing.assert_array_equal(out["v_cache"][rows], wv.astype(np.float16))
    untouched = np.setdiff1d(np.arange(n_rows), rows)
    assert (out["k_cache"][untouched] == 7).all() and (out["v_cache"][untouched] == 7).all()
