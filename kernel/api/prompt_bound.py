"""Refuse a prompt that cannot fit the context before tokenizing it, in O(characters).

Tokenizing is pure Python: a 1 MB prompt costs tens of seconds of CPU and slows every other
client before the context check could refuse it.  A token covers at most `longest` characters
of text, the length of the longest vocabulary entry as stored: a byte-level BPE entry has one
stand-in character per byte (and a character is at least one byte), a SentencePiece entry one
character per character ("▁" for the space, "<0x0A>" longer than the byte it stands for), a
special token its own text ("<|im_start|>").  So a prompt of more than n_ctx * longest
characters needs more than n_ctx tokens and can never fit: refusing it by its length alone never
refuses a prompt that could fit.  For SmolLM2 (longest entry 81) and n_ctx 2048 the bound is
165,888 characters, checked by `len` before any tokenizing.

`ApiLimits.max_prompt_chars` (`serve --max-prompt-chars`) may set a lower bound; the default
is the one above, computed once when the model is attached (`with_prompt_bound`).  The check counts
the completion prompt's text, or the text of all chat messages together (the chat template only
adds tokens), and answers 400 `context_length_exceeded` naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ukgpu.kernel.api.errors import bad_request
from ukgpu.kernel.api.limits import ApiLimits


def longest_token_chars(tokenizer: Any) -> int | None:
    """The most characters one token may cover; None for a tokenizer without a vocabulary list."""
    tokens = getattr(tokenizer, "tokens", None)
    if not tokens:
        return None
    return max(len(text) for text in tokens)


def with_prompt_bound(limits: ApiLimits, n_ctx: int, tokenizer: Any) -> ApiLimits:
    """`limits` whose max_prompt_chars is at most n_ctx * the longest token (see above)."""
    longest = longest_token_chars(tokenizer)
    if longest is None:
        return limits
    bound = n_ctx * longest
    if limits.max_prompt_chars is not None and limits.max_prompt_chars <= bound:
        return limits
    return dataclasses.replace(limits, max_prompt_chars=bound)


def prompt_chars(chat: bool, body: dict) -> int:
    """Characters of prompt text in a request body, read before validation: shapes the schema
    will refuse count 0 here (a completion's list of prompts counts its longest)."""
    if not chat:
        prompt = body.get("prompt")
        texts = prompt if isinstance(prompt, list) else [prompt]
        return max((len(t) for t in texts if isinstance(t, str)), default=0)
    messages = body.get("messages")
    total = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [content]
        total += sum(len(p) for p in parts if isinstance(p, str))
        total += sum(len(p["text"]) for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def check_prompt_chars(chat: bool, body: dict, limits: ApiLimits) -> None:
    """400 when the prompt text is longer than `limits.max_prompt_chars` characters; runs before
    the schema's own per-string maxLength so the refusal names the context, not the shape."""
    bound = limits.max_prompt_chars
    if bound is None:
        return
    n = prompt_chars(chat, body)
    if n > bound:
        param = "messages" if chat else "prompt"
        raise bad_request(f"'{param}' holds {n} characters; at most {bound} can fit this server's context "
                          "(or its --max-prompt-chars). Send a shorter prompt.", param, "context_length_exceeded")
