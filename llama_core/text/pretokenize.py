"""Regex pre-tokenization for byte-level BPE vocabularies.

A BPE vocabulary names its pre-tokenizer in `tokenizer.ggml.pre`.  Each
pre-tokenizer is an ordered list of regular expressions; every expression
splits each fragment left by the previous one into its matches and the gaps
between them (gaps are kept as fragments of their own).  The surviving
fragments are the "words" that BPE then merges independently.

The expressions use Unicode general categories (\\p{L}, \\p{N}, ...), which
the standard `re` module lacks, so the category classes are built here from
`unicodedata` and spliced into the patterns.  `\\s` means the Unicode
White_Space property (Python's own `\\s` also matches U+001C..U+001F, which
the vocabularies' reference implementation does not).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from ukgpu.llama_core.errors import TokenizerError

# Unicode White_Space property (PropList.txt); stable across Unicode versions.
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

# Planes holding assigned letters/digits/marks/punctuation/symbols: 0-3 and the
# tags block of plane 14; the rest is unassigned or private use (category Co).
_SCAN_RANGES = ((0, 0x40000), (0xE0000, 0xE1000))


def _escape(cp: int) -> str:
    return f"\\U{cp:08x}"


def _ranges_to_class(ranges: list[tuple[int, int]]) -> str:
    """[(first, last), ...] -> the body of a character class (no brackets)."""
    return "".join(_escape(a) if a == b else f"{_escape(a)}-{_escape(b)}" for a, b in ranges)


@functools.lru_cache(maxsize=1)
def _category_classes() -> dict[str, str]:
    """Major general category letter ('L', 'N', 'P', 'S', 'M') -> class body."""
    ranges: dict[str, list[tuple[int, int]]] = {k: [] for k in "LNPSM"}
    category = unicodedata.category
    for lo, hi in _SCAN_RANGES:
        run_major, run_start = None, lo
        for cp in range(lo, hi + 1):
            major = category(chr(cp))[0] if cp < hi else None
            if major != run_major:
                if run_major is not None and run_major in ranges:
                    ranges[run_major].append((run_start, cp - 1))
                run_major, run_start = major, cp
    classes = {k: _ranges_to_class(v) for k, v in ranges.items()}
    classes["s"] = re.escape(_WHITESPACE)
    return classes


def _compile(pattern: str) -> re.Pattern:
    """Compile a pattern written with {L} {N} {P} {S} {M} {s} class-body holes.

    `{s}` is the whitespace class body; `\\s` and `\\S` must not be used.
    """
    body = _category_classes()
    text = pattern.replace("{L}", body["L"]).replace("{N}", body["N"]).replace("{P}", body["P"])
    text = text.replace("{S}", body["S"]).replace("{M}", body["M"]).replace("{s}", body["s"])
    return re.compile(text)


# Building blocks, in the notation of `_compile`.
_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"
_CONTRACTIONS_ANYCASE = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = _CONTRACTIONS + "| ?[{L}]+| ?[{N}]+| ?[^{s}{L}{N}]+|[{s}]+(?![^{s}])|[{s}]+"


def _llama3_like(digits: str) -> str:
    return (
        _CONTRACTIONS_ANYCASE + "|[^\\r\\n{L}{N}]?[{L}]+|[{N}]" + digits
        + "| ?[^{s}{L}{N}]+[\\r\\n]*|[{s}]*[\\r\\n]+|[{s}]+(?![^{s}])|[{s}]+"
    )


def _cased_words(contractions: str, digits: str) -> str:
    """Words split at lower-to-upper case changes (Mistral's tekken, GPT-4o).  Upper and lower
    case are ASCII's, as in llama.cpp: any other letter counts as both."""
    upper, lower = "(?=[{L}])[^a-z]", "(?=[{L}])[^A-Z]"
    return (
        f"[^\\r\\n{{L}}{{N}}]?(?:{upper})*(?:{lower})+{contractions}"
        f"|[^\\r\\n{{L}}{{N}}]?(?:{upper})+(?:{lower})*{contractions}"
        f"|[{{N}}]{digits}| ?[^{{s}}{{L}}{{N}}]+[\\r\\n/]*|[{{s}}]*[\\r\\n]+|[{{s}}]+(?![^{{s}}])|[{{s}}]+"
    )


# pre-tokenizer family -> its expressions, applied in order
_FAMILIES: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2,),
    "llama3": (_llama3_like("{1,3}"),),
    "qwen2": (_llama3_like(""),),
    "tekken": (_cased_words("", ""),),
    "gpt-4o": (_cased_words(_CONTRACTIONS_ANYCASE + "?", "{1,3}"),),
    "starcoder": ("[{N}]", _GPT2),
    "falcon": ("[{P}$+<=>^~|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "deepseek-coder": (
        "[\\r\\n]",
        "[{s}]?[{L}]+",
        "[{s}]?[{P}]+",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        "[{N}]",
    ),
    "default": ("[{P}$+<=>^~|]+", _GPT2, "[{N}]+", "[0-9][0-9][0-9]"),
}


@dataclass(frozen=True)
class PreConfig:
    """How one `tokenizer.ggml.pre` value tokenizes and detokenizes."""

    family: str  # key of _FAMILIES
    clean_spaces: bool = True  # decode drops the space in " ," " ." " 's" ...
    ignore_merges: bool = False  # a word that is a vocabulary entry is taken whole
    add_bos: bool = False  # default for `tokenizer.ggml.add_bos_token`


_LLAMA3 = PreConfig("llama3", ignore_merges=True, add_bos=True)

# Each family is checked against llama.cpp on a real vocabulary (tests/data/vocab)
# except "default", the fallback for BPE files converted without a pre-tokenizer name.
PRE_TOKENIZERS: dict[str, PreConfig] = {
    "default": PreConfig("default"),
    "gpt-2": PreConfig("gpt2"),
    "phi-2": PreConfig("gpt2"),
    "mpt": PreConfig("gpt2"),
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "qwen2": PreConfig("qwen2", clean_spaces=False),
    "deepseek-r1-qwen": PreConfig("qwen2", clean_spaces=False),
    "starcoder": PreConfig("starcoder"),
    "refact": PreConfig("starcoder"),
    "smollm": PreConfig("starcoder", clean_spaces=False),
    "falcon": PreConfig("falcon"),
    "deepseek-coder": PreConfig("deepseek-coder", clean_spaces=False),
    "tekken": PreConfig("tekken", clean_spaces=False, ignore_merges=True, add_bos=True),
    "gpt-4o": PreConfig("gpt-4o", clean_spaces=False),
}


def pre_config(pre: str) -> PreConfig:
    """The configuration of a `tokenizer.ggml.pre` value ('' means 'default')."""
    config = PRE_TOKENIZERS.get(pre or "default")
    if config is None:
        raise TokenizerError(
            f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre): supported are "
            f"{', '.join(sorted(PRE_TOKENIZERS))}; use a model converted with one of them"
        )
    return config


class PreTokenizer:
    """Splits text into the words BPE merges independently."""

    def __init__(self, pre: str):
        self.name = pre or "default"
        self.config = pre_config(pre)
        self._patterns = [_compile(p) for p in _FAMILIES[self.config.family]]

    def split(self, text: str) -> list[str]:
        fragments = [text] if text else []
        for pattern in self._patterns:
            fragments = [piece for fragment in fragments for piece in _split_one(pattern, fragment)]
        return fragments


def _split_one(pattern: re.Pattern, text: str) -> list[str]:
    """Matches of `pattern` in `text` and the non-empty gaps between them, in order."""
    out = []
    end = 0
    for match in pattern.finditer(text):
        start = match.start()
        if start > end:
            out.append(text[end:start])
        if match.end() > start:
            out.append(match.group())
        end = match.end()
    if end < len(text):
        out.append(text[end:])
    return out
