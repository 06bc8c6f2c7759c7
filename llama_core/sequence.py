"""A request's state inside the engine (`Sequence`), what each step releases (`TokenEvent`),
the timing and token counts (`Stats`), and the prefix and stop-string helpers the engine uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from ukgpu.llama_core.backend import KVCache
from ukgpu.llama_core.logprobs import TokenLogprob
from ukgpu.llama_core.sampling import Sampler, SamplingParams
from ukgpu.llama_core.text.tokenizer import IncrementalDecoder


@dataclass
class TokenEvent:
    token_id: int | None  # None: text released at the end, with no new token
    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"
    logprob: TokenLogprob | None = None  # when params.logprobs asked; none for an end-of-text token


@dataclass
class Stats:
    prompt_tokens: int = 0  # the whole prompt, cached or not
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose keys/values a slot already held

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens per second actually run through the model (cached ones excluded)."""
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second of the single-token forwards (the first token comes from prefill)."""
        n = max(self.generated_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds else 0.0

    def add(self, other: Stats) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.generated_tokens += other.generated_tokens
        self.prefill_seconds += other.prefill_seconds
        self.decode_seconds += other.decode_seconds
        self.cached_tokens += other.cached_tokens


@dataclass(eq=False)
class Sequence:
    """One request: its tokens, its KV slot and its streaming state."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    slot: int
    kv: KVCache
    sampler: Sampler
    decoder: IncrementalDecoder
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    n_cached: int = 0  # leading tokens whose keys/values are in kv (a reused prefix at first)
    kv_suspect: bool = False  # a forward pass raised: kv may be partly written
    held: str = ""  # decoded text not yet emitted (may begin a stop string)
    finish_reason: str | None = None
    stats: Stats = field(default_factory=Stats)
    logprob: TokenLogprob | None = None  # of the token just sampled, until _emit hands it on

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]

    @property
    def prefilled(self) -> bool:
        """Whether kv holds the prompt and every fed token (then each step is one decode of
        the last sampled token); False again after the cache was lost to a device failure."""
        return self.n_cached >= max(len(self.prompt_ids), len(self.tokens) - 1)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that begins some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best

