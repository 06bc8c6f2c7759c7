"""The engine the API drives, as a `typing.Protocol`: everything the routes and the scheduler
call on it, and nothing more.

`llama_core.engine.Engine` satisfies it, and so does the test suite's stand-in engine; mypy checks
both against it.  The API never imports the engine class itself at module level (the server
answers /health while the model still loads), so this is its only description of one.
Members are read-only properties where the API only reads, so an engine may keep them as
plain attributes.  A sequence is the engine's own handle: the API passes it back unopened
and reads only its `stats`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class Alternative(Protocol):
    """One of the likeliest tokens at a position (`llama_core.logprobs`)."""

    @property
    def token(self) -> bytes: ...
    @property
    def logprob(self) -> float: ...


class TokenLogprob(Protocol):
    """A generated token's logprob and the alternatives asked for."""

    @property
    def token(self) -> bytes: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top(self) -> Sequence[Alternative]: ...


class TokenEvent(Protocol):
    """What one step releases: a token (None at the end) and the text it completes."""

    @property
    def token_id(self) -> int | None: ...
    @property
    def text(self) -> str: ...
    @property
    def finish_reason(self) -> str | None: ...  # "stop" | "length" on the last event
    @property
    def logprob(self) -> TokenLogprob | None: ...  # when the sampling params ask for logprobs


class SequenceStats(Protocol):
    @property
    def cached_tokens(self) -> int: ...  # prompt tokens reused from a slot's KV cache


class EngineSequence(Protocol):
    @property
    def stats(self) -> SequenceStats: ...


class Tokenizer(Protocol):
    """Text <-> ids; called from the request threads, never from the scheduler's."""

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str, add_special: bool = True,
               parse_special: bool = False) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class Backend(Protocol):
    @property
    def name(self) -> str: ...  # the device that answers, e.g. "cpu", "cuda"


class ModelOnDevice(Protocol):
    @property
    def backend(self) -> Backend | None: ...  # None: no device behind it (the tests' stand-in)


class ServedEngine(Protocol):
    """Slots, context and tokenizer of a loaded model.  Thread ownership (scheduler.py):
    start, step_all and release only on the scheduler thread; the rest anywhere."""

    @property
    def n_ctx(self) -> int: ...  # tokens per slot: prompt + generated
    @property
    def n_slots(self) -> int: ...  # sequences that can be generated at once
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def model(self) -> ModelOnDevice: ...  # /health reports its backend
    @property
    def backend_note(self) -> str: ...  # why that backend (a fallback says so)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], **context: Any) -> list[int]:
        """The chat template applied to messages (and template variables such as tools), as
        prompt ids; raises `ChatTemplateError` when the template refuses them."""
        ...

    def room(self, n_prompt: int, max_tokens: int = 1) -> int:
        """Tokens left for generation after n_prompt prompt tokens; raises
        `ContextFullError` when fewer than max_tokens are left."""
        ...

    def start(self, prompt_ids: Sequence[int], params: Any, max_tokens: int,
              stop: Sequence[str]) -> EngineSequence:
        """A sequence in a free slot; raises when the engine refuses the request."""
        ...

    def step_all(self, seqs: Sequence[Any]) -> Sequence[Sequence[TokenEvent] | Exception]:
        """One step of each sequence, in order: its events, or its exception in its place."""
        ...

    def release(self, seq: Any) -> None:
        """Free the sequence's slot (idempotent)."""
        ...

    def embed(self, ids: Sequence[int]) -> Any:
        """float[d], unit length: the pooled embedding of ids (scheduler thread only)."""
        ...
