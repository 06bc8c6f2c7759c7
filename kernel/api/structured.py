"""`response_format`: output constrained to JSON, on /v1/chat/completions and (an extension)
/v1/completions.

    {"type": "text"}                      no constraint (the default)
    {"type": "json_object"}               any JSON object
    {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}, "strict": true}}
                                          JSON that validates against `schema`

The schema is compiled into a grammar (`llama_core.grammar`, llguidance) whose mask the
sampler applies before every token, so even greedy output from a small model parses and
validates; generation ends with finish_reason "stop" when the JSON is complete.  A schema
the compiler cannot honour (an unresolvable $ref, an unimplemented keyword) is a 400
naming `response_format`, never silently loosened.  Compiling runs in a request thread.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from ukgpu.kernel.api.errors import bad_request

MAX_SCHEMA_CHARS = 32_768  # the schema as compact JSON; bounds compile time and memory
_PARAM = "response_format"


def response_format_property() -> dict:
    """The request schema of `response_format` (validated and published in /openapi.json)."""
    json_schema = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "description": {"type": "string"},
            "schema": {"type": "object", "x-max-chars": MAX_SCHEMA_CHARS,
                       "description": f"A JSON Schema, at most {MAX_SCHEMA_CHARS} characters as JSON."},
            "strict": {"type": ["boolean", "null"]},
        },
    }
    return {
        "type": ["object", "null"],
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
            "json_schema": json_schema,
        },
        "description": "Constrain the output to JSON: any object (json_object) or one that "
                       "validates against a schema (json_schema).",
    }


def constrain(engine: Any, body: dict, params: Any) -> Any:
    """`params` (SamplingParams) with the grammar `response_format` asks for; a 400 naming
    response_format when its schema is too large or cannot be compiled."""
    functions = _called_functions(body)
    if functions is not None:
        return dataclasses.replace(params, grammar=_tool_grammar(engine, functions))
    fmt = body.get(_PARAM) or {"type": "text"}
    if fmt["type"] == "text":
        return params
    schema = None
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if spec is None:
            raise bad_request("response_format of type json_schema needs a 'json_schema' object "
                              "with 'name' and 'schema'.", f"{_PARAM}.json_schema", "missing_required_parameter")
        schema = spec.get("schema") or {}
        size = len(json.dumps(schema, separators=(",", ":")))
        if size > MAX_SCHEMA_CHARS:
            raise bad_request(f"response_format.json_schema.schema is {size} characters as JSON; the "
                              f"limit is {MAX_SCHEMA_CHARS}: simplify the schema.",
                              f"{_PARAM}.json_schema.schema", "schema_too_large")
    return dataclasses.replace(params, grammar=_grammar(engine, schema))


def _grammar(engine: Any, schema: dict | None) -> Any:
    from ukgpu.llama_core.grammar import GrammarError, GrammarSpec

    try:
        return GrammarSpec.json_schema(engine.tokenizer, schema)
    except GrammarError as exc:
        raise bad_request(f"response_format cannot be used: {exc}. Remove or rewrite the schema "
                          "features named there.", _PARAM, "unsupported_schema") from None


# --- tools -----------------------------------------------------------------
# `tools` are rendered by the model's own chat template (its `tools` variable) and the reply is
# parsed in the family's format (`llama_core.text.tool_calls`) into message.tool_calls, with
# finish_reason "tool_calls".  tool_choice "none" leaves the reply as text; "required" or a
# named function constrains it with a grammar to one call whose arguments validate.

MAX_TOOLS = 32


def tools_properties() -> dict:
    """Request schemas of `tools` and `tool_choice` (chat only)."""
    function = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "description": {"type": "string", "maxLength": 4096},
            "parameters": {"type": "object", "description": "A JSON Schema of the arguments."},
            "strict": {"type": ["boolean", "null"]},
        },
    }
    tool = {"type": "object", "required": ["type", "function"],
            "properties": {"type": {"type": "string", "enum": ["function"]}, "function": function}}
    named = {"type": "object", "required": ["type", "function"],
             "properties": {"type": {"type": "string", "enum": ["function"]},
                            "function": {"type": "object", "required": ["name"],
                                         "properties": {"name": {"type": "string"}}}}}
    return {
        "tools": {"type": ["array", "null"], "items": tool, "maxItems": MAX_TOOLS},
        "tool_choice": {"anyOf": [{"type": "null"},
                                  {"type": "string", "enum": ["none", "auto", "required"]}, named],
                        "x-hint": 'Send "none", "auto", "required" or '
                                  '{"type": "function", "function": {"name": ...}}.'},
    }


def message_tool_properties() -> dict:
    """Message fields of a tool-calling history: an assistant's tool_calls, a tool's call id."""
    call = {"type": "object", "required": ["function"],
            "properties": {"id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
                           "function": {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string"},
                                                       "arguments": {"type": "string"}}}}}
    return {"tool_calls": {"type": ["array", "null"], "items": call, "maxItems": MAX_TOOLS},
            "tool_call_id": {"type": ["string", "null"]}}


def tools_on(body: dict) -> bool:
    """Whether the reply is parsed for tool calls."""
    return bool(body.get("tools")) and body.get("tool_choice") != "none"


def template_message(message: dict, content: str | None) -> dict:
    """A request message as chat templates read it: text content ("" for null), tool calls with
    their arguments as objects (the templates serialize them with tojson), a tool result with
    its call id."""
    out: dict = {"role": message["role"], "content": content or ""}  # templates concatenate it
    if message.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": {
            "name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}}
            for c in message["tool_calls"]]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _arguments(raw: Any) -> Any:
    """JSON text as the object it holds; other text as given (the template prints it)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw if raw is not None else {}


def template_context(body: dict) -> dict:
    """Extra chat template variables: the function definitions under `tools`."""
    return {"tools": body["tools"]} if body.get("tools") else {}


def _called_functions(body: dict) -> list[dict] | None:
    """The functions the reply must call one of (None: the reply is free)."""
    choice, tools = body.get("tool_choice"), body.get("tools") or []
    if "messages" not in body or choice in (None, "none", "auto"):  # chat fields only
        return None
    if not tools:
        raise bad_request("tool_choice 'required' or a named function needs the functions in "
                          "'tools'; send tools or omit tool_choice.", "tool_choice", "invalid_value")
    functions = [t["function"] for t in tools]
    if choice == "required":
        return functions
    named = [f for f in functions if f["name"] == choice["function"]["name"]]
    if not named:
        raise bad_request(f"tool_choice names the function '{choice['function']['name']}', which is "
                          "not in tools.", "tool_choice", "invalid_value")
    return named


def tool_message(message: dict, text: str) -> str | None:
    """Fill an assistant message from the reply; returns finish_reason "tool_calls" when the
    reply called a tool (message.tool_calls set, content null), else None."""
    from ukgpu.llama_core.text.tool_calls import parse

    content, calls = parse(text)
    if not calls:
        return None
    message["content"] = content or None
    message["tool_calls"] = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return "tool_calls"


def _tool_grammar(engine: Any, functions: list[dict]) -> Any:
    from ukgpu.llama_core.grammar import GrammarError, GrammarSpec
    from ukgpu.llama_core.text.tool_calls import grammar_lark

    try:
        return GrammarSpec(engine.tokenizer, grammar_lark(functions))
    except GrammarError as exc:
        raise bad_request(f"A function's parameters schema cannot be used: {exc}.", "tools",
                          "unsupported_schema") from None


def final_delta(text: str) -> tuple[dict, str | None]:
    """The delta of a whole reply judged at once (`tool_stream`, for a reply that opened with "{"):
    `delta.tool_calls` (each with its index, id, name and all its arguments) and "tool_calls", or
    the text as content."""
    message: dict = {"content": text}
    called = tool_message(message, text)
    if called is None:
        return ({"content": text} if text else {}), None
    calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    return ({"content": message["content"], "tool_calls": calls} if message["content"]
            else {"tool_calls": calls}), called
