"""Causal GQA attention (prefill and decode) vs numpy over a float16 KV cache, interpreter mode.

Decode runs split over the keys (flash-decoding), one program per kv head for its whole group of
query heads (group sizes 1, 3, 7, 16 tested), and then merges the splits; with lens[b] = 1 the
later splits are empty and must not disturb the result.
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


def _cache(rng, n_slots, n_ctx, hd, hkv=HKV):
    k = rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16)
    v = rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16)
    return k, v


@pytest.mark.parametrize("hd", [32, 64, 96, 128])
@pytest.mark.parametrize("start,t", [(0, 70), (37, 5), (0, 1)])
def test_attn_prefill(hd, start, t, rng):
    k, v = _cache(rng, 1, start + t + 20, hd)
    k[0, start + t :] = np.nan
    v[0, start + t :] = np.nan
    q = rng.standard_normal((t, HQ, hd)).astype(np.float32)
    scale = hd ** -0.5
    out = run_spec(f"attn_prefill_d{hd}",
                   {"q": q, "k_cache": k, "v_cache": v, "out": np.full_like(q, np.nan)},
                   {"T": t, "start": start, "Hq": HQ, "Hkv": HKV, "scale": scale, "window": 0})
    want = R.attention(q, k[0, : start + t], v[0, : start + t], start + np.arange(t), scale)
    np.testing.assert_allclose(out["out"], want, atol=1e-2 * np.abs(v[0, : start + t]).max(), rtol=0)


def _decode(hd, q, k, v, slots, lens, n_ctx, splits, chunk, window=0):
    b, hq = len(slots), q.shape[1]
    part_o = np.full((b, hq, splits, hd), np.nan, np.float32)
    part_ml = np.full((b, hq, splits, 2), np.nan, np.float32)
    vals = {"B": b, "S": splits, "n_ctx": n_ctx, "chunk": chunk, "Hq": hq, "Hkv": k.shape[2],
            "scale": hd ** -0.5, "window": window}
    parts = run_spec(f"attn_decode_d{hd}", {"q": q, "k_cache": k, "v_cache": v, "part_out": part_o,
                                            "part_ml": part_ml, "slots": slots, "lens": lens}, vals)
    out = run_spec(f"attn_combine_d{hd}", {"part_out": parts["part_out"], "part_ml": parts["part_ml"],
                                           "out": np.full_like(q, np.nan)}, vals)
    return out["out"]


@pytest.mark.parametrize("hd", [32, 64, 96, 128])
@pytest.mark.parametrize("splits,chunk,n_ctx,hq,hkv", [
    (1, 128, 128, HQ, HKV), (3, 64, 150, 14, 2), (2, 64, 128, 4, 4), (2, 64, 100, 16, 1)])
def test_attn_decode(hd, splits, chunk, n_ctx, hq, hkv, rng):
    n_slots = 3
    k, v = _cache(rng, n_slots, n_ctx, hd, hkv)
    slots = np.array([2, 0, 1], np.int32)
    lens = np.array([1, n_ctx, 37], np.int32)  # minimum, a full context, a middle
    for s, n in zip(slots, lens):
        k[s, n:] = np.nan
        v[s, n:] = np.nan
    q = rng.standard_normal((len(slots), hq, hd)).astype(np.float32)
    got = _decode(hd, q, k, v, slots, lens, n_ctx, splits, chunk)
    for i, (s, n) in enumerate(zip(slots, lens)):
        want = R.attention(q[i : i + 1], k[s, :n], v[s, :n], np.array([n - 1]), hd ** -0.5)[0]
        np.testing.assert_allclose(got[i], want, atol=1e-4 * np.abs(v[s, :n]).max(), rtol=0)
