"""The real models' tokenizers vs llama.cpp.

`tests/data/vocab/<model>.tokens.json` holds llama.cpp's ids and
detokenizations for a list of tricky strings (tools/dev/golden_tokens.py); a
second test asks llama.cpp itself, live, when llama-cpp-python is installed.
The two default models are pulled on first use; Gemma 3 270M (262,144
SentencePiece pieces) is checked where it has been pulled
(`ukgpu models pull gemma3-270m`).
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
from test_model_live import reference_python
from test_tokenizer_vocab import check_golden, check_vocab_facts

from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.models import registry
from ukgpu.llama_core.text.tokenizer import IncrementalDecoder, Tokenizer

VOCAB_DIR = Path(__file__).resolve().parent.parent / "data" / "vocab"


@pytest.fixture(scope="module")
def smollm(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(smollm2_path))


@pytest.fixture(scope="module")
def qwen(qwen05_path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(qwen05_path))


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    if not registry.is_cached("gemma3-270m"):
        pytest.skip("gemma3-270m is not pulled here: run `ukgpu models pull gemma3-270m`")
    return registry.model_path("gemma3-270m")


@pytest.fixture(scope="module")
def gemma(gemma3_path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(gemma3_path))


def golden(name: str) -> dict:
    return json.loads((VOCAB_DIR / f"{name}.tokens.json").read_text())


def test_smollm2_matches_llama_cpp(smollm):
    assert smollm.pre == "smollm"
    check_golden(smollm, golden("smollm2-135m"))
    check_vocab_facts(smollm, golden("smollm2-135m"))


def test_qwen25_matches_llama_cpp(qwen):
    assert qwen.pre == "qwen2"
    check_golden(qwen, golden("qwen2.5-coder-0.5b"))
    check_vocab_facts(qwen, golden("qwen2.5-coder-0.5b"))


def test_chat_markers_are_single_tokens_only_with_parse_special(qwen, smollm):
    for tok in (qwen, smollm):
        start, end = tok.token_to_id["<|im_start|>"], tok.token_to_id["<|im_end|>"]
        ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special=False, parse_special=True)
        assert ids[0] == start and ids[-1] == end
        plain = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special=False)
        assert start not in plain and end not in plain
        assert end in tok.eog_ids


def test_qwen_eog_covers_chat_and_fim_ends(qwen):
    ends = {qwen.token_to_id[t] for t in ("<|im_end|>", "<|endoftext|>", "<|fim_pad|>", "<|file_sep|>")}
    assert ends <= qwen.eog_ids
    assert qwen.eos_id == qwen.token_to_id["<|im_end|>"]
    assert not qwen.add_bos and qwen.encode("hi")[0] != qwen.bos_id


def test_streaming_decode_equals_whole_decode(qwen, smollm):
    text = "naïve 日本語 🦙🚀 👩‍👩‍👧 code:\n\tx = 1  # ok"
    for tok in (qwen, smollm):
        ids = tok.encode(text, add_special=False)
        stream = IncrementalDecoder(tok)
        chunks = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(chunks) == text == tok.decode(ids)
        assert all("\ufffd" not in c for c in chunks)


def test_encoding_2kb_is_fast(qwen):
    rng = random.Random(0)
    words = ["def", "return", "self", "naïve", "日本", "🦙", "12345", "  ", "\n", "x_1", "(a, b)"]
    text = " ".join(rng.choice(words) + str(rng.randrange(10**6)) for _ in range(400))[:2048]
    start = time.perf_counter()
    ids = qwen.encode(text)
    elapsed = time.perf_counter() - start
    assert qwen.decode(ids) == text
    assert elapsed < 0.1, f"encoding 2 KB took {elapsed * 1e3:.1f} ms"


LIVE_SCRIPT = r"""
import json, sys
import llama_cpp
ref = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = json.loads(open(sys.argv[2], encoding="utf-8").read())
ids = [[ref.tokenize(t.encode("utf-8"), add_bos=True, special=p) for p in (False, True)] for t in texts]
open(sys.argv[3], "w").write(json.dumps(ids))
"""


@pytest.mark.parametrize("fixture", ["smollm2_path", "qwen05_path", "gemma3_path"])
def test_live_against_llama_cpp(fixture, request, tmp_path):
    """Random strings (special-token texts among them) tokenized by llama.cpp itself, run under
    a Python that has llama-cpp-python (as in test_model_live.py)."""
    python = reference_python()
    if python is None:
        pytest.skip("llama-cpp-python not importable and no reference Python found; "
                    "set UKGPU_LLAMA_CPP_PYTHON to a Python that has it")
    path = request.getfixturevalue(fixture)
    tok = Tokenizer.from_gguf(open_gguf(path))
    rng = random.Random(1)
    alphabet = list("ab cd\n\t  'sé日本🦙😁,.!?0123456789") + ["<|im_end|>", "<end_of_turn>", "<start_of_turn>",
                                                            "\n\n", "   ", "<bos>", "<s>"]
    alphabet += [chr(rng.randrange(0x20, 0x3000)) for _ in range(40)]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))) for _ in range(300)]
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    subprocess.run([python, "-c", LIVE_SCRIPT, str(path), str(tmp_path / "texts.json"), str(tmp_path / "ids.json")],
                   check=True, timeout=300, capture_output=True)
    expected = json.loads((tmp_path / "ids.json").read_text())
    for text, (plain, parsed) in zip(texts, expected):
        assert tok.encode(text, add_special=True) == plain, text
        assert tok.encode(text, add_special=True, parse_special=True) == parsed, text


def test_gemma3_matches_llama_cpp(gemma):
    assert gemma.kind == "spm" and not gemma.add_space_prefix and gemma.add_bos
    check_golden(gemma, golden("gemma3-270m"))
    check_vocab_facts(gemma, golden("gemma3-270m"))


def test_gemma3_turn_markers_and_whitespace_tokens(gemma):
    """<start_of_turn>/<end_of_turn> are control tokens (parsed only on request) and end a turn;
    newline and space runs are user-defined pieces, taken whole even in plain text."""
    start, end = gemma.token_to_id["<start_of_turn>"], gemma.token_to_id["<end_of_turn>"]
    assert end in gemma.eog_ids and gemma.eot_id == end and start not in gemma.eog_ids
    ids = gemma.encode("<start_of_turn>user\nHi<end_of_turn>", add_special=False, parse_special=True)
    assert ids[0] == start and ids[-1] == end
    assert start not in gemma.encode("<start_of_turn>user", add_special=False)
    assert gemma.encode("\n\n\n", add_special=False) == [gemma.token_to_id["\n\n\n"]]
    assert gemma.encode("Hi", add_special=True)[:1] == [gemma.bos_id]


def test_gemma3_vocabulary_loads_and_encodes_fast(gemma3_path):
    """262,144 pieces: building the tokenizer stays well under a few seconds and 2 KB of text
    encodes in milliseconds (the special-token scan is one pass per special text)."""
    gguf = open_gguf(gemma3_path)
    start = time.perf_counter()
    tok = Tokenizer.from_gguf(gguf)
    loaded = time.perf_counter() - start
    text = ("The quick brown fox, naïve café 日本語 🦙 def f(x):\n    return x\n\n" * 40)[:2048]
    start = time.perf_counter()
    ids = tok.encode(text, add_special=False)
    encoded = time.perf_counter() - start
    assert tok.decode(ids) == text
    assert loaded < 5.0, f"loading the 262k vocabulary took {loaded:.2f} s"
    assert encoded < 0.2, f"encoding 2 KB took {encoded * 1e3:.1f} ms"


def test_gemma3_streaming_decode_spells_byte_fallback(gemma):
    """Characters outside Gemma's pieces are spelled with <0xNN> byte tokens: streamed, the
    text appears only once each UTF-8 sequence is complete."""
    text = "naïve 日本語 🦙🚀 👩‍👩‍👧\n\n\tx = 1  # ok"
    ids = gemma.encode(text, add_special=False)
    assert any(gemma.token_text(i).startswith("<0x") for i in ids)
    stream = IncrementalDecoder(gemma)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == text == gemma.decode(ids)
    assert all("\ufffd" not in c for c in chunks)
