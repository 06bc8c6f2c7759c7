"""logprobs, n > 1 and embeddings through the official `openai` client against the real SmolLM2-135M model.

Each reported logprob is checked against the log-softmax of logits computed here directly
with `Model.forward` over the same token ids (greedy answers: the sampled token is the argmax,
so the reference sequence is rebuilt step by step from the logits themselves).
"""

from __future__ import annotations

import numpy as np
import openai
import pytest

from ukgpu.kernel.api import ApiLimits, create_app
from ukgpu.kernel.api.server import background
from ukgpu.llama_core.logprobs import log_softmax

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m"
N_CTX = 256
MAX_TOKENS = 6
CHAT = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from ukgpu.llama_core.engine import Engine

    return Engine.load(smollm2_path, backend="cpu", n_ctx=N_CTX, n_slots=3)


@pytest.fixture(scope="module")
def oai(engine):
    with background(create_app(engine, ApiLimits(max_tokens=32), model_id=MODEL)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        yield client
        client.close()


def greedy_reference(engine, prompt: list[int], n: int) -> list[tuple[int, np.ndarray]]:
    """(argmax id, log-softmax row) for n greedy steps, from direct forward passes."""
    kv = engine.model.new_kv(N_CTX)
    logits = engine.model.forward(np.array(prompt), 0, kv, all_logits=False)[-1]
    out, pos = [], len(prompt)
    for _ in range(n):
        row = log_softmax(logits)
        token = int(np.argmax(row))
        out.append((token, row))
        logits = engine.model.forward(np.array([token]), pos, kv, all_logits=False)[-1]
        pos += 1
    return out


def check(engine, reference, tokens: list[tuple[bytes, float, list[tuple[bytes, float]]]], k: int):
    assert len(tokens) >= 1
    for (token, row), (got_bytes, got_lp, got_top) in zip(reference, tokens):
        assert got_bytes == engine.tokenizer.token_bytes(token)
        assert got_lp == pytest.approx(row[token], abs=2e-3)
        best = np.argsort(-row, kind="stable")[:k]
        assert [b for b, _ in got_top] == [engine.tokenizer.token_bytes(int(i)) for i in best]
        assert [lp for _, lp in got_top] == pytest.approx(row[best], abs=2e-3)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_log_softmax_of_the_logits(oai, engine, stream):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
                  top_logprobs=3)
    if stream:
        content = [t for c in oai.chat.completions.create(stream=True, **kwargs)
                   if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    else:
        content = oai.chat.completions.create(**kwargs).choices[0].logprobs.content
    tokens = [(bytes(t.bytes), t.logprob, [(bytes(a.bytes), a.logprob) for a in t.top_logprobs])
              for t in content]
    check(engine, greedy_reference(engine, engine.chat_ids(CHAT), len(tokens)), tokens, 3)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_are_log_softmax_of_the_logits(oai, engine, stream):
    prompt = "The capital of France is"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=2)
    if stream:
        blocks = [c.choices[0].logprobs for c in oai.completions.create(stream=True, **kwargs)
                  if c.choices[0].logprobs]
    else:
        blocks = [oai.completions.create(**kwargs).choices[0].logprobs]
    tokens = [(tok.encode(), lp, [(t.encode(), v) for t, v in top.items()])
              for b in blocks for tok, lp, top in zip(b.tokens, b.token_logprobs, b.top_logprobs)]
    ids = engine.tokenizer.encode(prompt, add_special=True)
    check(engine, greedy_reference(engine, ids, len(tokens)), tokens, 2)


def test_n_choices_greedy_are_identical_and_sampled_have_indices(oai):
    greedy = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, n=3,
                                         temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    single = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS,
                                         temperature=0)
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    sampled = oai.completions.create(model=MODEL, prompt="My favourite word is", max_tokens=8, n=3,
                                     temperature=1.5, seed=11)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert len({c.text for c in sampled.choices}) > 1  # seeds 11, 12, 13 at a high temperature
    again = oai.completions.create(model=MODEL, prompt="My favourite word is", max_tokens=8, n=3,
                                   temperature=1.5, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]


def test_n_choices_stream(oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=2,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""
    assert chunks[-1].usage.completion_tokens > 0


def test_embeddings_equal_the_pooled_hidden_state(oai, engine):
    texts = ["The cat sat on the mat", "Quarterly revenue grew"]
    out = oai.embeddings.create(model=MODEL, input=texts)  # base64 on the wire, decoded by the client
    floats = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    m = engine.model
    for text, item, plain in zip(texts, out.data, floats.data):
        ids = engine.tokenizer.encode(text, add_special=True)
        hidden = m.hidden_states(np.array(ids), 0, m.new_kv(len(ids))).astype(np.float64).mean(axis=0)
        expected = hidden / np.linalg.norm(hidden)
        np.testing.assert_allclose(item.embedding, expected, atol=1e-5)
        np.testing.assert_allclose(plain.embedding, expected, atol=1e-5)
    assert out.usage.prompt_tokens == sum(len(engine.tokenizer.encode(t, add_special=True)) for t in texts)


def test_embeddings_refuse_dimensions(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.embeddings.create(model=MODEL, input="x", dimensions=16)
    assert caught.value.body["param"] == "dimensions"
