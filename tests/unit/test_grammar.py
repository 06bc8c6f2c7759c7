"""Constrained decoding: the sampler's grammar mask, llguidance over our GGUF tokenizer, and
response_format's 400s."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest

from ukgpu.kernel.api import structured
from ukgpu.kernel.api.errors import ApiError
from ukgpu.llama_core.grammar import GrammarError, GrammarSpec
from ukgpu.llama_core.sampling import Sampler, SamplingParams
from ukgpu.llama_core.text.tokenizer import Tokenizer


class _OnlyToken:
    """A grammar allowing one token id, recording what the sampler accepted."""

    def __init__(self, allowed: int) -> None:
        self.allowed, self.accepted = allowed, []

    def matcher(self):
        return self

    def mask(self, logits):
        out = np.full_like(logits, -np.inf)
        out[self.allowed] = logits[self.allowed]
        return out

    def accept(self, token):
        self.accepted.append(token)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_mask_hook_overrides_the_best_logit_and_advances(temperature):
    grammar = _OnlyToken(3)
    sampler = Sampler(SamplingParams(temperature=temperature, seed=1, grammar=grammar))
    logits = np.array([9.0, 5.0, 1.0, -2.0, 0.5], dtype=np.float32)
    assert [sampler(logits) for _ in range(3)] == [3, 3, 3]
    assert grammar.accepted == [3, 3, 3]


def test_mask_comes_before_penalties():
    """A repeat penalty on the only allowed token cannot push the choice outside the grammar."""
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=10.0, grammar=_OnlyToken(1)))
    assert sampler(np.array([2.0, 1.0, 0.0], dtype=np.float32), history=[1, 1, 1]) == 1


def test_no_grammar_leaves_logits_alone():
    sampler = Sampler(SamplingParams(temperature=0))
    logits = np.array([0.0, 3.0], dtype=np.float32)
    assert sampler.constrain(logits) is logits and sampler(logits) == 1


@pytest.fixture(scope="module")
def tokenizer(smollm2) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}


def test_masked_random_walk_is_always_valid_json(tokenizer):
    """Uniform logits: whatever the draw, the masked choice keeps the text inside the schema, and
    it ends with an end-of-generation token once the object closes."""
    for seed in range(3):
        grammar = GrammarSpec.json_schema(tokenizer, SCHEMA)
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed, grammar=grammar))
        ids: list[int] = []
        for _ in range(200):
            token = sampler(np.zeros(tokenizer.vocab_size, dtype=np.float32))
            if token in tokenizer.eog_ids:
                break
            ids.append(token)
        else:
            pytest.fail(f"seed {seed}: no end after 200 tokens: {tokenizer.decode(ids)!r}")
        assert sampler.matcher is not None and sampler.matcher.done
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)


def test_control_tokens_are_never_text(tokenizer):
    sampler = Sampler(SamplingParams(temperature=0, grammar=GrammarSpec.json_schema(tokenizer)))
    masked = sampler.constrain(np.zeros(tokenizer.vocab_size, dtype=np.float32))
    allowed = np.flatnonzero(np.isfinite(masked))
    assert allowed.size and not any(tokenizer.is_control(int(t)) for t in allowed)
    assert all(tokenizer.token_bytes(int(t)).lstrip().startswith(b"{") for t in allowed)


def test_unresolvable_schema_is_a_grammar_error(tokenizer):
    with pytest.raises(GrammarError, match="nope"):
        GrammarSpec.json_schema(tokenizer, {"$ref": "#/definitions/nope"})


def _constrain(tokenizer, fmt):
    return structured.constrain(SimpleNamespace(tokenizer=tokenizer), {"response_format": fmt},
                                SamplingParams())


def test_response_format_text_adds_no_grammar(tokenizer):
    assert _constrain(tokenizer, {"type": "text"}).grammar is None
    assert _constrain(tokenizer, {"type": "json_object"}).grammar is not None


@pytest.mark.parametrize("fmt, param, code", [
    ({"type": "json_schema"}, "response_format.json_schema", "missing_required_parameter"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/x"}}},
     "response_format", "unsupported_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "enum": ["v" * 1000] * (structured.MAX_SCHEMA_CHARS // 1000 + 1)}}},
     "response_format.json_schema.schema", "schema_too_large"),
])
def test_bad_response_format_is_400_naming_it(tokenizer, fmt, param, code):
    with pytest.raises(ApiError) as info:
        _constrain(tokenizer, fmt)
    assert info.value.status == 400
    body = info.value.body()["error"]
    assert (body["param"], body["code"]) == (param, code)


# --- tool calls ----------------------------------------------------------------


def test_qwen_tool_call_blocks_parse_with_arguments_as_json_text():
    from ukgpu.llama_core.text.tool_calls import ToolCall, parse

    text = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "now", "arguments": "{}"}</tool_call>')
    assert parse(text) == ("Checking.", [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("now", "{}")])


@pytest.mark.parametrize("text", [
    "<tool_call>not json</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "plain answer", '{"a": 1}',
])
def test_malformed_calls_stay_text(text):
    from ukgpu.llama_core.text.tool_calls import parse

    assert parse(text) == (text.strip(), [])


def test_a_bare_call_object_counts():
    from ukgpu.llama_core.text.tool_calls import ToolCall, parse

    assert parse(' {"name": "f", "arguments": {"x": 1}}\n') == ("", [ToolCall("f", '{"x": 1}')])


def test_streamed_tool_calls_carry_index_id_name_arguments():
    delta, reason = structured.final_delta('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    assert reason == "tool_calls" and "content" not in delta
    (call,) = delta["tool_calls"]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert structured.final_delta("hello") == ({"content": "hello"}, None)


def test_history_tool_calls_reach_the_template_as_objects():
    msg = {"role": "assistant", "content": None,
           "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    assert structured.template_message(msg, None)["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert structured.template_message({"role": "tool", "tool_call_id": "c1"}, "22")["tool_call_id"] == "c1"


def test_named_tool_choice_must_be_a_listed_function():
    body = {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}
    with pytest.raises(ApiError) as info:
        structured.constrain(SimpleNamespace(tokenizer=None), body, SamplingParams())
    assert info.value.body()["error"]["param"] == "tool_choice"


def test_forcing_a_call_needs_tools():
    with pytest.raises(ApiError) as info:
        structured.constrain(SimpleNamespace(tokenizer=None), {"messages": [], "tool_choice": "required"},
                             SamplingParams())
    assert info.value.body()["error"]["param"] == "tool_choice"


def test_limits_are_published_in_the_request_schema():
    from ukgpu.kernel.api.limits import ApiLimits
    from ukgpu.kernel.api.schema import ModelFacts, chat_request, completion_request

    chat = chat_request(ModelFacts("m", 64, 100), ApiLimits())["properties"]
    assert chat["tools"]["maxItems"] == structured.MAX_TOOLS
    schema = chat["response_format"]["properties"]["json_schema"]["properties"]["schema"]
    assert schema["x-max-chars"] == structured.MAX_SCHEMA_CHARS
    assert "response_format" in completion_request(ModelFacts("m", 64, 100), ApiLimits())["properties"]


def test_a_grammar_keeps_the_engine_off_the_logit_free_greedy_path(smollm2, monkeypatch):
    """decode_greedy (CUDA: an on-device argmax) returns no logits to mask: a grammar must not use it."""
    from ukgpu.llama_core.engine import Engine

    engine = Engine.load(smollm2, backend="cpu", n_ctx=128)

    def no_logits(*args, **kwargs):
        raise AssertionError("decode_greedy used under a grammar")

    monkeypatch.setattr(engine.model.backend, "decode_greedy", no_logits)
    schema = {"type": "object", "required": ["a"], "additionalProperties": False,
              "properties": {"a": {"type": "boolean"}}}
    spec = GrammarSpec.json_schema(engine.tokenizer, schema)
    text = "".join(e.text for e in engine.generate(engine.chat_ids([{"role": "user", "content": "hi"}]),
                                                   SamplingParams(temperature=0, grammar=spec), max_tokens=16))
    assert json.loads(text) in ({"a": True}, {"a": False})


def test_history_arguments_that_are_not_json_reach_the_template_as_text():
    msg = {"role": "assistant", "content": None,
           "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "x=1"}}]}
    assert structured.template_message(msg, None)["tool_calls"][0]["function"]["arguments"] == "x=1"


def test_null_content_reaches_the_template_as_empty_text():
    assert structured.template_message({"role": "developer", "content": None}, None) == {
        "role": "developer", "content": ""}
