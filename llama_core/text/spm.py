"""SentencePiece-style vocabularies (`tokenizer.ggml.model == "llama"`).

Spaces are written as U+2581 ("▁").  The text starts as single characters;
the adjacent pair whose concatenation is a vocabulary entry with the highest
score is merged (the leftmost on ties) until no pair forms an entry.  A
character left over that is not in the vocabulary is spelled with byte
tokens `<0xNN>` (byte fallback).
"""

from __future__ import annotations

import heapq

from ukgpu.llama_core.errors import TokenizerError

SPACE = "\u2581"


class SpmModel:
    """Text fragments -> token ids for one SentencePiece vocabulary."""

    def __init__(self, token_to_id: dict[str, int], scores: list[float]):
        self._token_to_id = token_to_id
        self._scores = scores
        self._byte_ids = [self._byte_token(b) for b in range(256)]

    def _byte_token(self, byte: int) -> int | None:
        token = self._token_to_id.get(f"<0x{byte:02X}>")
        if token is None and byte < 0x80:
            token = self._token_to_id.get(chr(byte))
        return token

    def encode(self, text: str) -> list[int]:
        """`text` must already have its spaces escaped as ▁."""
        ids: list[int] = []
        for piece in self._merge(list(text)):
            token = self._token_to_id.get(piece)
            if token is not None:
                ids.append(token)
            else:
                ids += self._bytes_of(piece)
        return ids

    def _bytes_of(self, piece: str) -> list[int]:
        ids = []
        for byte in piece.encode("utf-8"):
            token = self._byte_ids[byte]
            if token is None:
                raise TokenizerError(
                    f"the vocabulary has no byte token <0x{byte:02X}> to spell {piece!r}:"
                    " the GGUF file's SentencePiece vocabulary lacks byte fallback"
                )
            ids.append(token)
        return ids

    def _pair(self, left: int, right: int, symbols: list[str]) -> tuple[float, int, int, str] | None:
        text = symbols[left] + symbols[right]
        token = self._token_to_id.get(text)
        if token is None:
            return None
        return (-self._scores[token], left, right, text)

    def _merge(self, symbols: list[str]) -> list[str]:
        n = len(symbols)
        nxt = list(range(1, n + 1))  # index of the next live symbol (n = none)
        prv = list(range(-1, n - 1))
        heap = [p for i in range(n - 1) if (p := self._pair(i, i + 1, symbols)) is not None]
        heapq.heapify(heap)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            if not symbols[left] or not symbols[right] or symbols[left] + symbols[right] != text:
                continue  # stale: a side was merged since this pair was queued
            symbols[left] = text
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[left] < n:
                prv[nxt[left]] = left
            for a, b in ((prv[left], left), (left, nxt[left])):
                if a >= 0 and b < n and (p := self._pair(a, b, symbols)) is not None:
                    heapq.heappush(heap, p)
        return [s for s in symbols if s]
