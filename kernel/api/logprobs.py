"""`logprobs` in requests and responses, in OpenAI's two shapes.

Requests: chat asks with `logprobs: true` and `top_logprobs: 0..20` (top_logprobs
without logprobs is a 400, as at OpenAI); completions ask with `logprobs: 0..5`, the
number of alternatives.  Either becomes the engine's `SamplingParams.logprobs` (k).

Responses (values from `llama_core.logprobs`: the log-softmax of the model's logits
before penalties and temperature; one entry per generated token, an end-of-text
token excepted):
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}]}`;
- completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
  "text_offset"}`, text_offset counting characters from the start of the generated
  text (no prompt echo here) and continuing across the chunks of a stream.
A token holding part of a UTF-8 character shows U+FFFD in `token`; `bytes` is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from ukgpu.kernel.api.engine_protocol import TokenLogprob
from ukgpu.kernel.api.errors import bad_request


def asked(chat: bool, body: dict) -> int | None:
    """How many alternatives the request asks for, or None when it asks for no logprobs."""
    if not chat:
        return body.get("logprobs")
    top = body.get("top_logprobs")
    if not body.get("logprobs"):
        if top is not None:
            raise bad_request("'top_logprobs' needs 'logprobs': true; send both or neither.",
                              "top_logprobs", "invalid_value")
        return None
    return top or 0


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_block(entries: Sequence[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`."""
    def one(token: bytes, logprob: float) -> dict:
        return {"token": _text(token), "logprob": logprob, "bytes": list(token)}

    return {"content": [{**one(e.token, e.logprob),
                         "top_logprobs": [one(a.token, a.logprob) for a in e.top]}
                        for e in entries]}


def text_length(entries: Sequence[TokenLogprob]) -> int:
    """Characters the entries' tokens take in `tokens` (what text_offset counts)."""
    return sum(len(_text(e.token)) for e in entries)


def completion_block(entries: Sequence[TokenLogprob], offset: int) -> dict:
    """A completion choice's `logprobs`; `offset`: characters of generated text before these."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(_text(e.token))
    return {"tokens": [_text(e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(a.token): a.logprob for a in e.top} for e in entries],
            "text_offset": offsets}
