"""The API's request and response schemas and the OpenAPI document built from them.

The request schemas are what `validate.validate` checks, so the published
document and the server's behaviour cannot drift apart.  Schemas depend on
the loaded model (context size, vocabulary size, model id) and the limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ukgpu.kernel.api import unsupported
from ukgpu.kernel.api.limits import ApiLimits
from ukgpu.kernel.api.structured import message_tool_properties, response_format_property, tools_properties

MAX_CHOICES = 8  # n: choices per request (each takes a KV slot; more than the engine has is a 400)


@dataclass(frozen=True)
class ModelFacts:
    model_id: str
    n_ctx: int | None = None  # None while the model is loading
    vocab_size: int | None = None
    n_slots: int | None = None  # bounds n (choices run at once, one slot each)


def _int(lo: int, hi: int | None = None, *, nullable: bool = False, **extra) -> dict:
    schema = {"type": ["integer", "null"] if nullable else "integer", "minimum": lo, **extra}
    if hi is not None:
        schema["maximum"] = hi
    return schema


def _num(lo: float, hi: float, default: float, **extra) -> dict:
    return {"type": ["number", "null"], "minimum": lo, "maximum": hi, "default": default, **extra}


def _text(limits: ApiLimits, **extra) -> dict:
    schema = {"type": "string", "minLength": 1, **extra}
    if limits.max_prompt_chars is not None:
        schema["maxLength"] = limits.max_prompt_chars
    return schema


def _token_ids(facts: ModelFacts) -> dict:
    """Ids in the vocabulary; how many fit the context is the engine's to say (Engine.room),
    for token ids as for text, with the same context_length_exceeded error."""
    item = _int(0, facts.vocab_size - 1 if facts.vocab_size else None)
    return {"type": "array", "items": item, "minItems": 1}


def max_tokens_cap(facts: ModelFacts, limits: ApiLimits) -> int | None:
    """The largest max_tokens a request may name (a limit, not the context check: a larger
    one than the prompt leaves room for is clipped to the room)."""
    caps = [c for c in (limits.max_tokens, facts.n_ctx) if c is not None]
    return min(caps) if caps else None


def sampling_properties(facts: ModelFacts, limits: ApiLimits) -> dict:
    cap = max_tokens_cap(facts, limits)
    stop_text = {"type": "string", "minLength": 1, "maxLength": 256}
    return {
        "model": {"type": "string", "enum": [facts.model_id]},
        "max_tokens": _int(1, cap, nullable=True, description="Tokens to generate at most."),
        "temperature": _num(0.0, 2.0, 1.0, description="0 samples greedily."),
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0.0, "maximum": 1.0,
                  "default": 1.0},
        "top_k": _int(0, nullable=True, default=0, description="0 disables top-k."),
        "min_p": _num(0.0, 1.0, 0.0),
        "presence_penalty": _num(-2.0, 2.0, 0.0),
        "frequency_penalty": _num(-2.0, 2.0, 0.0),
        "repeat_penalty": {
            "type": ["number", "null"], "exclusiveMinimum": 0.0, "maximum": 10.0, "default": 1.0,
            "description": "Divides the logits of recent tokens; 1 disables it.",
        },
        "seed": _int(0, 2**63 - 1, nullable=True),
        "stop": {
            "anyOf": [
                {"type": "null"},
                stop_text,
                {"type": "array", "items": stop_text, "maxItems": 4},
            ],
            "x-hint": "Send a non-empty string or a list of at most 4 non-empty strings.",
        },
        "n": _int(1, min(MAX_CHOICES, facts.n_slots or MAX_CHOICES, limits.max_queue), nullable=True, default=1,
                  description="Choices to generate, each in its own slot; at most the server's slots "
                              "and its queue depth.",
                  **{"x-hint": f"n is at most {MAX_CHOICES}, the server's slots and its queue depth "
                               "(each choice takes one of each); send a smaller n or restart it with "
                               "more --slots / --max-queue."}),
        "stream": {"type": ["boolean", "null"], "default": False},
        "stream_options": {
            "type": ["object", "null"],
            "properties": {"include_usage": {"type": "boolean", "default": False}},
        },
        "user": {"type": "string"},
        "response_format": response_format_property(),
    }


def completion_request(facts: ModelFacts, limits: ApiLimits) -> dict:
    prompt = {
        "anyOf": [
            _text(limits),
            {"type": "array", "items": _text(limits), "minItems": 1, "maxItems": 1},
            _token_ids(facts),
        ],
        "description": "Text, a list holding one text, or token ids.",
    }
    props = {**unsupported.completion_properties(),  # first: a field implemented later overrides
             "prompt": prompt, **sampling_properties(facts, limits),
             "logprobs": _int(0, 5, nullable=True,
                              description="Report each token's logprob and this many alternatives.")}
    return {"type": "object", "required": ["model", "prompt"], "properties": props}


def chat_request(facts: ModelFacts, limits: ApiLimits) -> dict:
    part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": _text(limits)},
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"anyOf": [_text(limits), {"type": "array", "items": part, "minItems": 1},
                                  {"type": "null"}]},  # null: an assistant message with tool_calls
            "name": {"type": "string"},
            **message_tool_properties(),
        },
    }
    props = {
        **unsupported.chat_properties(),  # first: a field implemented later overrides
        "messages": {"type": "array", "items": message, "minItems": 1, "maxItems": 256},
        **sampling_properties(facts, limits),
        "max_completion_tokens": _int(1, max_tokens_cap(facts, limits), nullable=True),
        "logprobs": {"type": ["boolean", "null"], "default": False,
                     "description": "Report each generated token's logprob."},
        "top_logprobs": _int(0, 20, nullable=True,
                             description="Alternatives per token (needs logprobs: true)."),
        **tools_properties(),
    }
    return {"type": "object", "required": ["model", "messages"], "properties": props}


def tokenize_request(limits: ApiLimits) -> dict:
    return {
        "type": "object",
        "required": ["content"],
        "properties": {
            "content": _text(limits, minLength=0),
            "add_special": {"type": "boolean", "default": False},
        },
    }


def detokenize_request(facts: ModelFacts) -> dict:
    ids = {"type": "array", "items": _token_ids(facts)["items"]}
    return {"type": "object", "required": ["tokens"], "properties": {"tokens": ids}}
