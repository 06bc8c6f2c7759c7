"""Token logprobs: the log-softmax of the model's own logits at each generated position,
reported by the engine for sampled, greedy and batch-decoded tokens alike."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.logprobs import log_softmax, token_logprob
from ukgpu.llama_core.sampling import SamplingError, SamplingParams


def test_token_logprob_top_is_sorted_and_normalised():
    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0], dtype=np.float32)
    info = token_logprob(logits, 2, 3, lambda i: bytes([65 + i]))
    assert np.exp(log_softmax(logits)).sum() == pytest.approx(1.0)
    assert info.token == b"C" and info.logprob == pytest.approx(log_softmax(logits)[2])
    assert [a.token_id for a in info.top] == [1, 3, 2]  # ties: lower id first
    assert token_logprob(logits, 0, 0, lambda i: b"").top == ()
    assert len(token_logprob(logits, 0, 20, lambda i: b"").top) == 5  # at most the vocabulary
    masked = np.array([0.0, -np.inf, 1.0, -np.inf], dtype=np.float32)  # a grammar's mask
    assert [a.token_id for a in token_logprob(masked, 2, 4, lambda i: b"").top] == [2, 0]


def test_logprobs_out_of_range_is_refused():
    with pytest.raises(SamplingError, match="logprobs"):
        SamplingParams(logprobs=21)


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine.load(smollm2, backend="cpu", n_ctx=64, n_slots=2)


def reference(engine: Engine, prompt: list[int], generated: list[int]) -> np.ndarray:
    """log-softmax of the logits at each generated position, from one direct forward pass."""
    ids = np.array(prompt + generated[:-1])
    logits = engine.model.forward(ids, 0, engine.model.new_kv(64), all_logits=True)
    return np.stack([log_softmax(row) for row in logits[len(prompt) - 1:]])


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, logprobs=3),
                                    SamplingParams(temperature=0.9, seed=7, repeat_penalty=1.3,
                                                   logprobs=2)])
def test_engine_logprobs_equal_log_softmax_of_model_logits(engine, params):
    prompt = engine.tokenizer.encode("The capital of France is")
    events = list(engine.generate(prompt, params, max_tokens=5))
    got = [e.logprob for e in events if e.logprob is not None]
    generated = [e.token_id for e in events if e.token_id is not None]
    assert len(got) == len(generated) == 5
    ref = reference(engine, prompt, generated)
    for row, token, info in zip(ref, generated, got):
        assert info.token_id == token and info.token == engine.tokenizer.token_bytes(token)
        assert info.logprob == pytest.approx(row[token], abs=2e-3)
        best = np.argsort(-row, kind="stable")[:params.logprobs]
        assert [a.token_id for a in info.top] == [int(i) for i in best]
        assert [a.logprob for a in info.top] == pytest.approx(row[best], abs=2e-3)


def test_batched_decode_reports_the_same_logprobs(engine):
    prompt = engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0, logprobs=1)
    alone = [e.logprob.logprob for e in engine.generate(prompt, params, max_tokens=4) if e.logprob]
    seqs = [engine.start(prompt, params, 4), engine.start(prompt, params, 4)]
    together: list[list[float]] = [[], []]
    while any(s.finish_reason is None for s in seqs):
        for i, events in enumerate(engine.step_all(seqs)):
            assert not isinstance(events, Exception)
            together[i] += [e.logprob.logprob for e in events if e.logprob]
    for seq in seqs:
        engine.release(seq)
    assert together[0] == pytest.approx(alone, abs=2e-3)
    assert together[1] == pytest.approx(alone, abs=2e-3)


def test_no_logprobs_unless_asked(engine):
    prompt = engine.tokenizer.encode("Hello")
    events = list(engine.generate(prompt, SamplingParams(temperature=0), max_tokens=3))
    assert all(e.logprob is None for e in events)
