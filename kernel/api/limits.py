"""Server limits: what a request may ask for and how much may wait.

No slot count here: the engine owns it (`--slots`, `ukgpu.slots=`, Engine.n_slots) and the
scheduler takes it from there, so the API can never admit more sequences than there are KV
slots.  Whether a prompt fits the context is the engine's to say as well (Engine.room).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 1 << 20  # bodies over this are refused (413) before they are read in full
    max_queue: int = 64  # requests waiting for a slot; beyond this a request gets 429
    max_tokens: int | None = None  # largest max_tokens accepted; None means the context size
    default_max_tokens: int = 16  # /v1/completions default, as in the OpenAI API
    max_prompt_chars: int | None = None  # longest prompt/message text; None: bounded by the body

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_queue", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ApiLimits.{name} must be >= 1, got {getattr(self, name)}")
