"""The validator and the schemas it shares with the OpenAPI document."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ukgpu.kernel.api import ApiLimits, openapi, schema
from ukgpu.kernel.api.errors import ApiError
from ukgpu.kernel.api.validate import validate

FACTS = schema.ModelFacts("m", n_ctx=128, vocab_size=100)
LIMITS = ApiLimits(max_tokens=64, max_prompt_chars=50)
COMPLETION = schema.completion_request(FACTS, LIMITS)


def rejects(body) -> ApiError:
    with pytest.raises(ApiError) as info:
        validate(COMPLETION, body)
    assert info.value.status == 400
    return info.value


def test_defaults_fill_absent_and_null_fields():
    out = validate(COMPLETION, {"model": "m", "prompt": "hi", "temperature": None})
    assert out["temperature"] == 1.0 and out["top_k"] == 0 and out["n"] == 1
    assert out["stream"] is False and out["repeat_penalty"] == 1.0
    assert "max_tokens" not in out  # filled later from the room left in the context


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True),  # booleans are not integers
    ("max_tokens", 1.5),
    ("max_tokens", 0),
    ("max_tokens", 65),  # above the cap
    ("temperature", "hot"),
    ("temperature", 2.5),
    ("top_p", -0.1),
    ("top_p", 0.0),  # exclusive minimum, as the sampler wants
    ("repeat_penalty", 0.0),  # exclusive minimum
    ("seed", -1),
    ("stop", ["a", ""]),
    ("prompt", ["a", "b"]),  # one prompt per request
    ("prompt", [100]),  # outside the vocabulary
    ("prompt", "x" * 51),  # over max_prompt_chars
    ("prompt", []),
])
def test_out_of_schema_values_name_their_field(field, value):
    err = rejects({"model": "m", "prompt": "hi", field: value})
    assert err.param == field or err.param.startswith(field)
    assert f"'{field}" in err.message


def test_missing_required_field_is_named():
    assert rejects({"model": "m"}).param == "prompt"


def test_n_is_bounded():
    assert rejects({"model": "m", "prompt": "x", "n": schema.MAX_CHOICES + 1}).param == "n"
    assert validate(COMPLETION, {"model": "m", "prompt": "x", "n": schema.MAX_CHOICES})["n"] == schema.MAX_CHOICES
    two_slots = schema.completion_request(schema.ModelFacts("m", 128, 100, n_slots=2), ApiLimits())
    assert two_slots["properties"]["n"]["maximum"] == 2  # each choice takes a slot


def test_prompt_forms_accepted():
    for prompt in ("text", ["text"], [1, 2, 99]):
        assert validate(COMPLETION, {"model": "m", "prompt": prompt})["prompt"] == prompt


def test_chat_content_parts_and_roles():
    chat = schema.chat_request(FACTS, LIMITS)
    ok = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    assert validate(chat, ok)["messages"][0]["content"][0]["text"] == "a"
    with pytest.raises(ApiError) as info:
        validate(chat, {"model": "m", "messages": [{"role": "robot", "content": "a"}]})
    assert info.value.param == "messages[0].role"


def test_openapi_publishes_the_validating_schemas():
    doc = openapi.build(FACTS, LIMITS)
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == COMPLETION
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    assert chat["application/json"]["schema"] == schema.chat_request(FACTS, LIMITS)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(COMPLETION["properties"])), json_values, max_size=6))
def test_any_json_either_validates_or_raises_a_400(body):
    try:
        validate(COMPLETION, body)
    except ApiError as err:
        assert err.status == 400 and err.message


def test_integral_floats_count_as_integers():
    out = validate(COMPLETION, {"model": "m", "prompt": [1.0, 2], "max_tokens": 4.0})
    assert out["max_tokens"] == 4 and isinstance(out["max_tokens"], int)
    assert out["prompt"] == [1, 2] and all(isinstance(i, int) for i in out["prompt"])
