"""response_format through the official `openai` client against the real SmolLM2-135M model.

Greedy answers under a json_schema always parse and validate, for schemas of every kind
the API promises (nested objects, arrays, enums, bounded numbers, ...): the grammar masks
the logits before each token.  Strings and arrays are bounded so each answer closes well
within max_tokens (a cut answer would be incomplete JSON, finish_reason "length").
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from ukgpu.kernel.api import ApiLimits, create_app
from ukgpu.kernel.api.server import background

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m"
MAX_TOKENS = 96
ASK = [{"role": "user", "content": "Describe a cat as JSON."}]
_NAME = {"type": "string", "maxLength": 12}

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": _NAME, "age": {"type": "integer"}},
             "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["black", "white", "orange"]}},
             "required": ["color"], "additionalProperties": False},
    "bounded_numbers": {"type": "object", "additionalProperties": False, "required": ["weight", "lives"],
                        "properties": {"weight": {"type": "number", "minimum": 1.5, "maximum": 9},
                                       "lives": {"type": "integer", "minimum": 1, "maximum": 9}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["cat"],
               "properties": {"cat": {"type": "object", "additionalProperties": False,
                                      "required": ["name", "owner"],
                                      "properties": {"name": _NAME, "owner": {
                                          "type": "object", "additionalProperties": False,
                                          "required": ["name"], "properties": {"name": _NAME}}}}}},
    "array_of_enums": {"type": "object", "additionalProperties": False, "required": ["toys"],
                       "properties": {"toys": {"type": "array", "minItems": 1, "maxItems": 3,
                                               "items": {"enum": ["ball", "mouse", "box"]}}}},
    "array_of_objects": {"type": "object", "additionalProperties": False, "required": ["kittens"],
                         "properties": {"kittens": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                             "type": "object", "additionalProperties": False, "required": ["name"],
                             "properties": {"name": _NAME}}}}},
    "boolean_and_null": {"type": "object", "additionalProperties": False, "required": ["indoor", "chip"],
                         "properties": {"indoor": {"type": "boolean"}, "chip": {"type": "null"}}},
    "any_of": {"type": "object", "additionalProperties": False, "required": ["id"],
               "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                                               {"type": "string", "maxLength": 6}]}}},
    "string_pattern": {"type": "object", "additionalProperties": False, "required": ["born"],
                       "properties": {"born": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}},
    "defs_ref": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                 "$defs": {"pet": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"name": _NAME}}},
                 "properties": {"a": {"$ref": "#/$defs/pet"}, "b": {"$ref": "#/$defs/pet"}}},
}


@pytest.fixture(scope="module")
def oai(smollm2_path):
    from ukgpu.llama_core.engine import Engine

    engine = Engine.load(smollm2_path, backend="cpu", n_ctx=512, n_slots=1)
    with background(create_app(engine, ApiLimits(), model_id=MODEL)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        yield client
        client.close()


def _fmt(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_greedy_answer_validates_against_its_schema(oai, name):
    reply = oai.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=MAX_TOKENS,
                                        response_format=_fmt(name))
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_stream_equals_the_whole_answer(oai):
    args = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=MAX_TOKENS, response_format=_fmt("nested"))
    whole = oai.chat.completions.create(**args).choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole), SCHEMAS["nested"])


def test_json_object_is_an_object_even_sampled(oai):
    reply = oai.chat.completions.create(model=MODEL, messages=ASK, temperature=0.9, seed=7, max_tokens=MAX_TOKENS,
                                        response_format={"type": "json_object"})
    choice = reply.choices[0]
    if choice.finish_reason == "stop":  # a sampled object may run past the budget; when it closes it parses
        assert isinstance(json.loads(choice.message.content), dict)
    assert choice.message.content.startswith("{")


def test_completions_take_response_format_too(oai):
    reply = oai.completions.create(model=MODEL, prompt="A cat as JSON:", temperature=0, max_tokens=MAX_TOKENS,
                                   extra_body={"response_format": _fmt("enum")})
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMAS["enum"])


def test_unsupported_schema_is_400_naming_response_format(oai):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, response_format=bad)
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4,
                                    response_format={"type": "yaml"})  # type: ignore[arg-type]
    assert info.value.body["param"] == "response_format.type"


# --- tools (Qwen2.5-Coder-0.5B: its chat template renders tools) ------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "string", "maxLength": 20}}}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen(qwen05_path):
    from ukgpu.llama_core.engine import Engine

    engine = Engine.load(qwen05_path, backend="cpu", n_ctx=1024, n_slots=1)
    with background(create_app(engine, ApiLimits(), model_id="qwen")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=180)
        yield client
        client.close()


def _one_call(choice, tool):
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    return call


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_constrained_tool_call_validates(qwen, tool_choice):
    reply = qwen.chat.completions.create(model="qwen", messages=WEATHER_ASK, tools=[WEATHER, TIME],
                                         tool_choice=tool_choice, temperature=0, max_tokens=60)
    _one_call(reply.choices[0], TIME if isinstance(tool_choice, dict) else WEATHER)


def test_streamed_tool_call_and_the_answer_after_it(qwen):
    chunks = list(qwen.chat.completions.create(model="qwen", messages=WEATHER_ASK, tools=[WEATHER],
                                               tool_choice="required", temperature=0, max_tokens=60,
                                               stream=True, logprobs=True))
    calls = [c for ch in chunks if ch.choices for c in (ch.choices[0].delta.tool_calls or [])]
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content or []]
    assert streamed  # every token's logprob arrives with the delta that settles it
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    args = json.loads(calls[0].function.arguments)
    history = WEATHER_ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0].id, "type": "function",
             "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature_c": 21, "sky": "clear"}'}]
    reply = qwen.chat.completions.create(model="qwen", messages=history, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=40)
    assert args["city"] and reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    assert "21" in reply.choices[0].message.content  # the tool's result reached the prompt


def test_auto_tool_choice_parses_the_models_own_call(qwen):
    """Unconstrained: the model writes the call in its template's format, which is parsed."""
    reply = qwen.chat.completions.create(model="qwen", messages=WEATHER_ASK, tools=[WEATHER],
                                         temperature=0, max_tokens=60)
    assert _one_call(reply.choices[0], WEATHER).function.arguments
