"""A small deterministic engine with the API's engine contract (`engine_protocol.ServedEngine`,
which `llama_core.engine.Engine` satisfies), for API tests.

Tokens are UTF-8 bytes; generation emits one letter per step, chosen from the
prompt, so every request has one reproducible answer.  The chat template is
"<role>content" per message, then "<assistant>".  Prompts containing
"boom" make `step` raise; `gate` (a threading.Event) can hold every step and
`delay` slows each one down.  Context and slot refusals are the engine's own
typed errors, so the API's mapping of them is what the tests see.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ukgpu.kernel.api import engine_facts
from ukgpu.kernel.api.engine_protocol import ServedEngine
from ukgpu.llama_core.engine import ContextFullError, NoFreeSlotError, Stats
from ukgpu.llama_core.logprobs import Alternative, TokenLogprob


@dataclass
class FakeEvent:
    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None


class FakeTokenizer:
    vocab_size = 256
    control_texts: frozenset[str] = frozenset()  # bytes only: no control tokens to protect

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@dataclass(eq=False)
class FakeSeq:
    prompt: list[int]
    max_tokens: int
    stop: list[str]
    text: str = ""
    n: int = 0
    top_k: int | None = None  # logprobs asked: alternatives per token
    stats: Stats = field(default_factory=Stats)  # what the scheduler reads (cached_tokens)


class FakeModel:
    backend = None  # no device: /health reports none


@dataclass
class FakeEngine:
    n_ctx: int = 64
    n_slots: int = 2
    gate: threading.Event | None = None
    delay: float = 0.0  # seconds per step
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    model: FakeModel = field(default_factory=FakeModel)
    backend_note: str = ""
    live: set = field(default_factory=set)
    released: list = field(default_factory=list)
    chats: list = field(default_factory=list)  # the messages of every chat_ids call
    steps: int = 0

    def chat_ids(self, messages) -> list[int]:
        self.chats.append([dict(m) for m in messages])
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return self.tokenizer.encode(text, add_special=True, parse_special=True)

    def room(self, n_prompt: int, max_tokens: int = 1) -> int:
        if self.n_ctx - n_prompt < max_tokens:
            raise ContextFullError(n_prompt, max_tokens, self.n_ctx)
        return self.n_ctx - n_prompt

    def start(self, prompt_ids, params, max_tokens, stop) -> FakeSeq:
        self.room(len(prompt_ids), max_tokens)
        if len(self.live) >= self.n_slots:
            raise NoFreeSlotError(f"all {self.n_slots} slots are busy")
        seq = FakeSeq(list(prompt_ids), max_tokens, list(stop),
                      top_k=params.get("logprobs") if isinstance(params, dict) else None)
        self.live.add(seq)
        return seq

    def step(self, seq: FakeSeq) -> list[FakeEvent]:
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.steps += 1
        if b"boom" in bytes(b % 256 for b in seq.prompt):
            raise RuntimeError("kaboom")
        letter = chr(ord("a") + (sum(seq.prompt) + seq.n) % 26)
        seq.n += 1
        seq.text += letter
        for s in seq.stop:
            if seq.text.endswith(s):
                return [FakeEvent(ord(letter), "", "stop")]
        reason = "length" if seq.n >= seq.max_tokens else None
        return [FakeEvent(ord(letter), letter, reason, fake_logprob(letter, seq.top_k))]

    def step_all(self, seqs: Sequence[FakeSeq]) -> list[list[FakeEvent] | Exception]:
        """The engine's contract: each sequence's events, or its exception in its place."""
        out: list[list[FakeEvent] | Exception] = []
        for seq in seqs:
            try:
                out.append(self.step(seq))
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    def release(self, seq: FakeSeq) -> None:
        self.live.discard(seq)
        self.released.append(seq)

    def embed(self, ids: Sequence[int]) -> list[float]:
        """A fixed 3-vector per input: (len, first id, last id), unit length."""
        v = [float(len(ids)), float(ids[0]), float(ids[-1])]
        norm = sum(x * x for x in v) ** 0.5
        return [x / norm for x in v]

    def expected(self, prompt: str, n: int) -> str:
        total = sum(prompt.encode("utf-8"))
        return "".join(chr(ord("a") + (total + i) % 26) for i in range(n))


def fake_logprob(letter: str, top_k: int | None) -> TokenLogprob | None:
    """The fake's logprobs: the chosen letter -0.5, then the next codes -1, -2, ..."""
    if top_k is None:
        return None
    top = [Alternative(ord(letter), letter.encode(), -0.5)]
    top += [Alternative(ord(letter) + i, chr(ord(letter) + i).encode(), -float(i)) for i in range(1, top_k)]
    return TokenLogprob(ord(letter), letter.encode(), -0.5, tuple(top[:top_k]))


def served(engine: FakeEngine) -> ServedEngine:
    """What mypy checks: the fake has every member the API calls, with compatible types."""
    return engine


def fake_params(body: dict, logprobs: int | None = None) -> dict:
    return {**{k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed")}, "logprobs": logprobs}


def fake_seeded(params: dict, index: int) -> dict:
    seed = params.get("seed")
    return {**params, "seed": None if seed is None else seed + index}


def use_fakes(monkeypatch) -> None:
    """Route sampling parameters to the fake above (the fake engine has no sampler)."""
    monkeypatch.setattr(engine_facts, "sampling_params", fake_params)
    monkeypatch.setattr(engine_facts, "seeded", fake_seeded)
