"""OpenAI request fields this server does not implement, as schema properties that refuse them.

A client that sends `logit_bias`, `echo`, `suffix`, `functions` ... expects an
effect; ignoring the field would answer a different question than was asked.
Each field here accepts only its "off" values (absent, null, and e.g. `echo:
false`, `best_of: 1`, `logit_bias: {}`, which some clients send as defaults);
anything else is a 400 naming the parameter.  They are part of the request
schemas (kernel/api/schema.py), so /openapi.json documents the refusal and the
schema fuzz tests cover it.  Fields that only route or label a request
(`user`, `metadata`, `service_tier`, `prompt_cache_key`, `safety_identifier`)
change no output and are accepted.
"""

from __future__ import annotations

from typing import Any

# field -> the values besides null that mean "not used"
_COMPLETION: dict[str, list[Any]] = {"best_of": [1], "echo": [False], "logit_bias": [{}], "suffix": [""]}
_CHAT: dict[str, list[Any]] = {
    "logit_bias": [{}], "audio": [], "functions": [[]], "function_call": [], "modalities": [["text"]],
    "prediction": [], "reasoning_effort": [], "verbosity": [], "web_search_options": [],
    "store": [False],
}


def _refuse(name: str, off: list[Any]) -> dict:
    return {"enum": [None, *off], "description": "Not implemented by this server.",
            "x-hint": f"This server does not implement '{name}'; omit it."}


def completion_properties() -> dict:
    return {name: _refuse(name, off) for name, off in _COMPLETION.items()}


def chat_properties() -> dict:
    return {name: _refuse(name, off) for name, off in _CHAT.items()}
