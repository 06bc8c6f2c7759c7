"""The HTTP API with the real SmolLM2-135M model against real clients.

One server per module (CPU backend, 4 slots): the official `openai` client,
schemathesis over /openapi.json, and a reduced run of tests/perf/load_api.py.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from ukgpu.kernel.api import ApiLimits, create_app
from ukgpu.kernel.api.server import background

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m"
N_CTX = 256
LIMITS = ApiLimits(max_tokens=8, max_prompt_chars=100)  # keeps fuzzed requests cheap
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from ukgpu.llama_core.engine import Engine

    return Engine.load(smollm2_path, backend="cpu", n_ctx=N_CTX, n_slots=4)


@pytest.fixture(scope="module")
def url(engine):
    with background(create_app(engine, LIMITS, model_id=MODEL)) as base:
        yield base


@pytest.fixture(scope="module")
def oai(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield client
    client.close()


def test_completion_stream_equals_greedy_text(oai):
    full = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    choice = full.choices[0]
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_stream_equals_greedy_text(oai):
    full = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    message = full.choices[0].message
    assert message.role == "assistant" and message.content.strip()
    assert "<|im_" not in message.content  # the template's markers never leak into the answer
    stream = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_a_chat_prompt_is_the_engines_chat_ids(oai, engine):
    full = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, temperature=0)
    assert full.usage.prompt_tokens == len(engine.chat_ids(CHAT))


def test_usage_counts_prompt_tokens(oai, url):
    ids = httpx.post(url + "/tokenize", json={"content": PROMPT, "add_special": True}).json()
    full = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert full.usage.prompt_tokens == len(ids["tokens"])
    again = oai.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=4, temperature=0)
    assert again.choices[0].text == full.choices[0].text


def test_a_second_chat_turn_reuses_the_cached_history(oai):
    """Turn 2 resends turn 1: the slot that holds it prefills only the new part, the answer is
    the same as from a cold slot, and usage says how many prompt tokens were cached."""
    turn1 = [{"role": "user", "content": "Name a colour of the sky."}]
    first = oai.chat.completions.create(model=MODEL, messages=turn1, max_tokens=6, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And of grass?"}]
    second = oai.chat.completions.create(model=MODEL, messages=turn2, max_tokens=6, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    cold = oai.chat.completions.create(model=MODEL, messages=turn2[:1] + [
        {"role": "user", "content": "Unrelated: count to three."}], max_tokens=6, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens


def test_stop_cuts_the_text_before_it(oai):
    text = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                  temperature=0).choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                 stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_seed_makes_sampling_reproducible(oai):
    def sample(seed):
        return oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.2,
                                      seed=seed, extra_body={"top_k": 40}).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_errors_raise_the_right_openai_exceptions(oai):
    with pytest.raises(openai.BadRequestError, match="slots"):  # n choices need n of the 4 slots
        oai.completions.create(model=MODEL, prompt=PROMPT, n=5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="stop"):
        oai.completions.create(model=MODEL, prompt=PROMPT, stop=[""])
    with pytest.raises(openai.NotFoundError, match="model"):
        oai.completions.create(model="gpt-4o", prompt=PROMPT)
    long_chat = [{"role": "user", "content": "hello " * 16}] * 20  # ~400 tokens > 256
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=long_chat)
    assert info.value.code == "context_length_exceeded"


def test_disconnected_stream_frees_its_slot(url):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as resp:
            next(resp.iter_lines())
        deadline = time.monotonic() + 10
        while "ukgpu_active_slots 0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the slot stayed busy after the client left"
            time.sleep(0.05)


def test_tokenize_round_trip(url):
    text = "Héllo, wörld! 123"
    ids = httpx.post(url + "/tokenize", json={"content": text}).json()["tokens"]
    back = httpx.post(url + "/detokenize", json={"tokens": ids}).json()["content"]
    assert back == text


def _load_module():
    path = Path(__file__).parents[1] / "perf" / "load_api.py"
    spec = importlib.util.spec_from_file_location("load_api", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concurrent_load_gives_the_lone_answers(url):
    result = _load_module().run_load(url, MODEL, clients=4, requests=16, max_tokens=4,
                                     time_limit=600, n_prompts=4)
    assert result["requests"] == 16
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ready" and health["backend"] == "cpu", health


def test_schemathesis_finds_no_server_errors(url):
    import schemathesis

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize",
            "POST /detokenize"} <= {op.label for op in operations}
    for operation in operations:
        _fuzz(operation, url)
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ready" and health["backend"] == "cpu", health


def _fuzz(operation, url: str) -> None:
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        # Valid JSON may still be refused for a reason no JSON Schema can state: a prompt
        # longer than the context in tokens.  Every other check runs, this one by hand.
        response = case.call_and_validate(base_url=url, timeout=600,
                                          excluded_checks=[positive_data_acceptance])
        if response.status_code == 400:
            error = response.json()["error"]
            # and OpenAI's one rule across fields: top_logprobs needs logprobs: true
            cross_field = error["param"] == "top_logprobs" and "logprobs" not in {
                k for k, v in (case.body or {}).items() if v is True}
            # a JSON Schema (response_format, a tool's parameters) the grammar compiler refuses,
            # a forced tool_choice without that function in tools, json_schema without its object
            cross_field = cross_field or error["code"] in ("unsupported_schema", "schema_too_large") or (
                error["param"] in ("tool_choice", "response_format.json_schema")
                and error["code"] in ("invalid_value", "missing_required_parameter"))
            assert error["code"] == "context_length_exceeded" or cross_field, response.text
        else:
            assert response.status_code < 400, response.text

    check()


def test_a_keyed_server_answers_the_same_with_the_key_and_nothing_without(oai, smollm2_path):
    """A second server (its own engine) with an API key: the official client with the key gets
    the keyless server's greedy answers; without it, 401 on every route but /health; a page's
    cross-site text/plain POST and a foreign Host are refused before any generation."""
    from ukgpu.kernel.api import security
    from ukgpu.llama_core.engine import Engine

    keyed_engine = Engine.load(smollm2_path, backend="cpu", n_ctx=N_CTX, n_slots=1)
    app = create_app(keyed_engine, LIMITS, model_id=MODEL, policy=security.Policy(api_key="k-int"))
    with background(app) as base:
        good = openai.OpenAI(base_url=base + "/v1", api_key="k-int", max_retries=0, timeout=120)
        bad = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        chat = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0}
        assert good.completions.create(**ask).choices[0].text == \
            oai.completions.create(**ask).choices[0].text
        assert good.chat.completions.create(**chat).choices[0].message.content == \
            oai.chat.completions.create(**chat).choices[0].message.content
        for call in (bad.models.list, lambda: bad.completions.create(**ask),
                     lambda: bad.chat.completions.create(**chat)):
            with pytest.raises(openai.AuthenticationError):
                call()
        for path in ("/metrics", "/openapi.json", "/tokenize", "/detokenize", "/admin/poweroff"):
            assert httpx.post(base + path, json={}).status_code == 401, path
        assert httpx.get(base + "/health").status_code == 200
        page = httpx.post(base + "/v1/completions", content=b'{"prompt": "x"}', headers={
            "Origin": "http://evil.example", "Content-Type": "text/plain",
            "Authorization": "Bearer k-int"})
        assert page.status_code == 403 and page.json()["error"]["code"] == "origin_not_allowed"
        rebound = httpx.get(base + "/v1/models", headers={"Host": "evil.example:80",
                                                          "Authorization": "Bearer k-int"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
        good.close()
        bad.close()
