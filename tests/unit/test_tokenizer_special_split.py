"""Special-token splitting (llama_core/text/special_split.py): the prefix-grouped search gives
exactly what trying every special token in turn gives, and looks at few tokens for plain text."""

from __future__ import annotations

import random

from ukgpu.llama_core.text.special_split import (
    CONTROL,
    LSTRIP,
    NORMAL,
    RSTRIP,
    UNKNOWN,
    USER_DEFINED,
    SpecialSplitter,
    _split_on,
)

# overlapping texts, shared prefixes longer and shorter than PREFIX, both kinds, strip flags
SPECIALS = [("<unused1>", CONTROL), ("<unused12>", CONTROL), ("<unused123>", CONTROL | RSTRIP),
            ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL | LSTRIP), ("\n", USER_DEFINED),
            ("\n\n", USER_DEFINED), ("  ", USER_DEFINED), ("ab", USER_DEFINED), ("abc", CONTROL),
            ("bc", USER_DEFINED), ("<unk>", UNKNOWN), ("<", USER_DEFINED)]


def naive_split(tokens: list[str], attrs: list[int], text: str, parse_special: bool) -> list[str | int]:
    """Every special token, longest text first, cuts every fragment (llama.cpp's order)."""
    order = sorted((i for i, a in enumerate(attrs) if a & (CONTROL | USER_DEFINED | UNKNOWN)),
                   key=lambda i: (-len(tokens[i]), i))
    fragments: list[str | int] = [text] if text else []
    for token in order:
        if not parse_special and attrs[token] & (CONTROL | UNKNOWN):
            continue
        fragments = [piece for f in fragments
                     for piece in ([f] if isinstance(f, int) else _split_on(f, tokens[token], token, attrs[token]))]
    return fragments


def test_grouped_search_equals_trying_every_token():
    tokens = ["a", "b", "c", "x"] + [t for t, _ in SPECIALS]
    attrs = [NORMAL] * 4 + [a for _, a in SPECIALS]
    splitter = SpecialSplitter(tokens, attrs)
    rng = random.Random(3)
    alphabet = ["a", "b", "c", " ", "\n", "\t", "x", "<", ">", "1", "2", "3"] + [t for t, _ in SPECIALS]
    special_seen = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        for parse in (False, True):
            got = splitter.split(text, parse)
            assert got == naive_split(tokens, attrs, text, parse), (text, parse)
            special_seen += any(isinstance(f, int) for f in got)
    assert special_seen > 1000


def test_plain_text_looks_at_few_of_many_special_tokens():
    tokens = ["<pad>", "<start_of_turn>", "<end_of_turn>"] + [f"<unused{i}>" for i in range(6000)] + ["hello"]
    attrs = [CONTROL] * (len(tokens) - 1) + [NORMAL]
    splitter = SpecialSplitter(tokens, attrs)
    prose = "The quick brown fox jumps over the lazy dog. < > <un used> " * 200
    assert len(splitter._candidates(prose)) == 0
    assert len(splitter._candidates(prose + "<unused5>")) <= 1111  # only the "<unused5" group
    assert splitter.split("a<unused5>b<end_of_turn>", True) == ["a", tokens.index("<unused5>"), "b", 2]
