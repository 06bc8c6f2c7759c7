"""What the API needs to know about a loaded `llama_core.engine.Engine`, in one place."""

from __future__ import annotations

from typing import Any

from ukgpu.kernel.api.errors import bad_request
from ukgpu.kernel.api.schema import ModelFacts


def model_facts(engine: Any, model_id: str) -> ModelFacts:
    return ModelFacts(model_id=model_id, n_ctx=int(engine.n_ctx), vocab_size=vocab_size(engine))


def vocab_size(engine: Any) -> int | None:
    size = getattr(engine.tokenizer, "vocab_size", None)
    return int(size) if size is not None else None


def slot_count(engine: Any) -> int:
    return int(engine.n_slots)


def render_chat(engine: Any, messages: list[dict]) -> str:
    """The model's own chat template applied to `messages`; a template refusal is a 400."""
    from ukgpu.llama_core.text.chat import ChatTemplateError, render_chat as render

    try:
        return render(engine.gguf, messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise bad_request(f"The model's chat template refused the messages: {exc}", "messages",
                          "chat_template_error") from None


def sampling_params(body: dict) -> Any:
    """The engine's SamplingParams; values the sampler refuses are a 400."""
    from ukgpu.llama_core.sampling import SamplingError, SamplingParams

    try:
        return _params(SamplingParams, body)
    except SamplingError as exc:
        raise bad_request(f"Invalid sampling parameters: {exc}", code="invalid_value") from None


def _params(SamplingParams: type, body: dict) -> Any:
    return SamplingParams(
        temperature=float(body["temperature"]),
        top_k=int(body["top_k"]),
        top_p=float(body["top_p"]),
        min_p=float(body["min_p"]),
        presence_penalty=float(body["presence_penalty"]),
        frequency_penalty=float(body["frequency_penalty"]),
        repeat_penalty=float(body["repeat_penalty"]),
        seed=body.get("seed"),
    )
