"""What the API asks a loaded engine (`engine_protocol.ServedEngine`), in one place, with the
engine's typed refusals turned into OpenAI-shaped 400s.

The engine owns the rules (its chat template, its context size, its sampler's ranges); these
helpers only translate.  llama_core is imported inside them, so the server can answer while
the model loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ukgpu.kernel.api.engine_protocol import ServedEngine
from ukgpu.kernel.api.errors import bad_request
from ukgpu.kernel.api.schema import ModelFacts


def model_facts(engine: ServedEngine, model_id: str) -> ModelFacts:
    return ModelFacts(model_id=model_id, n_ctx=int(engine.n_ctx), n_slots=int(engine.n_slots),
                      vocab_size=int(engine.tokenizer.vocab_size))


def chat_ids(engine: ServedEngine, messages: list[dict], **context: Any) -> list[int]:
    """The engine's chat prompt ids for `messages` (context: template variables such as
    tools); a template refusal is a 400."""
    from ukgpu.llama_core.text.chat import ChatTemplateError

    try:
        return list(engine.chat_ids(messages, **context))
    except ChatTemplateError as exc:
        raise bad_request(f"The model's chat template refused the messages: {exc}", "messages",
                          "chat_template_error") from None


def room(engine: ServedEngine, n_prompt: int, param: str) -> int:
    """Tokens the engine leaves for generation after the prompt; a prompt that leaves none is
    a 400 on `param` (what the client should shorten)."""
    from ukgpu.llama_core.engine import ContextFullError

    try:
        return engine.room(n_prompt)
    except ContextFullError as exc:
        raise bad_request(
            f"The prompt is {exc.prompt_tokens} tokens but the context holds {exc.n_ctx} "
            "(including at least one generated token); shorten it or restart with a larger --ctx.",
            param, "context_length_exceeded") from None


def sampling_params(body: dict, logprobs: int | None = None) -> Any:
    """The engine's SamplingParams (logprobs: alternatives per token, None for no logprobs);
    values the sampler refuses are a 400."""
    from ukgpu.llama_core.sampling import SamplingError, SamplingParams

    try:
        return _params(SamplingParams, body, logprobs)
    except SamplingError as exc:
        raise bad_request(f"Invalid sampling parameters: {exc}", code="invalid_value") from None


def seeded(params: Any, index: int) -> Any:
    """The SamplingParams of choice `index` of a request: seed + index when it has a seed."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def _params(SamplingParams: type, body: dict, logprobs: int | None) -> Any:
    return SamplingParams(
        temperature=float(body["temperature"]),
        top_k=int(body["top_k"]),
        top_p=float(body["top_p"]),
        min_p=float(body["min_p"]),
        presence_penalty=float(body["presence_penalty"]),
        frequency_penalty=float(body["frequency_penalty"]),
        repeat_penalty=float(body["repeat_penalty"]),
        seed=body.get("seed"),
        logprobs=logprobs,
    )
