"""The CPU backend without numba (a minimal VM image may lack it) computes what it computes with it."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.llama_core.cpu import backend as cpu_backend
from ukgpu.llama_core.model import Model


@pytest.mark.parametrize("neox", [False, True])
def test_numpy_rope_equals_the_compiled_loop(neox):
    ops = cpu_backend._numba_ops()
    assert ops is not None, "numba is part of the test environment"
    rng = np.random.default_rng(0)
    n, heads, hd, start = 5, 3, 16, 7
    cos, sin = rng.standard_normal((2, 32, hd // 2)).astype(np.float32)
    x = rng.standard_normal((n, heads * hd)).astype(np.float32)
    want, got = x.copy(), x.copy()
    ops.rope_rows(want, heads, start, cos, sin, hd, neox)
    cpu_backend._rope_rows_numpy(got, heads, start, cos, sin, hd, neox)
    assert not np.array_equal(want, x)  # it did rotate
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_whole_model_without_numba_matches(smollm2, monkeypatch):
    prompt = np.array([1, 504, 3458, 282, 4649, 314], dtype=np.int64)

    def run() -> np.ndarray:
        model = Model(smollm2, cpu_backend.CpuBackend())
        kv = model.new_kv(16)
        prefill = model.forward(prompt, 0, kv)  # [n, vocab]
        step = model.forward(np.array([int(prefill[-1].argmax())]), len(prompt), kv)
        return np.concatenate([prefill, step])

    with_numba = run()
    monkeypatch.setenv("UKGPU_NO_NUMBA", "1")
    assert cpu_backend._numba_ops() is None
    without = run()
    scale = np.abs(with_numba).max()
    assert np.abs(without - with_numba).max() / scale < 1e-4
    assert (without.argmax(-1) == with_numba.argmax(-1)).all()
