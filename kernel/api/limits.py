"""Server limits: what a request may ask for and how much may wait.

No slot count here: the engine owns it (`--slots`, `ukgpu.slots=`, Engine.n_slots) and the
scheduler takes it from there, so the API can never admit more sequences than there are KV
slots.  Whether a prompt fits the context is the engine's to say as well (Engine.room).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields


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


@dataclass(frozen=True)
class ServerLimits:
    """What one TCP connection may hold (`server.config`; `ukgpu serve --max-connections ...`).

    A client that opens a connection and sends nothing, or half a request line, or headers
    without their end, or a body slower than the deadline, would otherwise keep a descriptor
    and a protocol object forever: a few hundred of them lock every other client out.
    Defaults suit a server in a small VM: tens of clients, requests of at most a megabyte.
    """

    max_connections: int = 64  # connections answered at once; a request on one more gets 503
    header_timeout: float = 10.0  # seconds from connect (or the last response) to the end of headers
    body_timeout: float = 60.0  # seconds from the end of headers to the end of the body
    keep_alive: int = 5  # whole seconds an idle keep-alive connection stays open (uvicorn's default)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"ServerLimits.max_connections must be >= 1, got {self.max_connections}")
        for name in ("header_timeout", "body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be > 0 seconds, got {getattr(self, name)}")


def server_limits_from(options: Mapping[str, str]) -> ServerLimits:
    """ServerLimits from text options (the guest's `ukgpu.max_connections=`, `ukgpu.header_timeout=`,
    `ukgpu.body_timeout=`, `ukgpu.keep_alive=`); others are ignored, missing ones keep their default.
    ValueError names the option when a value is not a number or out of range."""
    values: dict[str, float | int] = {}
    for f in fields(ServerLimits):
        if f.name in options:
            try:
                values[f.name] = int(options[f.name]) if f.type == "int" else float(options[f.name])
            except ValueError:
                raise ValueError(f"{f.name}={options[f.name]!r} is not a number") from None
    return ServerLimits(**values)  # type: ignore[arg-type]
