"""ToolStream: a chat reply with tools on streams its text as it settles and each tool call when
its block closes, and the deltas add up to what the non-streamed message says."""

import json
import random

import pytest

from ukgpu.kernel.api import structured
from ukgpu.kernel.api.tool_stream import ToolStream

CALL_A = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_B = '<tool_call>{"name": "time", "parameters": {"tz": "UTC"}}</tool_call>'


def run(text: str, cuts: list[int]) -> list[tuple[int, list[dict]]]:
    """Feed growing prefixes of text; (chars fed, deltas) per feed, the last one with done."""
    stream, out = ToolStream(), []
    for cut in [*cuts, len(text)]:
        out.append((cut, stream.feed(text[:cut], done=cut == len(text))))
    return out


def assemble(steps) -> tuple[str, list[dict]]:
    content, calls = "", []
    for _, deltas in steps:
        for d in deltas:
            content += d.get("content") or ""
            calls += d.get("tool_calls", [])
    return content, calls


def expected(text: str) -> tuple[str, list[tuple[str, str]]]:
    message: dict = {"content": text}
    structured.tool_message(message, text)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    return message["content"] or "", calls


@pytest.mark.parametrize("text", [
    "Just an answer, no tools.",
    "Let me look that up.\n" + CALL_A,
    CALL_A + "\n" + CALL_B,
    "Checking.\n" + CALL_A + "\n" + CALL_B + "\n",
    '{"name": "weather", "arguments": {"city": "Oslo"}}',
    '{"name": "weather", "parameters": {"city": "Rome"}}',
    '[{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "time", "arguments": {}}]',
    "[1, 2, 3] is a list",
    "Use <tool_call> tags like this: <tool_call>not json</tool_call> done",
    "a <tool_call> that never closes",
    "x < y and <tool is not a tag",
])
def test_deltas_add_up_to_the_message(text):
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(8, len(text) - 1)))
        content, calls = assemble(run(text, cuts))
        want_content, want_calls = expected(text)
        assert content.strip() == want_content.strip()
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == want_calls
        assert [c["index"] for c in calls] == list(range(len(calls)))
        assert len({c["id"] for c in calls}) == len(calls)


def test_text_and_each_call_stream_before_the_reply_ends():
    text = "Checking.\n" + CALL_A + "\n" + CALL_B
    first_close = text.index("</tool_call>") + len("</tool_call>")
    steps = run(text, list(range(1, len(text))))
    content_at = next(cut for cut, ds in steps if any(d.get("content") for d in ds))
    call_at = [cut for cut, ds in steps for d in ds if "tool_calls" in d]
    assert content_at < text.index("<tool_call>") + 1
    assert call_at[0] == first_close and call_at[1] == len(text)
    stream = ToolStream()
    stream.feed(text, done=True)
    assert stream.finish_reason("stop") == "tool_calls"
    assert json.loads(assemble(steps)[1][0]["function"]["arguments"]) == {"city": "Paris"}


def test_a_possible_opening_tag_is_held_until_settled():
    stream = ToolStream()
    assert stream.feed("see <tool", done=False) == [{"content": "see "}]
    assert stream.feed("see <tools> here", done=False) == [{"content": "<tools> here"}]
    assert stream.finish_reason("length") == "length"


def test_a_reply_opening_with_a_brace_is_judged_whole():
    stream = ToolStream()
    assert stream.feed('{"name": "weather", "argu', done=False) == []
    deltas = stream.feed('{"name": "weather", "arguments": {}}', done=True)
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "weather"
    plain = ToolStream()
    assert plain.feed("{not a call}", done=True) == [{"content": "{not a call}"}]
