"""The 8-bit activation products (`cpu.int8_act`, `cpu.int8_dot`) against numpy written from
llama.cpp's rules: the rounding of each activation format, and each weight format's product.

The numpy reference here rounds the activations itself (it does not call `int8_act.quantize`)
and multiplies in float64 with the weights dequantized by `gguf.quants`, so a wrong code, scale,
nibble order or fifth/sixth bit in the integer kernels shows as a mismatch far above float32
rounding (~1e-6 of the output's range).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ukgpu.llama_core.cpu import int8_act, matmul
from ukgpu.llama_core.gguf import quants

TYPES = list(int8_act.KINDS)


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


def ref_q8_32(x: np.ndarray, with_s: bool):
    """llama.cpp's AVX2 Q8_0 / Q8_1 rounding of one row: (codes, d per block, s per block)."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    codes = np.rint(blocks * inv[:, None]).astype(np.int64)
    d = (amax / np.float32(127.0)).astype(np.float32)
    s = f16(d * codes.sum(axis=1).astype(np.float32)) if with_s else None
    return codes, f16(d), s


def ref_q8_k(x: np.ndarray):
    """llama.cpp's Q8_K rounding: by the value of largest magnitude, its sign kept."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    m = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    iscale = (np.float32(-127.0) / m).astype(np.float32)
    codes = np.minimum(127, np.rint(blocks * iscale[:, None])).astype(np.int64)
    return codes, (np.float32(1.0) / iscale).astype(np.float64)


def ref_product(qtype: T, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y[out] = W . round8(x) in float64, with the per-block terms llama.cpp adds (m * s)."""
    n_out, n_in = rows.shape[0], x.shape[0]
    W = quants.dequantize(rows.reshape(-1), qtype, n_out * n_in).reshape(n_out, n_in).astype(np.float64)
    act = int8_act.ACT[int8_act.KINDS[qtype]]
    if act == int8_act.ACT_Q8_K:
        codes, d = ref_q8_k(x)
        return W @ (codes * d[:, None]).reshape(-1)
    codes, d, s = ref_q8_32(x, act == int8_act.ACT_Q8_1)
    y = W @ (codes * d[:, None]).reshape(-1)
    if s is not None:  # W = d_w q + m: the m term takes llama.cpp's rounded s, not d * sum(codes)
        bpb = rows.shape[1] // (n_in // 32)
        m = f16(rows.reshape(n_out, -1, bpb)[:, :, 2:4].copy().view(np.float16)[..., 0])  # [out, blocks]
        y += m @ (s - d * codes.sum(axis=1))
    return y


def product(qtype: T, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], rows.shape[0]), np.float32)
    int8_act.mv_int8(int8_act.KINDS[qtype], rows.reshape(-1), rows.shape[0], rows.shape[1], x, y)
    return y


def activations(rng, n: int, n_in: int) -> np.ndarray:
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    x[:, :32] = 0.0  # an all-zero block: d = 0, codes 0
    x[-1, 40] = 300.0  # one large value (a block whose other codes round to small ones)
    return x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n", [1, 3])
def test_product_matches_llamacpp_rules(qtype, n):
    rng = np.random.default_rng(int(qtype) * 10 + n)
    n_out, n_in = 37, 512
    rows = np.asarray(matmul.random_blocks(qtype, n_out, n_in, rng)).reshape(n_out, -1)
    x = activations(rng, n, n_in)
    y = product(qtype, rows, x)
    for t in range(n):
        ref = ref_product(qtype, rows, x[t])
        assert np.abs(y[t] - ref).max() <= 2e-6 * np.abs(ref).max(), (qtype.name, t)


@pytest.mark.parametrize("act", [int8_act.ACT_Q8_0, int8_act.ACT_Q8_1, int8_act.ACT_Q8_K])
def test_activation_codes_and_scales(act):
    rng = np.random.default_rng(act)
    x = activations(rng, 2, 512)
    x[0, 256:512] *= -1.0  # the largest magnitude negative in one Q8_K block
    aq, af, nf = int8_act.quantize(x, act)
    for t in range(2):
        codes = aq[t * 512:(t + 1) * 512].astype(np.int64)
        fl = af[t * nf:(t + 1) * nf].astype(np.float64)
        if act == int8_act.ACT_Q8_K:
            want, d = ref_q8_k(x[t])
            got = fl.reshape(-1, 17)
            assert np.array_equal(got[:, 1:], want.reshape(-1, 16, 16).sum(axis=2))  # the sums of 16
            assert np.array_equal(got[:, 0], d)
        else:
            want, d, s = ref_q8_32(x[t], act == int8_act.ACT_Q8_1)
            got = fl.reshape(-1, 2 if s is not None else 9)
            assert np.array_equal(got[:, 0], d)
            if s is not None:
                assert np.array_equal(got[:, 1], s)
            else:  # 16 times the sums of codes 4k..4k+3
                assert np.array_equal(got[:, 1:], 16 * want.reshape(-1, 8, 4).sum(axis=2))
        assert np.array_equal(codes, want.reshape(-1))


def test_rounding_moves_the_product_as_much_as_llamacpps_does():
    """The integer product is not the exact one: it differs by the activations' 8-bit rounding
    (a few tenths of a percent of the output range), which is what the mode is for."""
    rng = np.random.default_rng(7)
    rows = np.asarray(matmul.random_blocks(T.Q4_1, 64, 1024, rng)).reshape(64, -1)
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    exact = matmul.qmatmul(x, matmul.prepare(matmul.RawWeight(T.Q4_1, (64, 1024), rows.reshape(-1)), repack=False))
    rel = np.abs(product(T.Q4_1, rows, x) - exact).max() / np.abs(exact).max()
    assert 1e-4 < rel < 3e-2


_GENERIC_RUN = """
import sys, numpy as np
from ukgpu.llama_core.cpu import int8_act, int8_ir
assert not int8_ir.HAS_AVX2
data = np.load(sys.argv[1])
out = {}
for name, kind in ((q.name, k) for q, k in int8_act.KINDS.items()):
    rows, x = data[name + "_rows"], data[name + "_x"]
    y = np.empty((x.shape[0], rows.shape[0]), np.float32)
    int8_act.mv_int8(kind, rows.reshape(-1), rows.shape[0], rows.shape[1], x, y)
    out[name] = y
np.savez(sys.argv[2], **out)
"""


def test_the_plain_ir_for_cpus_without_avx2_gives_the_same_bits(tmp_path):
    """NUMBA_CPU_NAME=ivybridge (AVX and F16C, no AVX2): the products are built from plain vector IR
    instead of the AVX2 intrinsics, in a fresh interpreter and cache: the same bits for the
    32-element formats; the K formats' 4-lane minimum sums may round their last bit otherwise
    (a CPU without FMA: `llvm.fma` becomes a library call)."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(11)
    data, want = {}, {}
    for qtype in TYPES:
        rows = np.asarray(matmul.random_blocks(qtype, 9, 512, rng)).reshape(9, -1)
        x = activations(rng, 2, 512)
        data[qtype.name + "_rows"], data[qtype.name + "_x"] = rows, x
        want[qtype.name] = product(qtype, rows, x)
    np.savez(tmp_path / "in.npz", **data)
    env = dict(os.environ, NUMBA_CPU_NAME="ivybridge", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", _GENERIC_RUN, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   check=True, env=env, timeout=600)
    got = np.load(tmp_path / "out.npz")
    for qtype in TYPES:
        g, w = got[qtype.name], want[qtype.name]
        if qtype in (T.Q4_K, T.Q6_K):
            assert np.abs(g - w).max() <= 1e-6 * np.abs(w).max(), qtype.name
        else:
            assert np.array_equal(g, w), qtype.name
