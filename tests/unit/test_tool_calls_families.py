"""Tool calls in the output formats of the model families beyond Qwen's <tool_call> blocks."""

from __future__ import annotations

import pytest

from ukgpu.llama_core.text.tool_calls import ToolCall, parse


def test_llama3_bare_call_with_parameters():
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parse(text) == ("", [ToolCall("get_weather", '{"city": "Paris"}')])


def test_mistral_call_list_with_or_without_its_marker():
    calls = '[{"name": "add", "arguments": {"a": 1}}, {"name": "now", "arguments": {}}]'
    expected = ("", [ToolCall("add", '{"a": 1}'), ToolCall("now", "{}")])
    assert parse(calls) == expected
    assert parse("[TOOL_CALLS]" + calls) == expected


@pytest.mark.parametrize("text", [
    '[{"name": "add", "arguments": {"a": 1}}, {"arguments": {}}]',  # one entry is not a call
    '[]  "arguments"', '["parameters"]', '{"parameters": {"a": 1}}', '[{"name": "f", "parameters": 3}]',
])
def test_partial_or_malformed_lists_stay_text(text):
    assert parse(text) == (text.strip(), [])
