"""The default models' tokenizers vs llama.cpp.

`tests/data/vocab/<model>.tokens.json` holds llama.cpp's ids and
detokenizations for a list of tricky strings (tools/dev/golden_tokens.py); a
second test asks llama.cpp itself, live, when llama-cpp-python is installed.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from test_tokenizer_vocab import check_golden, check_vocab_facts

from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.text.tokenizer import IncrementalDecoder, Tokenizer

VOCAB_DIR = Path(__file__).resolve().parent.parent / "data" / "vocab"


@pytest.fixture(scope="module")
def smollm(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(smollm2_path))


@pytest.fixture(scope="module")
def qwen(qwen05_path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(qwen05_path))


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


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_live_against_llama_cpp(name, request):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed here")
    path = request.getfixturevalue("smollm2_path" if name.startswith("smollm") else "qwen05_path")
    tok = Tokenizer.from_gguf(open_gguf(path))
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    rng = random.Random(1)
    alphabet = "ab cd\n\t  'sé日本🦙😁,.!?0123456789<|im_end|>" + "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(40))
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        for parse_special in (False, True):
            expected = ref.tokenize(text.encode("utf-8"), add_bos=True, special=parse_special)
            assert tok.encode(text, add_special=True, parse_special=parse_special) == expected, text
