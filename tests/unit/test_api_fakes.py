"""A small deterministic engine with the `llama_core.engine.Engine` contract, for API tests.

Tokens are UTF-8 bytes; generation emits one letter per step, chosen from the
prompt, so every request has one reproducible answer.  Prompts containing
"boom" make `step` raise; `gate` (a threading.Event) can hold every step and
`delay` slows each one down.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ukgpu.kernel.api import engine_facts
from ukgpu.llama_core.engine import Stats


@dataclass
class FakeEvent:
    token_id: int | None
    text: str
    finish_reason: str | None = None


class FakeTokenizer:
    vocab_size = 256

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
    stats: Stats = field(default_factory=Stats)  # what the scheduler reads (cached_tokens)


@dataclass
class FakeEngine:
    n_ctx: int = 64
    n_slots: int = 2
    gate: threading.Event | None = None
    delay: float = 0.0  # seconds per step
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    live: set = field(default_factory=set)
    released: list = field(default_factory=list)
    steps: int = 0

    def start(self, prompt_ids, params, max_tokens, stop) -> FakeSeq:
        if len(self.live) >= self.n_slots:
            raise RuntimeError("no free slot")
        seq = FakeSeq(list(prompt_ids), max_tokens, list(stop))
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
        return [FakeEvent(ord(letter), letter, reason)]

    def step_all(self, seqs: list[FakeSeq]) -> list:
        """The engine's contract: each sequence's events, or its exception in its place."""
        out = []
        for seq in seqs:
            try:
                out.append(self.step(seq))
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    def release(self, seq: FakeSeq) -> None:
        self.live.discard(seq)
        self.released.append(seq)

    def expected(self, prompt: str, n: int) -> str:
        total = sum(prompt.encode("utf-8"))
        return "".join(chr(ord("a") + (total + i) % 26) for i in range(n))


def fake_render_chat(engine, messages) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def fake_params(body: dict) -> dict:
    return {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed")}


def use_fakes(monkeypatch) -> None:
    """Route chat rendering and sampling parameters to the fakes above."""
    monkeypatch.setattr(engine_facts, "render_chat", fake_render_chat)
    monkeypatch.setattr(engine_facts, "sampling_params", fake_params)
