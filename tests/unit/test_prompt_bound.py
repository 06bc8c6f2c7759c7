"""A prompt that cannot fit the context is refused by its length, before any tokenizing."""

from __future__ import annotations

import time

import httpx
import pytest

from ukgpu.kernel.api import ApiLimits, create_app
from ukgpu.kernel.api.prompt_bound import longest_token_chars, with_prompt_bound
from ukgpu.kernel.api.server import background
from ukgpu.llama_core.engine import Engine

N_CTX = 256


@pytest.fixture(scope="module")
def smol(smollm2):
    return Engine.load(smollm2, backend="cpu", n_ctx=N_CTX, n_slots=2)


@pytest.fixture(scope="module")
def client(smol):
    app = create_app(smol, ApiLimits(max_body_bytes=4 << 20), model_id="smol")
    with background(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def test_the_bound_is_the_context_times_the_longest_vocabulary_entry(smol):
    longest = longest_token_chars(smol.tokenizer)
    assert longest == max(len(t) for t in smol.tokenizer.tokens) == 81
    assert with_prompt_bound(ApiLimits(), N_CTX, smol.tokenizer).max_prompt_chars == N_CTX * 81
    tighter = ApiLimits(max_prompt_chars=100)
    assert with_prompt_bound(tighter, N_CTX, smol.tokenizer) is tighter  # a lower explicit bound stays


def test_every_token_covers_at_most_the_longest_entry(smol):
    tok = smol.tokenizer
    longest = longest_token_chars(tok)
    text = "Hello   world!\n\n\t" + " " * 300 + "ünïcödé 漢字 " * 20 + "<|im_start|>x"
    ids = tok.encode(text, add_special=False)
    assert len(text) <= len(ids) * longest  # so chars > n_ctx * longest means tokens > n_ctx


@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_a_huge_prompt_is_refused_at_once_naming_the_field(client, kind):
    text = "lorem ipsum " * 100_000  # 1.2 MB (under the 4 MiB body limit): tens of seconds to tokenize
    body = ({"prompt": text} if kind == "prompt"
            else {"messages": [{"role": "user", "content": text[:600_000]},
                               {"role": "user", "content": text[:600_000]}]})
    t0 = time.perf_counter()
    r = client.post("/v1/completions" if kind == "prompt" else "/v1/chat/completions",
                    json={"model": "smol", "max_tokens": 1, **body})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == kind and err["code"] == "context_length_exceeded"
    assert elapsed < 1.0, f"refusing took {elapsed:.2f} s"


def test_a_prompt_over_the_bound_but_under_the_body_limit_is_400(client):
    text = "a" * (N_CTX * 81 + 1)  # 20,737 characters, well under the body limit
    t0 = time.perf_counter()
    r = client.post("/v1/completions", json={"model": "smol", "prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "20737 characters" in r.json()["error"]["message"]
    assert time.perf_counter() - t0 < 1.0
    r = client.post("/tokenize", json={"content": text})
    assert r.status_code == 400, r.text


def test_a_prompt_within_the_bound_still_answers(client):
    r = client.post("/v1/completions", json={"model": "smol", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
