"""Typed reads of a vocabulary's `tokenizer.ggml.*` metadata.

A GGUF file is untrusted input.  Every key the tokenizer reads is checked here for its
type, its length against the token list and its range, and a bad one raises
TokenizerError naming the key, instead of a TypeError or IndexError from deep inside
encoding (or a silently wrong vocabulary).  Arrays may be lists (hand-written metadata)
or `GGUFArray`s (a mapped file); numeric ones are read through numpy either way, so a
vocabulary of n tokens costs no Python object per score or type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ukgpu.llama_core.errors import TokenizerError

# 4x the largest vocabulary released (262k): a Python vocabulary costs ~200 bytes a token
MAX_VOCAB = 1 << 20
_DAMAGED = "the GGUF file is damaged; re-convert the model"


def fail(key: str, why: str) -> TokenizerError:
    return TokenizerError(f"{key} {why}: {_DAMAGED}")


def _array(md: Mapping[str, Any], key: str) -> Sequence | None:
    """The array at `key` (None when absent); anything else than an array is refused."""
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise fail(key, f"should be an array, not {type(value).__name__}")
    return value


def tokens(md: Mapping[str, Any]) -> list[str]:
    """`tokenizer.ggml.tokens` as strings (an empty entry gets a placeholder text of its own)."""
    key = "tokenizer.ggml.tokens"
    values = _array(md, key)
    if not values:
        raise TokenizerError(f"the GGUF file has no {key}: it cannot be used for text")
    if len(values) > MAX_VOCAB:
        raise fail(key, f"has {len(values)} entries, more than the {MAX_VOCAB} a vocabulary may have")
    out = list(values)  # one pass over the file's strings; checked in bulk below (~20 ms for 262k)
    if not all(type(text) is str for text in out):
        i, text = next((i, t) for i, t in enumerate(out) if not isinstance(t, str))
        raise fail(f"{key}[{i}]", f"is {type(text).__name__} {text!r:.40}, not a string")
    for i in [i for i, text in enumerate(out) if not text]:
        out[i] = f"[EMPTY_{i}]"
    return out


def numbers(md: Mapping[str, Any], key: str, n: int, integers: bool) -> np.ndarray | None:
    """The first n values of a numeric array (None when absent): int64, or float64 unless `integers`."""
    values = _array(md, key)
    if values is None:
        return None
    try:
        array = np.asarray(values)
    except (TypeError, ValueError):
        array = np.asarray([])  # a string or ragged array: refused by kind below
    kinds = "biu" if integers else "biuf"
    if array.ndim != 1 or array.dtype.kind not in kinds:
        raise fail(key, f"should be an array of {'integers' if integers else 'numbers'}")
    if len(array) < n:
        raise fail(key, f"has {len(array)} entries for {n} tokens")
    return array[:n].astype(np.int64 if integers else np.float64)


def merges(md: Mapping[str, Any]) -> Sequence[str] | None:
    """`tokenizer.ggml.merges` (None when absent); each line is checked by `bpe.parse_merges`."""
    return _array(md, "tokenizer.ggml.merges")


def token_id(md: Mapping[str, Any], key: str, n: int) -> int | None:
    """A special token's id (None when absent); it must name one of the n tokens."""
    value = md.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise fail(key, f"= {value!r:.40} is not a token id (0 .. {n - 1})")
    return value


def flag(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = md.get(key, default)
    if not isinstance(value, bool):
        raise fail(key, f"= {value!r:.40} should be true or false")
    return value


def text(md: Mapping[str, Any], key: str, default: str) -> str:
    value = md.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise fail(key, f"= {value!r:.40} should be a string")
    return value
