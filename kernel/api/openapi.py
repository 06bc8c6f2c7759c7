"""The OpenAPI 3.1 document, assembled from the request schemas in `schema`."""

from __future__ import annotations

from typing import Any

from ukgpu.kernel.api import embeddings, schema
from ukgpu.kernel.api.limits import ApiLimits
from ukgpu.kernel.api.schema import ModelFacts

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_COUNT = {"type": "integer", "minimum": 0}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT,
        "prompt_tokens_details": {  # prompt tokens reused from a slot's KV cache, not evaluated
            "type": "object", "required": ["cached_tokens"], "properties": {"cached_tokens": _COUNT}},
    },
}
_FINISH = {"type": "string", "enum": ["stop", "length"]}
_SSE_EVENT = {  # one server-sent event; `data` is a JSON chunk, an error, or [DONE]
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string", "enum": ["message"]}},
}
_ERROR_TEXT = {
    400: "Invalid request (JSON, types, ranges, prompt longer than the context).",
    404: "Unknown model or path.",
    413: "Request body larger than the server's limit.",
    429: "Request queue full; retry later.",
    500: "The engine failed on this request; the server stays up.",
    503: "Model still loading (or failed to load).",
}


def _json(schema_: dict) -> dict:
    return {"application/json": {"schema": schema_}}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": _ERROR_TEXT[c], "content": _json(_ERROR)} for c in codes}


def _result(object_name: str, choice: dict) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": [object_name]},
            "created": _COUNT,
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice, "minItems": 1,
                        "maxItems": schema.MAX_CHOICES},  # n of them
            "usage": _USAGE,
        },
    }


def _choice(extra: dict) -> dict:
    props = {"index": {"type": "integer", "minimum": 0, "maximum": schema.MAX_CHOICES - 1},
             "finish_reason": _FINISH, **extra}
    return {"type": "object", "required": sorted(props), "properties": props}


def _generation(summary: str, request: dict, result: dict) -> dict:
    ok = {
        "description": "The generated text; with stream=true, server-sent events ending in [DONE].",
        "content": {**_json(result), "text/event-stream": {"schema": _SSE_EVENT}},
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {"200": ok, **_errors(400, 404, 413, 429, 500, 503)},
        }
    }


def _simple(method: str, summary: str, ok: dict, request: dict | None = None, errors=()) -> dict:
    op: dict[str, Any] = {"summary": summary,
                          "responses": {"200": {"description": "OK", "content": ok}}}
    if request is not None:
        op["requestBody"] = {"required": True, "content": _json(request)}
    op["responses"].update(_errors(*errors))
    return {method: op}


def _health() -> dict:
    body = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["loading", "ready", "failed"]},
                       "backend": {"type": "string"},  # "cpu", "cuda" (once ready)
                       "backend_note": {"type": "string"}},  # why that one
    }
    ok = {"description": "Ready", "content": _json(body)}
    busy = {"description": "Loading or failed", "content": _json(body)}
    return {"get": {"summary": "Liveness and readiness", "responses": {"200": ok, "503": busy}}}


def _models_list() -> dict:
    model = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["model"]},
            "created": _COUNT,
            "owned_by": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": model},
        },
    }


def _embeddings_list() -> dict:
    vector = {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}
    item = {"type": "object", "required": ["object", "index", "embedding"],
            "properties": {"object": {"type": "string", "enum": ["embedding"]}, "index": _COUNT,
                           "embedding": vector}}  # base64: little-endian float32
    usage = {"type": "object", "required": ["prompt_tokens", "total_tokens"],
             "properties": {"prompt_tokens": _COUNT, "total_tokens": _COUNT}}
    return {"type": "object", "required": ["object", "data", "model", "usage"],
            "properties": {"object": {"type": "string", "enum": ["list"]},
                           "data": {"type": "array", "items": item}, "model": {"type": "string"},
                           "usage": usage}}


def build(facts: ModelFacts, limits: ApiLimits) -> dict:
    completion = _result("text_completion", _choice({"text": {"type": "string"}}))
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string"}},
    }
    chat = _result("chat.completion", _choice({"message": message}))
    tokens = {"type": "object", "required": ["tokens"],
              "properties": {"tokens": {"type": "array", "items": _COUNT}}}
    content = {"type": "object", "required": ["content"], "properties": {"content": {"type": "string"}}}
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths = {
        "/v1/completions": _generation(
            "Complete a prompt", schema.completion_request(facts, limits), completion),
        "/v1/chat/completions": _generation(
            "Answer a conversation (the model's chat template)",
            schema.chat_request(facts, limits), chat),
        "/v1/embeddings": _simple("post", "Embed texts or token ids (pooled, unit length)",
                                  _json(_embeddings_list()),
                                  embeddings.request_schema(facts, limits), (400, 413, 429, 500, 503)),
        "/v1/models": _simple("get", "The served model", _json(_models_list())),
        "/health": _health(),
        "/metrics": _simple("get", "Prometheus metrics", text),
        "/tokenize": _simple("post", "Text to token ids", _json(tokens),
                             schema.tokenize_request(limits), (400, 413, 503)),
        "/detokenize": _simple("post", "Token ids to text", _json(content),
                               schema.detokenize_request(facts), (400, 413, 503)),
        "/openapi.json": _simple("get", "This document", _json({"type": "object"})),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "ukgpu OpenAI-compatible API", "version": "1"},
        "paths": paths,
    }
