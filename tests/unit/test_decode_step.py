"""The CPU backend's compiled decode step (`llama_core/cpu/decode_step.py`) against the generic
forward pass it replaces: the same logits and the same KV cache entries, token after token, on
every family it takes; the generic path where it does not fit."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.cpu.decode_step import DecodePlan
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.gguf.synthetic import build_synthetic
from ukgpu.llama_core.model import ContextOverflowError, Model

FUSED_FAMILIES = ["syn-llama3", "syn-llama-yarn", "syn-mistral", "syn-qwen3", "syn-phi3"]
REL_TOL = 1e-5  # same kernels and order; only exp()'s last bit may differ (numba's vs numpy's)


def _compare(model: Model, prompt: np.ndarray, steps: int) -> None:
    """Decode `steps` tokens through the plan and through `Model.forward` side by side."""
    be = model.backend
    assert be._plan(model) is not None
    fused, generic = model.new_kv(len(prompt) + steps + 4), model.new_kv(len(prompt) + steps + 4)
    logits = model.forward(prompt, 0, generic, all_logits=False)
    model.forward(prompt, 0, fused, all_logits=False)
    token = int(np.argmax(logits[-1]))
    for pos in range(len(prompt), len(prompt) + steps):
        want = model.forward(np.array([token]), pos, generic, all_logits=False)
        got = be.decode(model, token, pos, fused)
        assert got.shape == want.shape and got.dtype == np.float32
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= REL_TOL, f"position {pos}: relative error {err:.2e}"
        token = int(np.argmax(want[-1]))
    end = len(prompt) + steps
    for cache_f, cache_g in ((fused.k, generic.k), (fused.v, generic.v)):
        np.testing.assert_allclose(cache_f[:, :, :end], cache_g[:, :, :end], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FUSED_FAMILIES)
def test_step_matches_the_generic_forward(name: str):
    model = Model(open_gguf(build_synthetic(name)), CpuBackend())
    _compare(model, np.arange(3, 20), 12)


def test_step_on_smollm2(smollm2):
    """Q4_1 (tiled) matrices and a Q8_0 output, 30 layers."""
    _compare(Model(smollm2, CpuBackend()), np.array([1, 504, 3458, 282, 4290, 314]), 6)


def test_step_on_qwen05(qwen05):
    """q/k/v biases; Q5_0, Q8_0 (tiled), Q4_K and Q6_K (raw rows) matrices."""
    _compare(Model(qwen05, CpuBackend()), np.array([151644, 872, 198, 3838, 374, 220]), 4)


def test_gemma3_keeps_the_generic_path():
    model = Model(open_gguf(build_synthetic("syn-gemma3")), CpuBackend())
    assert "block" in DecodePlan.why_not(model, model.backend)
    assert model.backend._plan(model) is None
    kv = model.new_kv(8)
    np.testing.assert_array_equal(model.backend.decode(model, 5, 0, kv),
                                  model.forward(np.array([5]), 0, model.new_kv(8), all_logits=False))


def test_float64_backend_keeps_the_generic_path():
    model = Model(open_gguf(build_synthetic("syn-llama3")), CpuBackend(dtype=np.float64))
    assert model.backend._plan(model) is None
    assert model.backend.decode(model, 5, 0, model.new_kv(8)).dtype == np.float64


def test_switch_off_with_the_environment(monkeypatch):
    monkeypatch.setenv("UKGPU_CPU_FUSED_DECODE", "0")
    model = Model(open_gguf(build_synthetic("syn-llama3")), CpuBackend())
    assert model.backend._plan(model) is None


def test_position_past_the_cache_is_refused_and_writes_nothing():
    model = Model(open_gguf(build_synthetic("syn-llama3")), CpuBackend())
    kv = model.new_kv(4)
    before = kv.k.copy()
    with pytest.raises(ContextOverflowError, match="past a 4-token KV cache"):
        model.backend.decode(model, 5, 4, kv)
    np.testing.assert_array_equal(kv.k, before)


def test_a_backend_subclass_that_changes_an_op_keeps_the_generic_path():
    class Counting(CpuBackend):
        def matmul(self, x, weight, bias=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().matmul(x, weight, bias)

    model = Model(open_gguf(build_synthetic("syn-llama3")), Counting())
    model.backend.decode(model, 5, 0, model.new_kv(8))
    assert model.backend._plan(model) is None and model.backend.calls > 0


def _batch_matches(model: Model, prompts: list[np.ndarray], steps: int) -> None:
    """B sequences at different positions: the compiled batch step against `Model.forward_batch`
    (the generic path) on twin caches, step after step."""
    be = model.backend
    n_ctx = max(len(p) for p in prompts) + steps + 2
    fused = [model.new_kv(n_ctx) for _ in prompts]
    generic = [model.new_kv(n_ctx) for _ in prompts]
    tokens = []
    for p, kf, kg in zip(prompts, fused, generic):
        model.forward(p, 0, kf, all_logits=False)
        tokens.append(int(np.argmax(model.forward(p, 0, kg, all_logits=False)[-1])))
    positions = [len(p) for p in prompts]
    for _ in range(steps):
        want = model.forward_batch(np.array(tokens), positions, generic)
        got = be.decode_batch(model, np.array(tokens), positions, fused)
        assert got.shape == want.shape == (len(prompts), model.config.vocab_size)
        err = (np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)).max()
        assert err <= REL_TOL, f"positions {positions}: relative error {err:.2e}"
        tokens = [int(t) for t in want.argmax(axis=1)]
        positions = [p + 1 for p in positions]
    for kf, kg, end in zip(fused, generic, positions):
        np.testing.assert_allclose(kf.k[:, :, :end], kg.k[:, :, :end], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(kf.v[:, :, :end], kg.v[:, :, :end], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["syn-qwen3", "syn-phi3"])
def test_batch_step_matches_the_generic_batch(name: str):
    model = Model(open_gguf(build_synthetic(name)), CpuBackend())
    _batch_matches(model, [np.arange(3, 20), np.arange(40, 45), np.arange(7, 16)], 5)


def test_batch_step_on_qwen05(qwen05):
    model = Model(qwen05, CpuBackend())
    _batch_matches(model, [np.array([151644, 872, 198, 3838]), np.array([9707, 11, 1879, 0, 525, 220])], 3)


def test_batch_with_caches_of_different_sizes_is_refused_as_before():
    model = Model(open_gguf(build_synthetic("syn-llama3")), CpuBackend())
    with pytest.raises(ValueError, match="one n_ctx"):
        model.backend.decode_batch(model, np.array([5, 6]), [0, 0], [model.new_kv(8), model.new_kv(16)])


def _q8_compare(model: Model, prompt: np.ndarray, steps: int, bit_equal_share: float) -> None:
    """The q8 step against the generic q8 forward, each position from the same cache (a copy):
    the same integer products and compiled loops, so equal to the bit but where a float op's last
    bit (numba's against numpy's) flips one 8-bit code; in a block holding one of the real
    models' outlier activations such a flip moves the logits by a percent or two (llama.cpp's own
    paths part by as much), so: the argmax always, the bits at `bit_equal_share` of positions."""
    be = model.backend
    assert be.activations == "q8" and be._plan(model) is not None
    n_ctx = len(prompt) + steps + 4
    generic = model.new_kv(n_ctx)
    logits = model.forward(prompt, 0, generic, all_logits=False)
    token, errs = int(np.argmax(logits[-1])), []
    for pos in range(len(prompt), len(prompt) + steps):
        trial = model.new_kv(n_ctx)
        be.copy_kv(generic, trial, pos)
        want = model.forward(np.array([token]), pos, generic, all_logits=False)
        got = be.decode(model, token, pos, trial)
        errs.append(float(np.abs(got - want).max() / np.abs(want).max()))
        assert int(np.argmax(got)) == int(np.argmax(want)), f"position {pos}"
        token = int(np.argmax(want[-1]))
    assert max(errs) <= 0.05 and sum(e <= REL_TOL for e in errs) >= bit_equal_share * len(errs), errs


def test_q8_step_matches_the_generic_q8_forward(smollm2, qwen05):
    """Q4_1, Q5_0, Q8_0, Q4_K and Q6_K matrices between them, on integer products."""
    _q8_compare(Model(smollm2, CpuBackend(activations="q8")), np.array([1, 504, 3458, 282, 4290, 314]), 8, 0.0)
    _q8_compare(Model(qwen05, CpuBackend(activations="q8")), np.array([151644, 872, 198, 3838, 374, 220]), 4, 0.0)


def test_q8_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("UKGPU_CPU_ACTIVATIONS", "q8")
    model = Model(open_gguf(build_synthetic("syn-qwen3")), CpuBackend())
    _q8_compare(model, np.arange(3, 12), 6, 0.5)  # small random weights: no outliers, flips are rare
