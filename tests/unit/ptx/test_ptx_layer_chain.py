"""One qwen2-style decoder layer chained from the shipped kernels, prefill then one decode step,
against a float64 numpy forward: checks the conventions between kernels that a CUDA backend
relies on (fused QKV row strides, bias add, NEOX rope into a separate Q buffer, K/V cache rows
slot * n_ctx + pos written by store_rows and read by both attention kernels, split decode +
combine, GEMM and mat-vec agreeing, argmax on the logits).

Weights mix the quant types (Q4_K, Q6_K, Q4_1, Q5_0, Q8_0 tied embedding/output).  The attention
norm is scaled down (0.3) so the scores stay in the range of trained models: with full-size random
q/k the softmax is near one-hot and amplifies float16 rounding into a seed lottery.
Bounds, against max|logits|: prefill within 1e-2 of a reference that rounds the GEMM operands to
float16 as the kernel does; decode (f32 mat-vec over the f16 cache) within 2e-2 of the float64
forward.  Over 30 seeds the worst cases were 0.26% and 0.33%.
"""

import numpy as np
from conftest import run_spec

from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.repack import dequantize_repacked

DM, HQ, HKV, HD, FFN, VOCAB = 256, 4, 2, 64, 512, 96
NQKV = (HQ + 2 * HKV) * HD
N_SLOTS, N_CTX, SLOT = 2, 16, 1
BASE, EPS = 1e6, 1e-6


def _weights(rng):
    shapes = {"qkv": ("Q4_K", NQKV, DM), "o": ("Q6_K", DM, HQ * HD), "gate": ("Q4_1", FFN, DM),
              "up": ("Q4_1", FFN, DM), "down": ("Q5_0", DM, FFN), "emb": ("Q8_0", VOCAB, DM)}
    w = {name: R.random_repacked(*shape, rng) for name, shape in shapes.items()}
    norms = {n: (1 + 0.1 * rng.standard_normal(DM)).astype(np.float32) for n in ("attn", "ffn", "out")}
    norms["attn"] *= np.float32(0.3)
    bias = (0.1 * rng.standard_normal(NQKV)).astype(np.float32)
    return w, norms, bias


def _reference(w, norms, bias, ids, f16_gemm=False):
    """float64 forward of all tokens (positions 0..T-1) -> logits (T, VOCAB); with f16_gemm every
    matrix product rounds both operands to float16 first, as the prefill GEMM does."""
    t = len(ids)
    deq = {k: dequantize_repacked(v).astype(np.float64) for k, v in w.items()}

    def mm(a, name):
        if f16_gemm:
            return a.astype(np.float16).astype(np.float64) @ deq[name].astype(np.float16).astype(np.float64).T
        return a @ deq[name].T

    x = deq["emb"][ids]
    qkv = mm(R.rmsnorm(x, norms["attn"], EPS), "qkv") + bias
    pos = np.arange(t)
    q = R.rope(qkv[:, : HQ * HD].reshape(t, HQ, HD), pos, BASE, neox=True)
    k = R.rope(qkv[:, HQ * HD : (HQ + HKV) * HD].reshape(t, HKV, HD), pos, BASE, neox=True)
    v = qkv[:, (HQ + HKV) * HD :].reshape(t, HKV, HD)
    k, v = k.astype(np.float16), v.astype(np.float16)  # the cache is float16
    x = x + mm(R.attention(q, k, v, pos, HD ** -0.5).reshape(t, -1), "o")
    h = R.rmsnorm(x, norms["ffn"], EPS)
    x = x + mm(R.swiglu(mm(h, "gate"), mm(h, "up")), "down")
    return mm(R.rmsnorm(x, norms["out"], EPS), "emb")


def _planes(w):
    return {f"w_{p}": a for p, a in w.planes().items()}


class Chain:
    """Runs the kernels in the order a CUDA backend would, on persistent buffers."""

    def __init__(self, w, norms, bias):
        self.w, self.norms, self.bias = w, norms, bias
        self.k_cache = np.full(N_SLOTS * N_CTX * HKV * HD, np.nan, np.float16)  # (slots, ctx, Hkv, D)
        self.v_cache = np.full_like(self.k_cache, np.nan)

    def _matmul(self, name, x, qtype_kernel, n):
        t, k = x.shape
        y = np.full((t, n), np.nan, np.float32)
        w = self.w[name]
        arrays = _planes(w) | {"x": x, "y": y}
        if qtype_kernel == "gemm":
            return run_spec(f"gemm_{w.qtype.lower()}", arrays, {"M": t, "N": n, "K": k})["y"]
        return run_spec(f"matvec_{w.qtype.lower()}_b1", arrays, {"N": n, "K": k, "B": t})["y"]

    def _rmsnorm(self, x, norm):
        arrays = {"x": x, "weight": self.norms[norm], "y": np.full_like(x, np.nan)}
        return run_spec("rmsnorm_f32", arrays, {"M": len(x), "D": DM, "eps": EPS})["y"]

    def _attention_inputs(self, x, pos, mm):
        t = len(pos)
        qkv = self._matmul("qkv", self._rmsnorm(x, "attn"), mm, NQKV)
        qkv = run_spec("add_bias_f32", {"x": qkv, "bias": self.bias}, {"n": qkv.size, "N": NQKV},
                       aliases={"out": "x"})["x"]
        flat = qkv.reshape(-1)
        rope = {"stride_x": NQKV, "head_dim": HD, "n_rot": HD, "mscale": 1.0, "T": t}
        freqs = BASE ** (-np.arange(0, HD, 2, dtype=np.float64) / HD)
        q = run_spec(f"rope_neox_d{HD}", {"x": flat, "pos": pos, "freqs": freqs,
                                          "y": np.full((t, HQ * HD), np.nan, np.float32)},
                     rope | {"stride_y": HQ * HD, "H": HQ})["y"]
        k = run_spec(f"rope_neox_d{HD}", {"x": flat[HQ * HD :], "pos": pos, "freqs": freqs,
                                          "y": np.full((t, HKV * HD), np.nan, np.float32)},
                     rope | {"stride_y": HKV * HD, "H": HKV})["y"]
        rows = (SLOT * N_CTX + pos).astype(np.int32)
        store = {"W": HKV * HD, "T": t}
        run_spec("store_rows_f16", {"src": k, "dst": self.k_cache, "rows": rows},
                 store | {"src_stride": HKV * HD})
        run_spec("store_rows_f16", {"src": flat[(HQ + HKV) * HD :], "dst": self.v_cache, "rows": rows},
                 store | {"src_stride": NQKV})
        return q

    def _finish(self, x, attn, mm):
        o = self._matmul("o", attn, mm, DM)
        x = run_spec("add_f32", {"a": x, "b": o}, {"n": x.size}, aliases={"out": "a"})["a"]
        h = self._rmsnorm(x, "ffn")
        gate, up = self._matmul("gate", h, mm, FFN), self._matmul("up", h, mm, FFN)
        act = run_spec("swiglu_f32", {"gate": gate, "up": up, "out": np.full_like(gate, np.nan)},
                       {"n": gate.size})["out"]
        x = run_spec("add_f32", {"a": x, "b": self._matmul("down", act, mm, DM)}, {"n": x.size},
                     aliases={"out": "a"})["a"]
        return self._matmul("emb", self._rmsnorm(x, "out"), mm, VOCAB)

    def _embed(self, ids):
        out = np.full((len(ids), DM), np.nan, np.float32)
        return run_spec("embedding_q8_0", _planes(self.w["emb"]) | {"ids": ids, "out": out},
                        {"K": DM, "T": len(ids)})["out"]

    def prefill(self, ids):
        t = len(ids)
        x = self._embed(ids)
        q = self._attention_inputs(x, np.arange(t, dtype=np.int32), "gemm")
        slot_off = SLOT * N_CTX * HKV * HD
        attn = run_spec(f"attn_prefill_d{HD}", {"q": q, "k_cache": self.k_cache[slot_off:],
                                                "v_cache": self.v_cache[slot_off:],
                                                "out": np.full((t, HQ * HD), np.nan, np.float32)},
                        {"T": t, "start": 0, "Hq": HQ, "Hkv": HKV, "scale": HD ** -0.5,
                         "window": 0})["out"]
        return self._finish(x, attn, "gemm")

    def decode(self, token, pos):
        x = self._embed(np.array([token], np.int32))
        q = self._attention_inputs(x, np.array([pos], np.int32), "matvec")
        sizes = {"B": 1, "S": 1, "n_ctx": N_CTX, "chunk": 64, "Hq": HQ, "Hkv": HKV, "scale": HD ** -0.5,
                 "window": 0}
        parts = run_spec(f"attn_decode_d{HD}", {
            "q": q, "k_cache": self.k_cache, "v_cache": self.v_cache,
            "part_out": np.full((1, HQ, 1, HD), np.nan, np.float32),
            "part_ml": np.full((1, HQ, 1, 2), np.nan, np.float32),
            "slots": np.array([SLOT], np.int32), "lens": np.array([pos + 1], np.int32)}, sizes)
        combine = {"part_out": parts["part_out"], "part_ml": parts["part_ml"],
                   "out": np.full((1, HQ * HD), np.nan, np.float32)}
        attn = run_spec(f"attn_combine_d{HD}", combine, sizes)["out"]
        return self._finish(x, attn, "matvec")


def test_prefill_then_decode_matches_numpy(rng):
    w, norms, bias = _weights(rng)
    ids = rng.integers(0, VOCAB, 6).astype(np.int32)
    want = _reference(w, norms, bias, ids)  # (6, VOCAB)
    want_f16 = _reference(w, norms, bias, ids[:5], f16_gemm=True)
    chain = Chain(w, norms, bias)
    got_prefill = chain.prefill(ids[:5])
    got_decode = chain.decode(int(ids[5]), pos=5)
    top = np.abs(want).max()
    np.testing.assert_allclose(got_prefill, want_f16, atol=1e-2 * top, rtol=0)
    np.testing.assert_allclose(got_decode, want[5:], atol=2e-2 * top, rtol=0)
    # untouched cache rows (the other slot, positions past the sequence) keep their NaN poison
    k = chain.k_cache.reshape(N_SLOTS, N_CTX, HKV, HD)
    assert np.isnan(k[0]).all() and np.isnan(k[SLOT, 6:]).all() and not np.isnan(k[SLOT, :6]).any()
    best = run_spec("argmax_f32", {"logits": got_decode, "out": np.full(1, -1, np.int32)},
                    {"B": 1, "V": VOCAB})["out"]
    assert best[0] == np.argmax(got_decode[0])
