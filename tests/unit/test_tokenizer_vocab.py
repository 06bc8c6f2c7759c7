"""Tokenizer vs llama.cpp on real vocabularies.

Two sources of truth, both produced by llama.cpp from the same GGUF files:
- `ggml-vocab-*.gguf.inp/.out`: test strings and the ids llama.cpp's own test
  expects (tokenized with add_special=False, parse_special=False);
- `<name>.tokens.json` (tools/dev/golden_tokens.py): ids for every add_special /
  parse_special combination on extra tricky strings, llama.cpp's
  whole-sequence detokenization, per-token pieces (as a hash), BOS/EOS and
  the end-of-generation set.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.text.pretokenize import PreTokenizer
from ukgpu.llama_core.text.tokenizer import Tokenizer

VOCAB_DIR = Path(__file__).resolve().parent.parent / "data" / "vocab"
VOCABS = ("llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2", "starcoder", "deepseek-coder",
          "falcon", "mpt", "refact")
INP_SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module", params=VOCABS)
def vocab(request) -> tuple[str, Tokenizer]:
    name = request.param
    return name, Tokenizer.from_gguf(open_gguf(VOCAB_DIR / f"ggml-vocab-{name}.gguf"))


def inp_out_cases(name: str) -> list[tuple[str, list[int]]]:
    texts = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(INP_SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()
    lines = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.out").read_text().splitlines()
    assert len(texts) == len(lines) > 10
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def golden(name: str) -> dict:
    return json.loads((VOCAB_DIR / f"{name}.tokens.json").read_text())


def pieces_sha256(tok: Tokenizer, special: bool) -> str:
    digest = hashlib.sha256()
    for token in range(tok.vocab_size):
        data = tok.piece_bytes(token, special)
        digest.update(struct.pack("<I", len(data)) + data)
    return digest.hexdigest()


def expected_decode(tok: Tokenizer, case: dict) -> str:
    """llama.cpp's detokenization, except for one intended difference.

    llama.cpp drops a SentencePiece model's prefix space only from the very
    first token, so a leading BOS keeps it (" Hello"); decode drops it from
    the first rendered piece ("Hello"), making decode(encode(s)) == s.
    """
    text = case["detok"]
    ids = case["ids"]
    if tok.add_space_prefix and ids and tok.is_control(ids[0]) and text.startswith(" "):
        return text[1:]
    return text


def check_golden(tok: Tokenizer, data: dict) -> None:
    assert tok.vocab_size == data["n_tokens"]
    failures = []
    for case in data["cases"]:
        ids = tok.encode(case["text"], add_special=case["add_special"], parse_special=case["parse_special"])
        if ids != case["ids"]:
            failures.append(("encode", case["text"], case["add_special"], case["parse_special"], case["ids"], ids))
        elif tok.decode(ids) != expected_decode(tok, case):
            failures.append(("decode", case["text"], expected_decode(tok, case), tok.decode(ids)))
        elif tok.decode(ids, special=True) != case["detok_special"]:
            failures.append(("decode special", case["text"], case["detok_special"], tok.decode(ids, special=True)))
    assert not failures, f"{len(failures)} of {len(data['cases'])} cases differ, first: {failures[:3]}"


def check_vocab_facts(tok: Tokenizer, data: dict) -> None:
    assert (tok.bos_id, tok.eos_id) == (data["special_ids"]["bos"], data["special_ids"]["eos"])
    assert tok.add_bos == data["add_bos"]
    assert sorted(tok.eog_ids) == data["eog_ids"]
    if tok.eot_id is not None:  # llama.cpp picks among several candidates in hash order
        assert tok.eot_id in tok.eog_ids
    assert pieces_sha256(tok, special=True) == data["pieces_sha256"]["special"]
    assert pieces_sha256(tok, special=False) == data["pieces_sha256"]["plain"]


def test_inp_strings_encode_to_llama_cpp_ids(vocab):
    name, tok = vocab
    failures = [(text, ids, got) for text, ids in inp_out_cases(name)
                if (got := tok.encode(text, add_special=False)) != ids]
    assert not failures, f"{name}: {len(failures)} strings differ, first: {failures[:3]}"


def test_inp_strings_round_trip_like_llama_cpp(vocab):
    """decode(encode(s)) == s exactly where llama.cpp's detokenization gives s back."""
    name, tok = vocab
    data = golden(name)
    inp = {text for text, _ in inp_out_cases(name)}
    checked = 0
    for case in data["cases"]:
        if case["text"] in inp and not case["add_special"] and case["detok"] == case["text"]:
            assert tok.decode(tok.encode(case["text"], add_special=False)) == case["text"]
            checked += 1
    assert checked >= 10


def test_golden_cases_match_llama_cpp(vocab):
    name, tok = vocab
    check_golden(tok, golden(name))


def test_vocab_facts_match_llama_cpp(vocab):
    name, tok = vocab
    check_vocab_facts(tok, golden(name))


@pytest.mark.parametrize("name", ["qwen2", "llama-spm"])
def test_decode_inverts_encode_on_arbitrary_text(name):
    """Byte-level BPE without space cleaning and SentencePiece with byte fallback lose nothing."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tok = Tokenizer.from_gguf(open_gguf(VOCAB_DIR / f"ggml-vocab-{name}.gguf"))
    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40)

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(text)
    def round_trip(s):
        assert tok.decode(tok.encode(s, add_special=False)) == s
        assert tok.decode(tok.encode(s, add_special=True)) == s

    round_trip()


@pytest.mark.parametrize("pre", ["tekken", "gpt-4o"])
def test_synthetic_vocabularies_match_llama_cpp(pre):
    """Mistral's tekken and GPT-4o's pre-tokenizers (Mistral Nemo/Small, Phi-4-mini): no shipped
    vocabulary uses them, so tools/dev/synthetic_vocab.py writes one whose pair merges make
    every word boundary show in the ids, and llama.cpp's ids for it are the reference."""
    tok = Tokenizer.from_gguf(open_gguf(VOCAB_DIR / f"synthetic-{pre}.gguf"))
    assert tok.pre == pre
    data = golden(f"synthetic-{pre}")
    check_golden(tok, data)
    check_vocab_facts(tok, data)
    assert PreTokenizer(pre).split("camelCaseWord HTTPServer") == ["camel", "Case", "Word", " HTTPServer"]
    whole = tok.encode("camel", add_special=False) == [tok.token_to_id["camel"]]  # no merge path leads there
    assert whole == (pre == "tekken")  # tekken takes a word that is a vocabulary entry whole
