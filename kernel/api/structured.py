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
