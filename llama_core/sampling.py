"""Choosing the next token from a row of logits.

Order of the steps (each one off at its neutral value):

1. penalties over the recent tokens: `repeat_penalty` (llama.cpp's: a positive
   logit is divided by it, a negative one multiplied) over the last
   `repeat_last_n` tokens; `presence_penalty` (once per seen token) and
   `frequency_penalty` (times its count) subtracted, OpenAI-style, over the
   same window;
2. temperature == 0: the argmax (greedy), nothing random;
3. otherwise logits / temperature, then `top_k` (keep the k largest), `top_p`
   (keep the smallest set whose probability reaches p), `min_p` (drop tokens
   below min_p times the top probability), and a draw from what remains with
   `np.random.Generator(seed)`: the same seed gives the same tokens.

0. with `grammar` (a `llama_core.grammar.GrammarSpec`), before all of the above:
   every token the grammar refuses goes to -inf (`Sampler.constrain`), and the
   chosen token advances the sequence's matcher; the sampler owns that matcher,
   so the grammar state lives and ends with the sequence.

`logprobs` does not change the choice: it asks the engine to report the sampled
token's log-probability and that many alternatives (`llama_core.logprobs`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.logprobs import MAX_TOP

_TOP_P_FIRST_GUESS = 1024  # candidates sorted before falling back to a full sort


class SamplingError(UkgpuError):
    """Sampling parameters out of range."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # window for all penalties; -1: the whole history
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k: the token's and the k likeliest
    grammar: Any = None  # a llama_core.grammar.GrammarSpec: only tokens it allows are sampled

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0 (1 turns it off)"),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP,
             f"logprobs must be None or in [0, {MAX_TOP}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(f"{message}; got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Stateful in its random generator and its grammar matcher; one per sequence."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.matcher = params.grammar.matcher() if params.grammar is not None else None

    def constrain(self, logits: np.ndarray) -> np.ndarray:
        """logits with the tokens the grammar refuses at -inf (unchanged without a grammar)."""
        return logits if self.matcher is None else self.matcher.mask(logits)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token for logits float[vocab], after `history` (prompt + output)."""
        token = self._choose(self.constrain(np.asarray(logits, dtype=np.float32)), history)
        if self.matcher is not None:
            self.matcher.accept(token)
        return token

    def _choose(self, logits: np.ndarray, history: Sequence[int]) -> int:
        p = self.params
        logits = self._penalized(logits, history)
        if p.greedy:
            return int(np.argmax(logits))
        # Shift before scaling, in float64: a tiny temperature then sends every other token to
        # -inf (probability 0) instead of overflowing the best one to inf (inf - inf = NaN).
        scaled = (logits.astype(np.float64) - logits.max()) / p.temperature
        ids, probs = self._candidates(scaled)
        return int(ids[self._draw(probs)])

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.params
        if p.repeat_last_n == 0 or not history or (
                p.repeat_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0):
            return logits
        window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
        counts = Counter(int(t) for t in window)
        ids = np.fromiter(counts.keys(), dtype=np.int64)
        n = np.fromiter(counts.values(), dtype=np.float32)
        logits = logits.copy()
        seen = logits[ids].astype(np.float64)
        with np.errstate(over="ignore", divide="ignore"):  # a tiny penalty divides to inf: clipped below
            seen = np.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        # Kept finite: an inf logit would turn the max-shift of `_choose` into inf - inf = NaN.
        big = float(np.finfo(np.float32).max)
        logits[ids] = np.clip(seen - n * p.frequency_penalty - p.presence_penalty, -big, big)
        return logits

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and their normalized probabilities after top-k / top-p / min-p."""
        p = self.params
        ids = np.arange(logits.shape[0])
        if 0 < p.top_k < logits.shape[0]:
            ids = np.argpartition(logits, -p.top_k)[-p.top_k:]
        probs = np.exp(logits[ids] - logits[ids].max())
        probs /= probs.sum()
        if p.top_p < 1:
            ids, probs = _top_p(ids, probs, p.top_p)
        if p.min_p > 0:
            keep = probs >= p.min_p * probs.max()
            ids, probs = ids[keep], probs[keep]
        return ids, probs / probs.sum()

    def _draw(self, probs: np.ndarray) -> int:
        cdf = np.cumsum(probs, dtype=np.float64)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"),
                       len(probs) - 1))


def _top_p(ids: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The most probable tokens whose total first reaches top_p (at least one)."""
    guess = min(_TOP_P_FIRST_GUESS, len(probs))
    head = np.argpartition(probs, -guess)[-guess:] if guess < len(probs) else np.arange(len(probs))
    if probs[head].sum() < top_p:  # the nucleus is wider than the guess: sort everything
        head = np.arange(len(probs))
    order = head[np.argsort(-probs[head], kind="stable")]
    n_keep = min(int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1, len(order))
    keep = order[:n_keep]
    return ids[keep], probs[keep]
