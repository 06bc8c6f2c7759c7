"""Live sequences share a prompt prefix: the n choices of one request prefill it once.

`Engine._share_prefix` copies the keys and values of the longest prefix another live sequence
holds (`Backend.copy_kv`) before a prefill; the choices then generate exactly what they would
have from their own prefill, on the CPU and on the CUDA backend (fake driver)."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.select import create_backend
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.sampling import SamplingParams

from fakes.cuda_driver import FakeDriver
from fakes.tiny_models import SHAPES, write_model

PROMPT = [3, 17, 99, 250, 4, 511, 0, 42, 77, 300, 12, 13]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    name = sorted(SHAPES)[0]
    return open_gguf(write_model(tmp_path_factory.mktemp("share") / f"{name}.gguf", SHAPES[name]))


def engine_on(gguf, kind: str, n_slots: int) -> Engine:
    if kind == "cpu":
        return Engine.load(gguf, backend=CpuBackend(), n_ctx=64, n_slots=n_slots)
    be = create_backend(gguf=gguf, driver=FakeDriver(), arena_bytes=64 << 20, n_ctx=64, n_slots=n_slots)
    return Engine.load(gguf, backend=be, n_ctx=64, n_slots=n_slots)


def generate_together(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], n: int):
    seqs = [engine.start(p, q, n) for p, q in zip(prompts, params)]
    while any(s.finish_reason is None for s in seqs):
        for result in engine.step_all(seqs):
            assert not isinstance(result, Exception), result
    for s in seqs:
        engine.release(s)
    return seqs


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_choices_of_one_prompt_prefill_it_once_and_generate_as_alone(gguf, kind):
    params = [SamplingParams(temperature=0.9, seed=7 + i) for i in range(3)]
    shared = generate_together(engine_on(gguf, kind, 3), [PROMPT] * 3, params, 6)
    assert [s.stats.cached_tokens for s in shared] == [0, len(PROMPT) - 1, len(PROMPT) - 1]
    for seq, p in zip(shared, params):  # each as the only sequence of a fresh engine
        alone = generate_together(engine_on(gguf, kind, 1), [PROMPT], [p], 6)[0]
        assert seq.generated == alone.generated


def test_a_longer_common_prefix_is_copied_and_a_different_prompt_is_not(gguf):
    engine = engine_on(gguf, "cpu", 3)
    greedy = SamplingParams(temperature=0)
    other = [5, 6, 7, 8]
    branch = PROMPT[:8] + [1, 2]
    seqs = generate_together(engine, [PROMPT, other, branch], [greedy] * 3, 3)
    assert [s.stats.cached_tokens for s in seqs] == [0, 0, 8]
    fresh = generate_together(engine_on(gguf, "cpu", 1), [branch], [greedy], 3)[0]
    assert seqs[2].generated == fresh.generated


def test_copy_kv_copies_exactly_the_first_rows(gguf):
    be = CpuBackend()
    a, b = be.alloc_kv(2, 16, 2, 8), be.alloc_kv(2, 16, 2, 8)
    a.k[:] = np.random.default_rng(0).standard_normal(a.k.shape)
    a.v[:] = -a.k
    be.copy_kv(a, b, 5)
    assert np.array_equal(b.k[:, :, :5], a.k[:, :, :5]) and not b.k[:, :, 5:].any()
    assert np.array_equal(b.v[:, :, :5], a.v[:, :, :5]) and not b.v[:, :, 5:].any()
