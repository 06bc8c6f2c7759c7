"""Cutting text at the special tokens' texts before it is tokenized, as llama.cpp does.

The special tokens are taken longest text first (then by id); each one cuts every text
fragment left by the ones before it, so a longer text wins over a shorter one that
overlaps it wherever either stands.  A token marked LSTRIP / RSTRIP also swallows the
ASCII whitespace before / after it.

Large vocabularies have thousands of special tokens (Gemma 3: 6,414, most of them
`<unusedN>`); asking the text whether it holds each one costs a scan of the text per token
(0.3 s for 100 KB).  The tokens are therefore grouped by the first PREFIX characters of
their texts: one scan per group (a few hundred) tells which groups can occur, and only
their tokens are looked for.
"""

from __future__ import annotations

from collections.abc import Sequence

# token attributes (bit flags), as the tokenizer keeps them per token
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE, LSTRIP, RSTRIP = (1 << i for i in range(8))
SPECIAL = CONTROL | USER_DEFINED | UNKNOWN
PREFIX = 8
_ASCII_SPACE = " \t\n\v\f\r"


class SpecialSplitter:
    """Text -> fragments: plain text (str) and special tokens (int ids)."""

    def __init__(self, tokens: Sequence[str], attrs: list[int]):
        self._tokens = tokens
        self._attrs = attrs  # shared with the tokenizer: flags set later (RSTRIP quirks) apply here
        found = [i for i, a in enumerate(attrs) if a & SPECIAL]
        self.order = sorted(found, key=lambda i: (-len(tokens[i]), i))
        self._rank = {token: rank for rank, token in enumerate(self.order)}
        self._groups: dict[str, list[int]] = {}
        for token in self.order:
            self._groups.setdefault(tokens[token][:PREFIX], []).append(token)

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut `text` at special-token texts; control (and unknown) tokens only if parse_special."""
        fragments: list[str | int] = [text] if text else []
        skip = 0 if parse_special else (CONTROL | UNKNOWN)
        for token in self._candidates(text):
            attr = self._attrs[token]
            piece = self._tokens[token]
            if attr & skip or piece not in text:
                continue
            out: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or piece not in fragment:
                    out.append(fragment)
                else:
                    out += _split_on(fragment, piece, token, attr)
            fragments = out
        return fragments

    def _candidates(self, text: str) -> list[int]:
        """The special tokens whose first PREFIX characters occur in `text`, longest first."""
        if not text:
            return []
        found = [token for prefix, group in self._groups.items() if prefix in text for token in group]
        return sorted(found, key=self._rank.__getitem__)


def _split_on(fragment: str, piece: str, token: int, attr: int) -> list[str | int]:
    """`fragment` cut at every occurrence of `piece` (replaced by `token`)."""
    out: list[str | int] = []
    start = 0
    while True:
        at = fragment.find(piece, start)
        if at < 0:
            break
        left = fragment[start:at]
        if attr & LSTRIP:
            left = left.rstrip(_ASCII_SPACE)
        if left:
            out.append(left)
        out.append(token)
        start = at + len(piece)
        if attr & RSTRIP:
            while start < len(fragment) and fragment[start] in _ASCII_SPACE:
                start += 1
    if start < len(fragment):
        out.append(fragment[start:])
    return out
