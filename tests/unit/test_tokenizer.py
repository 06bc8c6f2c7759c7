"""Tokenizer mechanics on small hand-made vocabularies: merges, byte fallback,
special tokens, decoding, streaming, errors."""

from __future__ import annotations

import re
import unicodedata

import pytest

from ukgpu.llama_core.errors import TokenizerError
from ukgpu.llama_core.text import unicode_ranges
from ukgpu.llama_core.text.bpe import byte_alphabet
from ukgpu.llama_core.text.pretokenize import PreTokenizer, _category_classes, scan_ranges
from ukgpu.llama_core.text.tokenizer import IncrementalDecoder, Tokenizer, _clean_spaces

CONTROL, NORMAL, BYTE, USER = 3, 1, 6, 4


def spm_metadata(pieces: dict[str, float], extra: dict | None = None) -> dict:
    """<unk> <s> </s>, 256 byte tokens, then `pieces` with their scores."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + list(pieces.values()),
        "tokenizer.ggml.token_type": [2, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces),
        **(extra or {}),
    }


def bpe_metadata(merges: list[str], extra_tokens: list[tuple[str, int]] = (), pre: str = "gpt-2") -> dict:
    """The 256 byte tokens, every merge result, then `extra_tokens` (text, type)."""
    tokens = list(byte_alphabet())
    tokens += ["".join(m.split(" ")) for m in merges]
    types = [NORMAL] * len(tokens) + [t for _, t in extra_tokens]
    tokens += [text for text, _ in extra_tokens]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": len(tokens) - 1 if extra_tokens else 0,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1 if extra_tokens else 0,
    }


def test_spm_prefers_highest_score_and_spells_unknown_chars_in_bytes():
    tok = Tokenizer.from_metadata(spm_metadata({"\u2581": -1.0, "a": -1.0, "b": -1.0, "ab": -2.0,
                                                "\u2581a": -0.5, "\u2581ab": -3.0}))
    ids = tok.encode("ab", add_special=False)
    # "▁a" (-0.5) beats "ab" (-2.0); then "▁ab" joins the remaining "b"
    assert [tok.token_text(i) for i in ids] == ["\u2581ab"]
    ids = tok.encode("é", add_special=False)
    assert [tok.token_text(i) for i in ids] == ["\u2581", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "é"
    assert tok.encode("a")[0] == tok.bos_id == 1


def test_spm_space_prefix_after_special_tokens():
    tok = Tokenizer.from_metadata(spm_metadata({"\u2581": -1.0, "x": -1.0, "\u2581x": -0.1}))
    ids = tok.encode("x</s>x", add_special=False, parse_special=True)
    assert [tok.token_text(i) for i in ids] == ["\u2581x", "</s>", "\u2581x"]
    plain = tok.encode("x</s>x", add_special=False, parse_special=False)
    assert tok.eos_id not in plain


def test_bpe_merges_lowest_rank_first_leftmost_on_ties():
    tok = Tokenizer.from_metadata(bpe_metadata(["a a", "b c", "a b"]))
    text = lambda ids: [tok.token_text(i) for i in ids]  # noqa: E731
    assert text(tok.encode("aaa", add_special=False)) == ["aa", "a"]  # leftmost pair first
    assert text(tok.encode("abc", add_special=False)) == ["a", "bc"]  # rank 1 (bc) before rank 2 (ab)
    assert text(tok.encode("ab", add_special=False)) == ["ab"]
    # a space is its own pre-token in front of a non-letter run only; bytes outside merges stay bytes
    assert tok.decode(tok.encode("ab \u00e9!", add_special=False)) == "ab \u00e9!"


def test_user_defined_tokens_split_even_without_parse_special():
    md = bpe_metadata(["a b"], [("<tool>", USER), ("<|end|>", CONTROL)])
    tok = Tokenizer.from_metadata(md)
    tool, end = tok.token_to_id["<tool>"], tok.token_to_id["<|end|>"]
    assert tool in tok.encode("ab<tool>ab", add_special=False)
    assert end not in tok.encode("ab<|end|>", add_special=False)
    assert tok.encode("ab<|end|>", add_special=False, parse_special=True)[-1] == end
    assert end in tok.eog_ids
    assert tok.decode([tool, end]) == "<tool>"  # control tokens are left out ...
    assert tok.decode([tool, end], special=True) == "<tool><|end|>"  # ... unless asked for


def test_longest_special_token_wins():
    md = bpe_metadata(["a b"], [("<a>", CONTROL), ("<a><b>", CONTROL), ("<b>", CONTROL)])
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("<a><b><b>", add_special=False, parse_special=True)
    assert [tok.token_text(i) for i in ids] == ["<a><b>", "<b>"]


def test_incremental_decoder_waits_for_complete_utf8():
    tok = Tokenizer.from_metadata(spm_metadata({"\u2581": -1.0}))
    c3, a9, f0 = (tok.token_to_id[f"<0x{b:02X}>"] for b in (0xC3, 0xA9, 0xF0))
    stream = IncrementalDecoder(tok)
    assert stream.push(c3) == ""
    assert stream.push(a9) == "é"
    assert stream.push(tok.bos_id) == ""  # control tokens are not text
    assert stream.push(f0) == ""
    assert stream.flush() == "\ufffd"  # an unfinished sequence at the very end
    special = IncrementalDecoder(tok, special=True)
    assert special.push(tok.eos_id) == "</s>"


def test_clean_spaces_like_reference_detokenizer():
    assert _clean_spaces(b"Hello , world ! Ok ?") == b"Hello, world! Ok?"
    assert _clean_spaces(b"a ' b") == b"a'b"
    assert _clean_spaces(b"it 's we 're I 'm don 't") == b"it's we're I'm don 't"
    assert _clean_spaces(b"") == b""


def test_pre_tokenizer_splits():
    assert PreTokenizer("qwen2").split("Hello  world123\n\n  x") == ["Hello", " ", " world", "1", "2", "3", "\n\n", " ", " x"]
    assert PreTokenizer("llama-bpe").split("12345 it's") == ["123", "45", " it", "'s"]
    assert PreTokenizer("gpt-2").split("naïve café") == ["naïve", " café"]


def test_category_classes_agree_with_unicodedata():
    classes = {k: re.compile(f"[{v}]") for k, v in _category_classes().items() if k in "LNPSM"}
    for cp in list(range(0, 0x3000, 7)) + [0x1F600, 0x20000, 0x1D518, 0xE0041, 0x10FFFD]:
        ch = chr(cp)
        major = unicodedata.category(ch)[0]
        for name, pattern in classes.items():
            assert bool(pattern.match(ch)) == (major == name), (hex(cp), name)


def test_stored_category_ranges_are_this_pythons_unicodedata():
    """unicode_ranges.py is the scan's result; regenerate it with
    `python -m ukgpu.llama_core.text.pretokenize` when Python's Unicode version changes."""
    if unicode_ranges.UNIDATA_VERSION != unicodedata.unidata_version:
        pytest.skip(f"stored ranges are for Unicode {unicode_ranges.UNIDATA_VERSION}: this Python scans")
    stored = {k: tuple(zip(v[0::2], v[1::2])) for k, v in unicode_ranges.RANGES.items()}
    assert stored == scan_ranges()


def test_category_classes_match_every_code_point_like_the_escaped_classes():
    """The classes hold literal characters (escaped where `re` would read syntax): the same set
    as `\\U` escapes of the ranges, for every code point, alone and negated."""
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    classes = _category_classes()
    for major, ranges in scan_ranges().items():
        escaped = "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
        assert re.findall(f"[{classes[major]}]", everything) == re.findall(f"[{escaped}]", everything)
        assert (re.findall(f"[^{classes[major]}{classes['s']}]", everything)
                == re.findall(f"[^{escaped}{classes['s']}]", everything))


@pytest.mark.parametrize("md, message", [
    ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "only 'llama'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "klingon",
      "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": ["a a"]}, "unsupported pre-tokenizer 'klingon'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "without tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "llama"}, "no tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
      "tokenizer.ggml.token_type": [1]}, "token_type has 1 entries for 2 tokens"),
])
def test_unusable_metadata_raises_clear_errors(md, message):
    with pytest.raises(TokenizerError, match=re.escape(message)):
        Tokenizer.from_metadata(md)


def test_bad_ids_and_inputs_raise():
    tok = Tokenizer.from_metadata(spm_metadata({"\u2581": -1.0}))
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="takes a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    assert tok.decode(tok.encode("\ud800x", add_special=False)) == "?x"  # lone surrogate


def test_cli_tokenize_ids_and_decode(capsys):
    from pathlib import Path

    from ukgpu.llama_core.gguf.file import open_gguf
    from ukgpu.tools.cli import main

    path = str(Path(__file__).resolve().parent.parent / "data" / "vocab" / "ggml-vocab-llama-spm.gguf")
    tok = Tokenizer.from_gguf(open_gguf(path))
    expected = tok.encode("Hello</s> wörld", parse_special=True)
    assert main(["tokenize", "-m", path, "Hello</s> wörld"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[0]) for line in lines] == expected
    assert lines[0].split(None, 1)[1] == "'<s>'" and "'</s>'" in lines[2]
    assert main(["tokenize", "-m", path, "--ids", "--no-special", "Hello</s>"]) == 0
    plain = [int(x) for x in capsys.readouterr().out.split()]
    assert plain == tok.encode("Hello</s>", add_special=False) and tok.eos_id not in plain
    assert main(["tokenize", "-m", path, "--decode", *map(str, expected)]) == 0
    # SentencePiece prefixes a space to text after a special token; with specials shown,
    # the first piece is "<s>" so the prefix space of "▁Hello" stays too
    assert capsys.readouterr().out == "<s> Hello</s>  wörld\n"
