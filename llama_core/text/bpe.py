"""Byte-level BPE (`tokenizer.ggml.model == "gpt2"`).

Text is pre-tokenized into words; each word's UTF-8 bytes are mapped to
printable stand-in characters (the GPT-2 byte alphabet, so every vocabulary
entry is a plain string) and merged pairwise, always taking the adjacent pair
with the lowest merge rank (the leftmost on ties), until no ranked pair is
left.  Results are cached per word.
"""

from __future__ import annotations

import functools
import heapq

from ukgpu.llama_core.text.pretokenize import PreTokenizer


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """byte value -> its stand-in character (printable bytes stand for themselves)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@functools.lru_cache(maxsize=1)
def byte_alphabet_inverse() -> dict[str, int]:
    return {ch: b for b, ch in enumerate(byte_alphabet())}


def parse_merges(merges: list[str]) -> dict[tuple[str, str], int]:
    """'left right' lines (rank = line number) -> {(left, right): rank}."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, line in enumerate(merges):
        cut = line.find(" ", 1)  # a merge's left side may itself start with a space
        if cut < 0:
            continue
        ranks.setdefault((line[:cut], line[cut + 1:]), rank)
    return ranks


class BpeModel:
    """Words -> token ids for one byte-level BPE vocabulary."""

    _CACHE_LIMIT = 1 << 16

    def __init__(self, token_to_id: dict[str, int], merges: list[str], pre: str):
        self._token_to_id = token_to_id
        self._ranks = parse_merges(merges)
        self.pre_tokenizer = PreTokenizer(pre)
        self._ignore_merges = self.pre_tokenizer.config.ignore_merges
        self._encode_byte = byte_alphabet()
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self.pre_tokenizer.split(text):
            ids += self._encode_word(word)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        table = self._encode_byte
        mapped = "".join(table[b] for b in word.encode("utf-8"))
        ids = self._merge(mapped)
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _merge(self, word: str) -> list[int]:
        vocab = self._token_to_id
        if self._ignore_merges and word in vocab:
            return [vocab[word]]
        symbols = _merge_symbols(list(word), self._ranks)
        ids: list[int] = []
        for symbol in symbols:
            token = vocab.get(symbol)
            if token is not None:
                ids.append(token)
            else:  # not in the vocabulary: emit its characters one by one, dropping unknown ones
                ids += [vocab[ch] for ch in symbol if ch in vocab]
        return ids


def _merge_symbols(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Repeatedly merge the lowest-ranked adjacent pair (leftmost first)."""
    n = len(symbols)
    if n < 2:
        return symbols
    nxt = list(range(1, n + 1))  # index of the next live symbol (n = none)
    prv = list(range(-1, n - 1))
    heap: list[tuple[int, int, str, str]] = []
    for i in range(n - 1):
        rank = ranks.get((symbols[i], symbols[i + 1]))
        if rank is not None:
            heap.append((rank, i, symbols[i], symbols[i + 1]))
    heapq.heapify(heap)
    while heap:
        rank, left, ltext, rtext = heapq.heappop(heap)
        right = nxt[left]
        if right >= n or symbols[left] != ltext or symbols[right] != rtext:
            continue  # stale: one side was merged away since this pair was queued
        symbols[left] = ltext + rtext
        symbols[right] = ""
        nxt[left] = nxt[right]
        if nxt[left] < n:
            prv[nxt[left]] = left
        before, after = prv[left], nxt[left]
        if before >= 0:
            r = ranks.get((symbols[before], symbols[left]))
            if r is not None:
                heapq.heappush(heap, (r, before, symbols[before], symbols[left]))
        if after < n:
            r = ranks.get((symbols[left], symbols[after]))
            if r is not None:
                heapq.heappush(heap, (r, left, symbols[left], symbols[after]))
    return [s for s in symbols if s]
