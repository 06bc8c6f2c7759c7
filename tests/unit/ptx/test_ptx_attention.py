"""Causal GQA attention (prefill and decode) vs numpy over a float16 KV cache, interpreter mode.

Bounds: decode reads f16 K/V exactly and accumulates in f32: |out - ref| <= 1e-4 * max|v|.
Prefill rounds q*scale and the softmax weights to f16 for the tensor-core dots:
|out - ref| <= 1e-2 * max|v|.  Cache rows past each sequence's length hold NaN: a kernel that
reads them fails.
"""

import numpy as np
import pytest
from conftest import run_spec

from ukgpu.ptx_kernels import reference as R

HQ, HKV = 6, 2


def _cache(rng, n_slots, n_ctx, hd):
    k = rng.standard_normal((n_slots, n_ctx, HKV, hd)).astype(np.float16)
    v = rng.standard_normal((n_slots, n_ctx, HKV, hd)).astype(np.float16)
    return k, v


@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("start,t", [(0, 70), (37, 5), (0, 1)])
def test_attn_prefill(hd, start, t, rng):
    k, v = _cache(rng, 1, start + t + 20, hd)
    k[0, start + t :] = np.nan
    v[0, start + t :] = np.nan
    q = rng.standard_normal((t, HQ, hd)).astype(np.float32)
    scale = hd ** -0.5
    out = run_spec(f"attn_prefill_d{hd}",
                   {"q": q, "k_cache": k, "v_cache": v, "out": np.full_like(q, np.nan)},
                   {"T": t, "start": start, "Hq": HQ, "Hkv": HKV, "scale": scale})
    want = R.attention(q, k[0, : start + t], v[0, : start + t], start + np.arange(t), scale)
    np.testing.assert_allclose(out["out"], want, atol=1e-2 * np.abs(v[0, : start + t]).max(), rtol=0)


@pytest.mark.parametrize("hd", [64, 128])
def test_attn_decode(hd, rng):
    n_slots, n_ctx = 3, 80
    k, v = _cache(rng, n_slots, n_ctx, hd)
    slots = np.array([2, 0, 1], np.int32)
    lens = np.array([1, 80, 37], np.int32)  # minimum, a full context (ragged vs 64), a middle
    for s, n in zip(slots, lens):
        k[s, n:] = np.nan
        v[s, n:] = np.nan
    b = len(slots)
    q = rng.standard_normal((b, HQ, hd)).astype(np.float32)
    scale = hd ** -0.5
    out = run_spec(f"attn_decode_d{hd}",
                   {"q": q, "k_cache": k, "v_cache": v, "out": np.full_like(q, np.nan),
                    "slots": slots, "lens": lens},
                   {"B": b, "n_ctx": n_ctx, "Hq": HQ, "Hkv": HKV, "scale": scale})
    for i, (s, n) in enumerate(zip(slots, lens)):
        want = R.attention(q[i : i + 1], k[s, :n], v[s, :n], np.array([n - 1]), scale)[0]
        np.testing.assert_allclose(out["out"][i], want, atol=1e-4 * np.abs(v[s, :n]).max(), rtol=0)
