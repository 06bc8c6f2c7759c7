"""The HTTP API over a deterministic fake engine, served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from test_api_fakes import FakeEngine, FakeTokenizer, served, use_fakes

from ukgpu.kernel.api import ApiLimits, create_app
from ukgpu.kernel.api.engine_protocol import ServedEngine
from ukgpu.kernel.api.server import background

MODEL = "fake-model"


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def limits():
    return ApiLimits(max_body_bytes=4096, max_queue=2, max_tokens=32)


@pytest.fixture
def url(engine, limits, monkeypatch):
    use_fakes(monkeypatch)
    with background(create_app(engine, limits, model_id=MODEL)) as base:
        yield base


@pytest.fixture
def client(url):
    # raw bodies (content=) are JSON too: the API refuses other media types (test_api_security.py)
    with httpx.Client(base_url=url, timeout=10, headers={"Content-Type": "application/json"}) as c:
        yield c


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, **body})


def assert_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_completion_matches_engine_and_counts_usage(client, engine):
    resp = complete(client, prompt="hello", max_tokens=5)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == engine.expected("hello", 5)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert engine.live == set()


def test_stop_finishes_with_stop(client, engine):
    letters = engine.expected("hi", 6)
    resp = complete(client, prompt="hi", max_tokens=6, stop=[letters[2]])
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == letters[:2]


def test_stream_chunks_concatenate_to_the_text(client, engine):
    with client.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "abc", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert "".join(texts) == engine.expected("abc", 4)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_uses_the_template(client, engine):
    messages = [{"role": "user", "content": [{"type": "text", "text": "yo"}]}]
    resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                     "max_tokens": 3})
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant", "content": engine.expected("<user>yo<assistant>", 3)}


def test_chat_prompt_ids_come_from_the_engine(client, engine):
    """The API asks the engine's `chat_ids` (no template rendering of its own), with the
    content parts joined into plain text."""
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "y"}, {"type": "text", "text": "o"}]}]
    resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                     "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert engine.chats == [[{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "yo"}]]
    prompt = "<system>be brief<user>yo<assistant>"
    assert resp.json()["usage"]["prompt_tokens"] == len(prompt)
    assert resp.json()["choices"][0]["message"]["content"] == engine.expected(prompt, 2)


def test_chat_stream_starts_with_role(client):
    with client.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("body, param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": [300]}, "prompt"),
    ({}, "prompt"),
])
def test_bad_fields_are_400_with_param(client, body, param):
    assert_error(complete(client, **body), 400, param=param)


def test_n_above_the_slots_says_why(client, engine):
    err = assert_error(complete(client, prompt="x", n=engine.n_slots + 1), 400, param="n")
    assert "slots" in err["message"]


def test_malformed_json_and_non_objects(client):
    assert_error(client.post("/v1/completions", content=b"{nope"), 400, code="invalid_json")
    assert_error(client.post("/v1/completions", content=b"[1]"), 400, code="invalid_json")
    assert_error(client.post("/v1/completions", content=b'{"prompt": NaN}'), 400)


def test_unknown_model_is_404(client):
    resp = client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert_error(resp, 404, param="model", code="model_not_found")


def test_prompt_over_context_is_400(client, engine):
    err = assert_error(complete(client, prompt="x" * engine.n_ctx), 400, param="prompt",
                       code="context_length_exceeded")
    assert "--ctx" in err["message"]


@pytest.mark.parametrize("kind", ["text", "ids", "chat"])
def test_the_engine_decides_what_fits_the_context(client, engine, kind):
    """Whatever the prompt's form, the engine's `room` refuses a prompt that leaves no room
    to generate, with one error; token ids no longer fail the schema with another."""
    n = engine.n_ctx
    path, body, param = {
        "text": ("/v1/completions", {"prompt": "x" * n}, "prompt"),
        "ids": ("/v1/completions", {"prompt": [120] * n}, "prompt"),
        "chat": ("/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "x" * (n - len("<user><assistant>"))}]},
                 "messages"),
    }[kind]
    err = assert_error(client.post(path, json={"model": MODEL, **body}), 400, param=param,
                       code="context_length_exceeded")
    assert err["message"] == (f"The prompt is {n} tokens but the context holds {n} (including "
                              "at least one generated token); shorten it or restart with a "
                              "larger --ctx.")
    one_less = {"ids": {"prompt": [120] * (n - 1)}, "text": {"prompt": "x" * (n - 1)}}.get(kind)
    if one_less is not None:  # one token of room: max_tokens is clipped to it
        usage = complete(client, **one_less, max_tokens=5).json()["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (n - 1, 1)


def test_oversized_body_rejected_before_reading_it(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{")
        reply = _read_reply(sock)
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"body_too_large"' in reply


def _read_reply(sock: socket.socket) -> str:
    """Everything the server sends until its JSON body is complete or it closes."""
    data = b""
    while not data.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_oversized_chunked_body_is_413(client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'
    resp = client.post("/v1/completions", content=chunks())
    assert_error(resp, 413, code="body_too_large")


def test_engine_exception_is_500_and_server_stays_up(client, engine):
    err = assert_error(complete(client, prompt="boom", max_tokens=3), 500, code="engine_error")
    assert "kaboom" in err["message"]
    assert engine.live == set()
    assert complete(client, prompt="ok", max_tokens=2).status_code == 200
    assert client.get("/health").json() == {"status": "ready"}


def test_engine_exception_mid_stream_is_an_error_event(client):
    with client.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "boom", "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert json.loads(lines[0].removeprefix("data: "))["error"]["code"] == "engine_error"
    assert lines[-1] == "data: [DONE]"


def test_unknown_path_and_method_are_openai_shaped(client):
    assert_error(client.get("/v2/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_models_tokenize_detokenize(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    ids = client.post("/tokenize", json={"content": "hé"}).json()["tokens"]
    assert ids == list("hé".encode())
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"content": "hé"}
    assert_error(client.post("/detokenize", json={"tokens": [-1]}), 400, param="tokens[0]")


def test_openapi_lists_every_endpoint(client):
    doc = client.get("/openapi.json").json()
    assert set(doc["paths"]) == {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models",
                                 "/health", "/metrics", "/tokenize", "/detokenize",
                                 "/openapi.json"}
    schema = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
    assert schema["application/json"]["schema"]["properties"]["max_tokens"]["maximum"] == 32


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_queue_full_is_429_and_metrics_show_it(url, engine):
    engine.delay = 0.1  # two requests of 10 tokens hold both slots for ~2 s
    results = []

    def send():
        with httpx.Client(base_url=url, timeout=20) as c:
            results.append(complete(c, prompt="q", max_tokens=10).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]  # 2 slots, then 2 queued
    with httpx.Client(base_url=url, timeout=10) as c:
        for group, gauge in ((threads[:2], "ukgpu_active_slots 2"),
                             (threads[2:], "ukgpu_queue_depth 2")):
            for t in group:
                t.start()
            _wait(lambda g=gauge: g in c.get("/metrics").text, timeout=1.5)
        assert_error(complete(c, prompt="q"), 429, code="queue_full")
        for t in threads:
            t.join(20)
        text = c.get("/metrics").text
    assert results == [200] * 4
    assert 'ukgpu_requests_total{path="/v1/completions",status="429"} 1' in text
    assert 'ukgpu_requests_total{path="/v1/completions",status="200"} 4' in text
    assert "ukgpu_generated_tokens_total 40" in text
    assert "ukgpu_active_slots 0" in text and "ukgpu_queue_depth 0" in text


def test_disconnect_while_streaming_frees_the_slot(url, engine):
    engine.delay = 0.05  # 30 tokens would take 1.5 s
    with httpx.Client(base_url=url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": "long", "max_tokens": 30, "stream": True}) as resp:
            next(resp.iter_lines())
        _wait(lambda: not engine.live, timeout=1.0)
    assert engine.released[0].n < 30


def test_disconnect_while_waiting_frees_the_slot(url, engine):
    engine.delay = 0.05
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "long", "max_tokens": 30}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait(lambda: len(engine.live) == 1)
    _wait(lambda: not engine.live, timeout=1.0)
    assert engine.released[0].n < 30


@pytest.mark.parametrize("limits", [ApiLimits(max_body_bytes=4096, max_queue=8, max_tokens=32)])
def test_the_engine_alone_sets_the_slot_count(url, engine):
    """ApiLimits has no slot count of its own (a larger one let the scheduler start more
    sequences than the engine had slots, and the extra request got a 500): the scheduler
    takes the engine's, and requests beyond it wait in the queue (deep enough here that all
    of them can arrive before the scheduler admits any, so no 429 can occur)."""
    with pytest.raises(TypeError):
        ApiLimits(n_slots=engine.n_slots + 1)
    engine.delay = 0.02
    results = []

    def send():
        with httpx.Client(base_url=url, timeout=20) as c:
            results.append(complete(c, prompt="q", max_tokens=5).status_code)

    threads = [threading.Thread(target=send) for _ in range(engine.n_slots + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [200] * len(threads)
    with httpx.Client(base_url=url, timeout=10) as c:
        assert f"ukgpu_slots {engine.n_slots}" in c.get("/metrics").text


def test_the_fake_engine_has_what_the_api_calls(engine):
    """mypy checks the types through `served`; this checks the names on every run."""
    members = {name for name in vars(ServedEngine) if not name.startswith("_")}
    assert members and members <= set(dir(served(engine)))


def test_health_is_503_while_loading_then_ready(monkeypatch):
    use_fakes(monkeypatch)
    release = threading.Event()

    def loader():
        release.wait(10)
        return FakeEngine()

    with background(create_app(loader, model_id=MODEL)) as base, httpx.Client(base_url=base) as c:
        resp = c.get("/health")
        assert (resp.status_code, resp.json()) == (503, {"status": "loading"})
        assert_error(complete(c, prompt="x"), 503, code="model_loading")
        release.set()
        _wait(lambda: c.get("/health").status_code == 200)
        assert complete(c, prompt="x", max_tokens=1).status_code == 200


def test_failed_load_is_reported(monkeypatch):
    def loader():
        raise RuntimeError("no such file")

    with background(create_app(loader, model_id=MODEL)) as base, httpx.Client(base_url=base) as c:
        _wait(lambda: c.get("/health").json()["status"] == "failed")
        err = assert_error(complete(c, prompt="x"), 503, code="model_load_failed")
        assert "no such file" in err["message"]


def test_chat_template_refusal_is_a_400():
    from types import SimpleNamespace

    from ukgpu.kernel.api import generation
    from ukgpu.kernel.api.errors import ApiError
    from ukgpu.llama_core.engine import Engine

    engine = SimpleNamespace(gguf="{{ raise_exception('roles must alternate') }}",
                             tokenizer=FakeTokenizer())
    engine.chat_ids = lambda messages: Engine.chat_ids(engine, messages)  # the real method
    with pytest.raises(ApiError) as info:
        generation.prompt_ids(engine, generation.CHAT,
                              {"messages": [{"role": "user", "content": "x"}]})
    assert (info.value.status, info.value.code) == (400, "chat_template_error")
    assert "roles must alternate" in info.value.message


def test_max_completion_tokens_and_arena_metrics(engine, monkeypatch):
    use_fakes(monkeypatch)

    class Arena:
        def stats(self):
            return {"size": 4096, "used": 1024}

    app = create_app(engine, model_id=MODEL, arena=Arena())
    with background(app) as base, httpx.Client(base_url=base) as c:
        resp = c.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 3, "max_tokens": 9})
        assert resp.json()["usage"]["completion_tokens"] == 3
        text = c.get("/metrics").text
    assert "ukgpu_arena_used 1024" in text and "ukgpu_arena_size 4096" in text
    assert "ukgpu_tokens_per_second 0.3" in text  # 3 tokens in the 10 s window


def test_default_max_tokens_respects_the_cap(engine, monkeypatch):
    use_fakes(monkeypatch)
    app = create_app(engine, ApiLimits(max_tokens=3), model_id=MODEL)
    with background(app) as base, httpx.Client(base_url=base) as c:
        usage = complete(c, prompt="p").json()["usage"]
        chat = c.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}]}).json()["usage"]
    assert usage["completion_tokens"] == 3 and chat["completion_tokens"] == 3
