"""Fused decode attention (attn_decode_rope_*, ptx_kernels/attention_fused.py) in interpreter mode,
then attn_combine, vs numpy composed from the existing references: per-head norms -> rope at pos
(reference.rope_kv) -> k, v stored f16 at (slot, pos) (reference.store_rows) -> causal GQA
attention over the slot's cache (reference.attention).  The stand-in's emulator is held to the
same reference.

Three rows with their own slots and positions (0, the last cache row, a middle one); GQA groups
1, 6, 8 and 16 (two programs per kv head); NORM and NEOX, partial rotation, sliding window.
Cache rows at or past each row's position hold NaN before the launch, so a program that reads the
new row from memory (instead of its registers) or a row past lens fails.
Bounds: the stored k is within one f16 step of the float64 rotation; v is v rounded to f16; the
output is within 1e-4 * max|v| of the reference computed over the stored rows.
"""

import numpy as np
import pytest
from conftest import SPECS, run_spec

from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.loader import evaluate, fused_decode_entry

from fakes.cuda_kernels import EmulationError, emulator

N_CTX, SPLITS, CHUNK, N_SLOTS = 150, 3, 64, 3
SLOTS = np.array([2, 0, 1], np.int32)
POS = np.array([0, N_CTX - 1, 36], np.int32)


def _case(rng, hd, hq, hkv, n_rot, has_norm):
    b = len(SLOTS)
    q = rng.standard_normal((b, hq, hd)).astype(np.float32)
    k = rng.standard_normal((b, hkv, hd)).astype(np.float32)
    v = rng.standard_normal((b, hkv, hd)).astype(np.float32)
    kc = rng.standard_normal((N_SLOTS, N_CTX, hkv, hd)).astype(np.float16)
    vc = rng.standard_normal((N_SLOTS, N_CTX, hkv, hd)).astype(np.float16)
    for s, p in zip(SLOTS, POS):
        kc[s, p:], vc[s, p:] = np.nan, np.nan  # the new row and everything after it
    arrays = {"q": q, "k": k, "v": v, "freqs": 1e4 ** (-np.arange(0, n_rot, 2) / n_rot),
              "pos": POS, "slots": SLOTS, "lens": POS + 1, "k_cache": kc, "v_cache": vc,
              "part_out": np.full((b, hq, SPLITS, hd), np.nan, np.float32),
              "part_ml": np.full((b, hq, SPLITS, 2), np.nan, np.float32)}
    for name in ("q_norm", "k_norm"):  # NaN where has_norm = 0 says they must not be read
        arrays[name] = rng.uniform(0.5, 1.5, hd).astype(np.float32) if has_norm else np.full(hd, np.nan, np.float32)
    values = {"B": b, "S": SPLITS, "n_ctx": N_CTX, "chunk": CHUNK, "Hq": hq, "Hkv": hkv,
              "n_rot": n_rot, "mscale": 0.9, "eps": 1e-6, "has_norm": has_norm,
              "scale": hd ** -0.5}
    return arrays, values


def _combine(hd, got, values):
    out = np.full((values["B"], values["Hq"], hd), np.nan, np.float32)
    res = run_spec(f"attn_combine_d{hd}", {"part_out": got["part_out"], "part_ml": got["part_ml"],
                                           "out": out}, values)
    return res["out"]


def _check(arrays, values, got, out, neox):
    """Stored rows vs the rotation, other rows untouched, out vs attention over the stored rows."""
    a = arrays
    norms = (a["q_norm"], a["k_norm"]) if values["has_norm"] else (None, None)
    rq, rk, _ = R.rope_kv(a["q"], a["k"], a["v"], POS, a["freqs"], neox, values["n_rot"], 0.9, *norms)
    new_k, new_v = got["k_cache"][SLOTS, POS], got["v_cache"][SLOTS, POS]
    np.testing.assert_allclose(new_k.astype(np.float32), rk, rtol=2.0**-10, atol=1e-6)
    np.testing.assert_array_equal(new_v, a["v"].astype(np.float16))
    for name in ("k_cache", "v_cache"):
        want = R.store_rows(a[name].reshape(N_SLOTS * N_CTX, -1), got[name][SLOTS, POS].reshape(len(POS), -1),
                            SLOTS * N_CTX + POS)
        np.testing.assert_array_equal(got[name].reshape(N_SLOTS * N_CTX, -1), want)  # NaN == NaN here
    for i, (s, p) in enumerate(zip(SLOTS, POS)):
        keys, vals = got["k_cache"][s, : p + 1], got["v_cache"][s, : p + 1]
        want = R.attention(rq[i : i + 1], keys, vals, np.array([p]), values["scale"], values["window"])[0]
        np.testing.assert_allclose(out[i], want, atol=1e-4 * np.abs(vals).max(), rtol=0)


CASES = [  # hq, hkv, rotated dims (fraction of hd), has_norm, window
    (12, 2, 1, 1, 0), (8, 8, 2, 0, 0), (16, 2, 2, 1, 40), (32, 2, 1, 0, 0), (12, 2, 2, 0, 100)]


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("hd", [64, 96, 128])
@pytest.mark.parametrize("hq,hkv,frac,has_norm,window", CASES)
def test_attn_decode_rope(mode, hd, hq, hkv, frac, has_norm, window, rng):
    arrays, values = _case(rng, hd, hq, hkv, hd // frac, has_norm)
    values["window"] = window
    name = fused_decode_entry(mode == "neox", hd)
    got = run_spec(name, {k: a.copy() for k, a in arrays.items()}, values)
    _check(arrays, values, got, _combine(hd, got, values), mode == "neox")


class _Mem:
    """Host arrays at made-up device addresses, as FakeDriver.view serves them."""

    def __init__(self, arrays: dict):
        self.arrays, self.ptrs, at = {}, {}, 1 << 20
        for name, arr in arrays.items():
            self.arrays[at] = np.ascontiguousarray(arr).view(np.uint8).reshape(-1).copy()
            self.ptrs[name] = at
            at += -(-self.arrays[at].nbytes // 256) * 256 + 256

    def view(self, ptr, dtype, count):
        dtype = np.dtype(dtype)
        for base, buf in self.arrays.items():
            if base <= ptr and ptr + count * dtype.itemsize <= base + buf.nbytes:
                return buf[ptr - base : ptr - base + count * dtype.itemsize].view(dtype)
        raise AssertionError(f"access outside the arrays at {ptr:#x}")

    def get(self, name, like):
        return self.view(self.ptrs[name], like.dtype, like.size).reshape(like.shape)


def _emulate(name, arrays, values):
    spec = SPECS[name]
    mem = _Mem(arrays)
    args = {p: mem.ptrs.get(p, 0) if t.startswith("*") else values[p] for p, t in spec.params}
    grid = tuple(evaluate(g, values) for g in spec.grid)
    entry = {"name": name, "family": spec.family, "constexprs": spec.constexprs}
    emulator(entry)(mem, entry, args, grid)  # as registered in the stand-in driver's table
    return {k: mem.get(k, a) for k, a in arrays.items()}


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("hq,hkv,frac,has_norm,window", CASES[:3])
def test_emulator_matches_reference(mode, hq, hkv, frac, has_norm, window, rng):
    hd = 64
    arrays, values = _case(rng, hd, hq, hkv, hd // frac, has_norm)
    values["window"] = window
    got = _emulate(fused_decode_entry(mode == "neox", hd), arrays, values)
    _check(arrays, values, got, _combine(hd, got, values), mode == "neox")


@pytest.mark.parametrize("bad", [("pos", 1, N_CTX), ("lens", 1, 5), ("slots", 0, -1)])
def test_emulator_rejects_bad_rows(bad, rng):
    arrays, values = _case(rng, 64, 12, 2, 64, 0)
    values["window"] = 0
    field, row, value = bad
    arrays[field] = arrays[field].copy()
    arrays[field][row] = value
    with pytest.raises(EmulationError):
        _emulate(fused_decode_entry(True, 64), arrays, values)
