"""Tool calls in generated text: the model family's own format, parsed into OpenAI's shape.

Qwen2.5 (and the Hermes format it follows) writes each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

as its chat template tells it to (a reply that is only such an object, the tags left out,
counts too).  Llama 3.x answers with the bare object and names the arguments "parameters";
Mistral writes a JSON list of calls after its [TOOL_CALLS] control token (which decoding
leaves out of the text): a reply that is only such a list counts as well.

`parse` returns the text outside the calls and the calls, each with its arguments
re-serialized as a JSON string (OpenAI's `function.arguments`).  A block that is not a JSON
object with a string "name" stays text: the caller then answers with content, as for any
other reply.  `grammar_lark` is the same format as a grammar, for tool_choice "required" or
a named function: one call whose arguments validate against the function's parameters schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object as text


def parse(text: str) -> tuple[str, list[ToolCall]]:
    """(text outside the calls, stripped; the calls in order)."""
    calls: list[ToolCall] = []
    rest: list[str] = []
    last = 0
    for block in _BLOCK.finditer(text):
        call = _call(block.group(1))
        if call is None:
            continue
        rest.append(text[last:block.start()])
        last = block.end()
        calls.append(call)
    rest.append(text[last:])
    if not calls and ('"arguments"' in text or '"parameters"' in text):  # bare calls, no tags
        bare = _bare_calls(text.strip().removeprefix("[TOOL_CALLS]"))
        return ("", bare) if bare else (text.strip(), [])
    return "".join(rest).strip(), calls


def _bare_calls(text: str) -> list[ToolCall]:
    """One call object or a non-empty list of them (every one valid), else []."""
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            return []
        if not isinstance(items, list):
            return []
        calls = [_call(json.dumps(item)) for item in items]
        return [c for c in calls if c is not None] if calls and None not in calls else []
    call = _call(text)
    return [call] if call is not None else []


def _call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def grammar_lark(functions: list[dict[str, Any]]) -> str:
    """A llguidance Lark grammar: exactly one call of one of `functions` (OpenAI function
    definitions: name, parameters), its arguments valid against the parameters schema."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or {"type": "object"}}}
               for f in functions]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}\n'
