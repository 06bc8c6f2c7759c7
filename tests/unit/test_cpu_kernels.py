"""cpu_kernels.qmatmul against a float64 reference product, on every path.

Error bound: qmatmul is exact float arithmetic on the dequantized weights with float32
accumulation (it does not round the activations).  Summing k products in float32 errs by at
most ~k * 2**-24 * sum|x||w| (k = 512 here: 3e-5), typically sqrt(k) * 2**-24 (1.4e-6); we
require |y - ref| <= 1e-5 * (|x| @ |W|.T) for each output, which any decoding slip (a wrong
nibble, scale or offset moves a result by ~1e-2 of that norm) exceeds by orders of magnitude.
The reference dequantizes with gguf-py, independently of ukgpu's own `quants`.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from ukgpu.llama_core.cpu import matmul as ck
from ukgpu.llama_core.errors import QuantError

REL = 1e-5
ALL_TYPES = [T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
N_IN = 512


def reference(x: np.ndarray, qtype: T, raw: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """(x @ W.T, |x| @ |W|.T) in float64, W dequantized by gguf-py."""
    w = gguf_dequantize(raw.reshape(shape[0], -1), qtype).astype(np.float64).reshape(shape)
    x64 = x.astype(np.float64)
    return x64 @ w.T, np.abs(x64) @ np.abs(w).T


def check(y: np.ndarray, ref: np.ndarray, norm: np.ndarray, what: str) -> None:
    assert y.dtype == np.float32 and y.shape == ref.shape, what
    err = np.abs(y - ref) / np.maximum(norm, 1e-30)
    assert err.max() <= REL, f"{what}: max error {err.max():.2e} of |x||w| (bound {REL})"


@pytest.fixture(scope="module")
def blocks():
    """qtype -> (raw uint8[out, row_bytes], shape) with out = 37 (not a multiple of any tile)."""
    rng = np.random.default_rng(7)
    return {q: (ck.random_blocks(q, 37, N_IN, rng), (37, N_IN)) for q in ALL_TYPES}


@pytest.mark.filterwarnings("ignore:qmatmul. no fast kernel")
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n", [1, 3, 6, 16, 33])  # block kernel, chunks (4+2, 4x4), slabs
def test_every_type_every_path(blocks, qtype, n):
    raw, shape = blocks[qtype]
    x = np.random.default_rng(n).standard_normal((n, N_IN)).astype(np.float32)
    ref, norm = reference(x, qtype, raw, shape)
    view = ck.RawWeight(qtype, shape, raw)
    for label, w, use_numba in [("raw/numba", view, None), ("prepared/numba", ck.prepare(view), None),
                                ("raw/numpy", view, False), ("prepared/numpy", ck.prepare(view), False)]:
        check(ck.qmatmul(x, w, use_numba=use_numba), ref, norm, f"{qtype.name} n={n} {label}")


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("n_out", [2, 17, 70])
def test_repack_is_a_same_size_permutation(qtype, n_out):
    rng = np.random.default_rng(n_out)
    n_in = 96 * 32 if n_out == 17 else 576  # different tile heights
    raw = ck.random_blocks(qtype, n_out, n_in, rng)
    pw = ck.prepare(ck.RawWeight(qtype, (n_out, n_in), raw))
    assert pw.tiles is not None and pw.nbytes == raw.nbytes
    assert not np.array_equal(pw.tiles.data, raw.reshape(-1))  # really permuted
    from ukgpu.llama_core.cpu.tiled import unpack_rows

    for r0, r1 in [(0, n_out), (1, n_out - 1), (n_out - 1, n_out), (0, 1)]:
        np.testing.assert_array_equal(unpack_rows(pw.tiles, r0, r1), raw[r0:r1])
    x = rng.standard_normal((2, n_in)).astype(np.float32)
    ref, norm = reference(x, qtype, raw, (n_out, n_in))
    check(ck.qmatmul(x, pw), ref, norm, f"{qtype.name} {n_out}x{n_in} prepared")


def test_vector_input_gives_vector_output(blocks):
    raw, shape = blocks[T.Q4_K]
    x = np.random.default_rng(0).standard_normal(N_IN).astype(np.float32)
    y = ck.qmatmul(x, ck.RawWeight(T.Q4_K, shape, raw))
    ref, norm = reference(x[None], T.Q4_K, raw, shape)
    assert y.shape == (shape[0],)
    check(y[None], ref, norm, "1-D x")


def test_non_contiguous_float64_input_is_accepted(blocks):
    raw, shape = blocks[T.Q8_0]
    x = np.random.default_rng(1).standard_normal((N_IN, 4)).T  # float64, F-ordered
    ref, norm = reference(x, T.Q8_0, raw, shape)
    check(ck.qmatmul(x, ck.RawWeight(T.Q8_0, shape, raw)), ref, norm, "strided float64 x")


def test_shape_mismatch_is_a_typed_error(blocks):
    raw, shape = blocks[T.Q4_1]
    with pytest.raises(QuantError, match=r"pass \[n, 512\]"):
        ck.qmatmul(np.zeros((2, 256), np.float32), ck.RawWeight(T.Q4_1, shape, raw))
    with pytest.raises(QuantError, match="2-D weight"):
        ck.qmatmul(np.zeros((2, 512), np.float32), ck.RawWeight(T.Q4_1, (37, 512, 1), raw))


def test_type_without_kernel_warns_once(blocks, monkeypatch):
    monkeypatch.setattr(ck, "_warned", set())
    raw, shape = blocks[T.Q3_K]
    x = np.ones((1, N_IN), np.float32)
    with pytest.warns(RuntimeWarning, match="no fast kernel for Q3_K"):
        ck.qmatmul(x, ck.RawWeight(T.Q3_K, shape, raw))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.qmatmul(x, ck.RawWeight(T.Q3_K, shape, raw))  # second call: silent


def test_env_var_forces_the_numpy_path(blocks, monkeypatch):
    assert ck.numba_enabled()  # numba is a dependency: the fast path must be live here
    monkeypatch.setenv("UKGPU_NO_NUMBA", "1")
    assert not ck.numba_enabled()
    calls = []
    monkeypatch.setattr(ck, "_numba_matmul", lambda *a: calls.append(a))
    raw, shape = blocks[T.Q5_0]
    x = np.random.default_rng(2).standard_normal((3, N_IN)).astype(np.float32)
    ref, norm = reference(x, T.Q5_0, raw, shape)
    check(ck.qmatmul(x, ck.RawWeight(T.Q5_0, shape, raw)), ref, norm, "UKGPU_NO_NUMBA=1")
    assert not calls
    assert ck.prepare(ck.RawWeight(T.Q5_0, shape, raw)).tiles is None  # no repack without numba


def test_warmup_runs_every_kernel():
    assert ck.warmup() >= 0.0


# --- real tensors ------------------------------------------------------------------------

def _real_cases(path, wanted: dict[str, str]):
    from ukgpu.llama_core.gguf.file import open_gguf

    g = open_gguf(path)
    for qname, tname in wanted.items():
        v = g.tensors[tname]
        assert T(v.qtype).name == qname, f"{tname} is {T(v.qtype).name}, expected {qname}"
        yield qname, tname, v


def _check_real(v, tname, max_rows=1500):
    """qmatmul on (the first max_rows rows of) a real tensor, raw and prepared, n = 1 and 9."""
    n_out, n_in = v.shape
    rows = min(n_out, max_rows)
    raw = np.asarray(v.data).reshape(n_out, -1)[:rows]
    view = ck.RawWeight(T(v.qtype), (rows, n_in), raw)
    for n in (1, 9):
        x = np.random.default_rng(n).standard_normal((n, n_in)).astype(np.float32)
        ref, norm = reference(x, T(v.qtype), raw, (rows, n_in))
        for label, w in (("raw", view), ("prepared", ck.prepare(view))):
            check(ck.qmatmul(x, w), ref, norm, f"{tname} n={n} {label}")


def test_real_smollm2_tensors(smollm2_path):
    for _, tname, v in _real_cases(smollm2_path, {"Q4_1": "blk.0.ffn_up.weight",
                                                  "Q8_0": "token_embd.weight"}):
        _check_real(v, tname)


def test_real_qwen05_tensors(qwen05_path):
    from ukgpu.llama_core.gguf.file import open_gguf

    g = open_gguf(qwen05_path)
    by_type = {}
    for name, v in g.tensors.items():
        if len(v.shape) == 2 and T(v.qtype).name in ("Q4_K", "Q5_0", "Q6_K", "Q8_0"):
            by_type.setdefault(T(v.qtype).name, (name, v))
    assert set(by_type) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    for tname, v in by_type.values():
        _check_real(v, tname)


def test_missing_numba_falls_back_to_numpy(blocks, monkeypatch):
    """As in a minimal image without numba: the kernel modules fail to import."""
    monkeypatch.setattr(ck, "_KERNELS", None)  # what _kernels() records after an ImportError
    assert not ck.numba_enabled()
    raw, shape = blocks[T.Q4_K]
    x = np.random.default_rng(3).standard_normal((2, N_IN)).astype(np.float32)
    ref, norm = reference(x, T.Q4_K, raw, shape)
    check(ck.qmatmul(x, ck.RawWeight(T.Q4_K, shape, raw)), ref, norm, "no numba")
    assert ck.warmup() == 0.0
