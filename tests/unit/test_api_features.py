"""logprobs through the HTTP API, in OpenAI's shapes, over the fake engine (whose logprobs are
fixed: the chosen letter -0.5, then the next codes -1, -2, ...), read with the official client."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_api_fakes import FakeEngine, use_fakes

from ukgpu.kernel.api import ApiLimits, create_app
from ukgpu.kernel.api.server import background

MODEL = "fake-model"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def url(engine, monkeypatch):
    use_fakes(monkeypatch)
    with background(create_app(engine, ApiLimits(max_tokens=32), model_id=MODEL)) as base:
        yield base


@pytest.fixture
def oai(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=10) as client:
        yield client


def test_chat_logprobs_shape(oai, engine):
    out = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, logprobs=True,
                                      top_logprobs=2)
    choice = out.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert len(content) == 4 == out.usage.completion_tokens
    first = content[0]
    assert first.logprob == -0.5 and first.bytes == list(first.token.encode())
    assert [(a.token, a.logprob) for a in first.top_logprobs] == [
        (first.token, -0.5), (chr(ord(first.token) + 1), -1.0)]


def test_chat_stream_logprobs_per_chunk(oai):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=0)
    full = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in full.choices[0].logprobs.content]
    assert all(t.top_logprobs == [] for t in streamed)


def test_chat_without_logprobs_has_none(oai):
    out = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert out.choices[0].logprobs is None


def test_completion_logprobs_shape_and_offsets(oai):
    out = oai.completions.create(model=MODEL, prompt="abc", max_tokens=4, logprobs=3)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.token_logprobs == [-0.5] * 4
    assert lp.text_offset == [0, 1, 2, 3]
    assert all(len(d) == 3 and d[t] == -0.5 for d, t in zip(lp.top_logprobs, lp.tokens))
    chunks = list(oai.completions.create(model=MODEL, prompt="abc", max_tokens=4, logprobs=3,
                                         stream=True))
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset  # continued across chunks


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
])
def test_logprobs_limits_are_400s(url, path, body, param):
    resp = httpx.post(url + path, json={"model": MODEL, **body}, timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def _request_schema(doc: dict, path: str) -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_openapi_publishes_the_limits(url):
    doc = httpx.get(url + "/openapi.json", timeout=10).json()
    chat = _request_schema(doc, "/v1/chat/completions")["properties"]
    completion = _request_schema(doc, "/v1/completions")["properties"]
    assert (chat["top_logprobs"]["minimum"], chat["top_logprobs"]["maximum"]) == (0, 20)
    assert "boolean" in chat["logprobs"]["type"]
    assert (completion["logprobs"]["minimum"], completion["logprobs"]["maximum"]) == (0, 5)


def test_n_choices_each_have_their_index(oai, engine):
    out = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # the fake is deterministic
    assert out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens == len(engine.chat_ids(CHAT))  # the prompt counted once


def test_n_choices_stream_with_their_index(oai):
    chunks = list(oai.completions.create(model=MODEL, prompt="abc", max_tokens=3, n=2, stream=True,
                                         stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts[0] == texts[1] and len(texts[0]) == 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_seeds_differ_per_choice(url, engine):
    seen = []
    engine.start = _recording(engine.start, seen)
    httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a", "n": 2, "seed": 5,
                                              "max_tokens": 1}, timeout=10).raise_for_status()
    assert sorted(p["seed"] for p in seen) == [5, 6]


def _recording(start, seen):
    def wrapped(prompt_ids, params, max_tokens, stop):
        seen.append(params)
        return start(prompt_ids, params, max_tokens, stop)
    return wrapped


def test_embeddings_shapes_and_usage(oai, engine):
    out = oai.embeddings.create(model=MODEL, input=["ab", "xyz"])
    assert out.object == "list" and out.model == MODEL
    assert [d.index for d in out.data] == [0, 1]
    assert out.data[1].embedding == pytest.approx(engine.embed(list(b"xyz")))
    assert out.usage.prompt_tokens == out.usage.total_tokens == 5


def test_embeddings_of_token_ids_and_base64(oai, engine):
    ids = oai.embeddings.create(model=MODEL, input=[[1, 2, 3], [4]], encoding_format="float")
    assert ids.data[0].embedding == pytest.approx(engine.embed([1, 2, 3]))
    # the client asks for base64 by default and decodes it to floats itself
    b64 = oai.embeddings.create(model=MODEL, input=[7, 8])
    assert b64.data[0].embedding == pytest.approx(engine.embed([7, 8]), abs=1e-6)


@pytest.mark.parametrize("body, param", [
    ({"input": "a", "dimensions": 8}, "dimensions"),
    ({"input": ["a"] * 65}, "input"),
    ({"input": ""}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a" * 65}, "input"),  # more tokens than the fake's 64-token context
])
def test_embeddings_limits_are_400s(url, body, param):
    resp = httpx.post(url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_openapi_publishes_embeddings(url):
    doc = httpx.get(url + "/openapi.json", timeout=10).json()
    props = _request_schema(doc, "/v1/embeddings")["properties"]
    assert props["input"]["anyOf"][1]["maxItems"] == 64 and props["dimensions"]["enum"] == [None]


def test_n_beyond_the_queue_depth_is_a_400_not_a_429(engine, monkeypatch):
    """n jobs can never all wait in a queue shallower than n: retrying (429) would never help."""
    use_fakes(monkeypatch)
    engine.n_slots = 4
    with background(create_app(engine, ApiLimits(max_tokens=32, max_queue=2), model_id=MODEL)) as base:
        resp = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "a", "n": 3}, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "n", resp.text
        ok = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "a", "n": 2, "max_tokens": 2},
                        timeout=10)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
