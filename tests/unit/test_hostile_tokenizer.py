"""Hostile vocabularies and prompts: a typed error naming the key, bounded memory, same ids.

A crafted `tokenizer.ggml.*` value must raise TokenizerError naming the key (not a
TypeError from deep inside encoding, nor be silently ignored); the BPE word cache must stay
within its byte budget whatever words clients send, from any number of threads; and the
integer-keyed merge queue must give the ids of the plain "merge the lowest rank, leftmost"
definition.
"""

from __future__ import annotations

import random
import threading
import tracemalloc
from pathlib import Path

import pytest
from test_tokenizer import BYTE, CONTROL, bpe_metadata, spm_metadata

from ukgpu.llama_core.errors import TokenizerError
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.text.bpe import BpeModel, _merge_symbols
from ukgpu.llama_core.text.tokenizer import Tokenizer

VOCAB_DIR = Path(__file__).resolve().parent.parent / "data" / "vocab"


def _bpe(**changes) -> dict:
    md = bpe_metadata(["a b", "ab c"], [("<|end|>", CONTROL)])
    md.update(changes)
    return md


def _spm(**changes) -> dict:
    md = spm_metadata({"\u2581a": -1.0})
    md.update(changes)
    return md


HOSTILE = {
    "tokens not an array": (_bpe(**{"tokenizer.ggml.tokens": "abc"}), "tokenizer.ggml.tokens"),
    "tokens of numbers": (_bpe(**{"tokenizer.ggml.tokens": [1, 2, 3]}), r"tokenizer.ggml.tokens\[0\]"),
    "token_type of strings": (_bpe(**{"tokenizer.ggml.token_type": ["x"] * 300}), "tokenizer.ggml.token_type"),
    "token_type of floats": (_spm(**{"tokenizer.ggml.token_type": [1.5] * 300}), "tokenizer.ggml.token_type"),
    "token_type a number": (_spm(**{"tokenizer.ggml.token_type": 7}), "tokenizer.ggml.token_type"),
    "byte type on a word": (_spm(**{"tokenizer.ggml.token_type": [2, CONTROL, CONTROL] + [BYTE] * 257}),
                            "tokenizer.ggml.token_type marks token 259"),
    "scores short": (_spm(**{"tokenizer.ggml.scores": [0.0]}), "tokenizer.ggml.scores has 1 entries"),
    "scores of strings": (_spm(**{"tokenizer.ggml.scores": ["x"] * 300}), "tokenizer.ggml.scores"),
    "merges a string": (_bpe(**{"tokenizer.ggml.merges": "a b"}), "tokenizer.ggml.merges"),
    "merge of unknown tokens": (_bpe(**{"tokenizer.ggml.merges": ["a b", "zz q"]}), r"tokenizer.ggml.merges\[1\]"),
    "merge without a space": (_bpe(**{"tokenizer.ggml.merges": ["ab"]}), r"tokenizer.ggml.merges\[0\]"),
    "merge not a string": (_bpe(**{"tokenizer.ggml.merges": [7]}), r"tokenizer.ggml.merges\[0\]"),
    "bos past the end": (_bpe(**{"tokenizer.ggml.bos_token_id": 10**6}), "tokenizer.ggml.bos_token_id"),
    "eos negative": (_spm(**{"tokenizer.ggml.eos_token_id": -1}), "tokenizer.ggml.eos_token_id"),
    "eos a string": (_spm(**{"tokenizer.ggml.eos_token_id": "2"}), "tokenizer.ggml.eos_token_id"),
    "add_bos a string": (_spm(**{"tokenizer.ggml.add_bos_token": "no"}), "tokenizer.ggml.add_bos_token"),
    "pre an array": (_bpe(**{"tokenizer.ggml.pre": ["gpt-2"]}), "tokenizer.ggml.pre"),
    "model an array": (_bpe(**{"tokenizer.ggml.model": ["gpt2"]}), "tokenizer.ggml.model"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_metadata_names_the_key(name):
    md, key = HOSTILE[name]
    with pytest.raises(TokenizerError, match=key):
        Tokenizer.from_metadata(md)


def test_unmodified_hostile_bases_are_valid():
    for md in (_bpe(), _spm()):
        tok = Tokenizer.from_metadata(md)
        assert tok.decode(tok.encode("abc a", add_special=False)) == "abc a"


def _reference_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """The definition: merge the lowest-ranked adjacent pair, the leftmost on ties, until none is left."""
    while True:
        ranked = [(ranks[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in ranks]
        if not ranked:
            return symbols
        _, i = min(ranked)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]


def test_integer_keyed_merge_queue_matches_the_definition():
    rng = random.Random(5)
    for _ in range(300):
        vocab = set("abc")
        merges: dict[tuple[str, str], int] = {}
        for _ in range(rng.randint(1, 12)):
            left, right = rng.choice(sorted(vocab)), rng.choice(sorted(vocab))
            if (left, right) not in merges:
                merges[(left, right)] = len(merges)
                vocab.add(left + right)
        word = list("".join(rng.choice("abc") for _ in range(rng.randint(0, 30))))
        assert _merge_symbols(list(word), merges) == _reference_merge(word, merges), (word, merges)


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(VOCAB_DIR / "ggml-vocab-gpt-2.gguf"))


def _retained_bytes(action) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_long_distinct_words_are_not_kept(gpt2):
    """Each request's one huge 'word' used to stay in the cache: 25 x 1 MB took a server from 717 to 1136 MB."""
    model: BpeModel = gpt2._model
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000)) for _ in range(12)]
    ids = [gpt2.encode(w, add_special=False) for w in words]
    assert not set(words) & set(model._cache)
    assert [gpt2.encode(w, add_special=False) for w in words] == ids
    assert max(map(len, model._cache), default=0) <= model.CACHE_WORD_CHARS


def test_word_cache_keeps_to_its_byte_budget(monkeypatch):
    tok = Tokenizer.from_metadata(_bpe())
    model: BpeModel = tok._model
    monkeypatch.setattr(model, "CACHE_BYTES", 64 << 10)
    words = " ".join(f"w{i:05d}x" for i in range(6000))
    retained = _retained_bytes(lambda: tok.encode(words, add_special=False))
    assert 0 < model._cache_bytes <= 64 << 10
    assert retained < 256 << 10, f"{retained} bytes retained with a 64 KiB cache budget"


def test_cache_is_consistent_under_threads(gpt2, monkeypatch):
    """The API encodes in a thread pool while the scheduler decodes: one cache, many threads."""
    model: BpeModel = gpt2._model
    monkeypatch.setattr(model, "CACHE_BYTES", 16 << 10)  # clears often: the racy moment
    rng = random.Random(2)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "x" * rng.randint(1, 40), "\u00e9t\u00e9"])
                      for _ in range(400)) for _ in range(8)]
    expected = [gpt2.encode(t, add_special=False) for t in texts]
    failures: list[str] = []

    def work(k: int) -> None:
        for _ in range(3):
            for i in range(len(texts)):
                j = (i + k) % len(texts)
                if gpt2.encode(texts[j], add_special=False) != expected[j]:
                    failures.append(f"thread {k}, text {j}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert model._cache_bytes <= model.CACHE_BYTES
    assert all(isinstance(ids, tuple) for ids in model._cache.values())  # shared values are immutable
