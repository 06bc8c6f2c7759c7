"""Embeddings from the real SmolLM2-135M: the hidden state after the output norm is what the
output matrix turns into the model's logits, and an embedding is its mean over the input's
tokens, unit length (or first/last token as the GGUF's pooling_type says)."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.llama_core.embedding import EmbeddingError, pooling
from ukgpu.llama_core.engine import Engine


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine.load(smollm2, backend="cpu", n_ctx=64, n_slots=1)


def test_hidden_states_give_the_models_logits(engine):
    m = engine.model
    ids = np.array(engine.tokenizer.encode("The cat sat on the mat"))
    hidden = m.hidden_states(ids, 0, m.new_kv(len(ids)))
    logits = m.forward(ids, 0, m.new_kv(len(ids)), all_logits=True)
    again = m.backend.to_host(m.backend.matmul(np.asarray(hidden, dtype=np.float32), m.weights.output))
    assert hidden.shape == (len(ids), m.config.dim)
    np.testing.assert_allclose(again, logits, rtol=1e-3, atol=1e-3)


def test_embedding_is_the_normalised_mean_hidden_state(engine):
    m = engine.model
    ids = engine.tokenizer.encode("The cat sat on the mat")
    hidden = m.hidden_states(np.array(ids), 0, m.new_kv(len(ids))).astype(np.float64)
    expected = hidden.mean(axis=0) / np.linalg.norm(hidden.mean(axis=0))
    got = engine.embed(ids)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    other = engine.embed(engine.tokenizer.encode("Quarterly revenue grew by four percent"))
    assert float(got @ other) < 0.999  # different texts, different vectors


def test_pooling_follows_the_gguf_key():
    assert pooling({}, "llama") == "mean"
    assert pooling({"bert.pooling_type": 2}, "bert") == "cls"
    assert pooling({"qwen3.pooling_type": 3}, "qwen3") == "last"
    with pytest.raises(EmbeddingError, match="pooling_type"):
        pooling({"bert.pooling_type": 4}, "bert")
