"""Batched decode: several sequences' next tokens from one forward pass (CPU backend), with
exactly what each sequence gets alone; failures stay with the sequences they belong to."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.sampling import SamplingParams

PROMPTS = [[1, 504, 3458, 314], [1, 2000, 31], [1, 7, 8, 9, 10, 11], [1, 99], [1, 42, 43]]


@pytest.fixture(scope="module")
def model(smollm2):
    return Model(smollm2, CpuBackend())


def _prefilled(model, prompts, n_ctx=64):
    kvs = [model.new_kv(n_ctx) for _ in prompts]
    for p, kv in zip(prompts, kvs):
        model.forward(np.array(p), 0, kv, all_logits=False)
    return kvs


def test_forward_batch_gives_each_row_what_forward_gives_alone(model):
    prompts = PROMPTS[:4]
    alone, together = _prefilled(model, prompts), _prefilled(model, prompts)
    tokens, pos = [5, 6, 7, 8], [len(p) for p in prompts]
    want = np.concatenate([model.forward(np.array([t]), q, kv, all_logits=False)
                           for t, q, kv in zip(tokens, pos, alone)])
    got = model.forward_batch(np.array(tokens), pos, together)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()
    for a, b, q in zip(alone, together, pos):  # the new keys/values landed at each position
        np.testing.assert_allclose(b.k[:, :, :q + 1], a.k[:, :, :q + 1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.v[:, :, :q + 1], a.v[:, :, :q + 1], rtol=1e-5, atol=1e-6)


def test_forward_batch_refuses_mismatched_or_oversized_batches(model):
    kvs = _prefilled(model, PROMPTS)
    with pytest.raises(ValueError, match="equal counts of at most 4"):
        model.forward_batch(np.array([5, 6]), [4], kvs[:2])
    with pytest.raises(ValueError, match="at most 4"):
        model.forward_batch(np.arange(5), [len(p) for p in PROMPTS], kvs)


def _run_alone(model, params, max_tokens=8):
    out = []
    for p in PROMPTS:
        eng = Engine(model, _tokenizer(model), n_ctx=64, n_slots=1)
        out.append([e.token_id for e in eng.generate(p, params, max_tokens)])
    return out


def _tokenizer(model):
    from ukgpu.llama_core.text.tokenizer import Tokenizer

    return Tokenizer.from_gguf(model.gguf)


def _run_together(model, params, max_tokens=8):
    eng = Engine(model, _tokenizer(model), n_ctx=64, n_slots=len(PROMPTS))
    calls = []
    real = model.backend.decode_batch  # the CPU's compiled batch step (Model.forward_batch's twin)

    def counting(model_, tokens, positions, kvs):
        calls.append(len(tokens))
        return real(model_, tokens, positions, kvs)

    model.backend.decode_batch = counting
    try:
        seqs = [eng.start(p, params, max_tokens) for p in PROMPTS]
        out = [[] for _ in seqs]
        while any(s.finish_reason is None for s in seqs):
            for i, res in enumerate(eng.step_all(seqs)):
                assert not isinstance(res, Exception), res
                out[i] += [e.token_id for e in res]
    finally:
        del model.backend.decode_batch
    return out, calls


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0),
                                    SamplingParams(temperature=0.9, top_k=20, seed=7),
                                    SamplingParams(temperature=0.0, repeat_penalty=1.3)],
                         ids=["greedy", "sampled", "penalized"])
def test_step_all_decodes_together_and_matches_each_sequence_alone(model, params):
    together, calls = _run_together(model, params)
    assert together == _run_alone(model, params)
    assert calls and max(calls) == 4  # five live sequences: a group of four (+ one alone)


class _Exploding(CpuBackend):
    def concat_rows(self, parts):
        raise RuntimeError("device lost")


def test_a_failed_batch_fails_its_sequences_and_their_slots_forget(smollm2):
    model = Model(smollm2, _Exploding())
    eng = Engine(model, _tokenizer(model), n_ctx=64, n_slots=3)
    seqs = [eng.start(p, SamplingParams(temperature=0.0), 8) for p in PROMPTS[:3]]
    assert all(isinstance(r, list) for r in eng.step_all(seqs))  # prefills run alone
    results = eng.step_all(seqs)
    assert all(isinstance(r, RuntimeError) and "device lost" in str(r) for r in results)
    assert all(s.kv_suspect for s in seqs)
    for s in seqs:
        eng.release(s)
    again = eng.start(PROMPTS[0], SamplingParams(temperature=0.0), 4)
    assert again.n_cached == 0  # no slot claims a prefix its cache may not hold


def test_one_sequence_failing_alone_does_not_stop_the_others(model):
    eng = Engine(model, _tokenizer(model), n_ctx=16, n_slots=2)
    ok = eng.start(PROMPTS[0], SamplingParams(temperature=0.0), 4)
    bad = eng.start(PROMPTS[1], SamplingParams(temperature=0.0), 4)
    bad.kv = model.new_kv(2)  # too small for its prompt: its forward pass raises
    results = eng.step_all([ok, bad])
    assert isinstance(results[0], list) and len(results[0]) == 1
    assert isinstance(results[1], Exception) and "KV cache" in str(results[1])


def test_backends_without_batching_step_one_by_one(smollm2):
    from ukgpu.llama_core.backend import Backend

    class OneAtATime(CpuBackend):
        def __init__(self):
            super().__init__()
            self.max_batch = 1

        def concat_rows(self, parts):
            return Backend.concat_rows(self, parts)

    with pytest.raises(NotImplementedError, match="one sequence per step"):
        OneAtATime().concat_rows([np.zeros((1, 2))])
    model = Model(smollm2, OneAtATime())
    eng = Engine(model, _tokenizer(model), n_ctx=64, n_slots=2)
    seqs = [eng.start(p, SamplingParams(temperature=0.0), 3) for p in PROMPTS[:2]]
    for _ in range(3):
        assert all(isinstance(r, list) for r in eng.step_all(seqs))  # concat_rows never called
    assert all(s.finish_reason == "length" for s in seqs)
