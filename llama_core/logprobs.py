"""Log-probabilities of sampled tokens, as OpenAI's `logprobs` reports them.

A token's logprob is the log-softmax, in float64, of the model's logits at the
position that produced it: the raw distribution, before the sampler's penalties,
temperature, top-k/top-p/min-p (so the same token has the same logprob whatever the
sampling settings; a token sampled from outside the greedy choice can have a low one),
after a grammar's mask when the request has one (`Sampler.constrain`: the distribution the
token was drawn from; tokens it refuses are left out of `top`, never reported as -inf).
`top` holds the k most probable tokens at that position, most probable first (ties: the
lower id first); k is 0..`MAX_TOP` (OpenAI's chat limit; its completions allow 0..5).
Tokens are given as the bytes they stand for, since one token may hold part of a
UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_TOP = 20


@dataclass(frozen=True)
class Alternative:
    token_id: int
    token: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's logprob and the `top` alternatives at its position."""

    token_id: int
    token: bytes
    logprob: float
    top: tuple[Alternative, ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64[vocab] log-probabilities of a row of logits."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def token_logprob(logits: np.ndarray, token_id: int, k: int,
                  token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """The logprob of `token_id` under `logits` and the k most probable tokens there."""
    lp = log_softmax(logits)
    k = min(k, lp.shape[0])
    top: tuple[Alternative, ...] = ()
    if k > 0:
        head = np.argpartition(-lp, k - 1)[:k] if k < lp.shape[0] else np.arange(lp.shape[0])
        order = sorted((int(i) for i in head), key=lambda i: (-lp[i], i))
        top = tuple(Alternative(i, token_bytes(i), float(lp[i])) for i in order
                    if lp[i] > -np.inf)  # a grammar's refused tokens are no alternatives
    return TokenLogprob(int(token_id), token_bytes(int(token_id)), float(lp[token_id]), top)
