"""Fuzzing what a model file says, not how it is framed: metadata values and tokenizer tables.

test_gguf_fuzz.py mutates bytes (the framing: counts, lengths, offsets).  Here the framing
stays valid and the *values* of the keys that the loader, the config, the tokenizer and the
chat template read are replaced by values of any GGUF type, deleted, cut short or edited
element by element, on a small complete model written in memory.  Every case must open,
configure, tokenize and render a chat, or stop with a UkgpuError, within a time bound and
a memory bound of a small multiple of the file's size.  A second test builds tokenizers
from random tables and encodes random text with them.
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from time_limit import time_limit

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.text.bpe import byte_alphabet
from ukgpu.llama_core.text.chat import chat_ids
from ukgpu.llama_core.text.tokenizer import IncrementalDecoder, Tokenizer

FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CASE_SECONDS = 10
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
DIM, HEADS, FFN = 8, 2, 16
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _vocab() -> tuple[list[str], list[int], list[str]]:
    chars = list(byte_alphabet())
    merges = ["h e", "l l", "o Ġ", "he ll"]
    tokens = chars + ["he", "ll", "oĠ", "hell"] + SPECIALS
    return tokens, [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS), merges


def base_metadata() -> dict[str, tuple[int, object]]:
    """{key: (GGUF type, value)}: a one-block llama with a byte-level BPE vocabulary."""
    tokens, types, merges = _vocab()
    u32 = 4
    return {
        "general.architecture": (STRING, "llama"),
        "llama.block_count": (u32, 1), "llama.context_length": (u32, 64), "llama.embedding_length": (u32, DIM),
        "llama.feed_forward_length": (u32, FFN), "llama.attention.head_count": (u32, HEADS),
        "llama.attention.head_count_kv": (u32, 1), "llama.rope.dimension_count": (u32, DIM // HEADS),
        "llama.rope.freq_base": (6, 10000.0), "llama.attention.layer_norm_rms_epsilon": (6, 1e-5),
        "tokenizer.ggml.model": (STRING, "gpt2"), "tokenizer.ggml.pre": (STRING, "qwen2"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)), "tokenizer.ggml.token_type": (ARRAY, (5, types)),
        "tokenizer.ggml.merges": (ARRAY, (STRING, merges)),
        "tokenizer.ggml.bos_token_id": (u32, len(tokens) - 1), "tokenizer.ggml.eos_token_id": (u32, len(tokens) - 2),
        "tokenizer.ggml.add_bos_token": (7, False), "tokenizer.chat_template": (STRING, TEMPLATE),
    }


EXTRA_KEYS = ["general.alignment", "llama.attention.key_length", "llama.rope.scaling.type",
              "llama.rope.scaling.factor", "tokenizer.ggml.scores", "tokenizer.ggml.add_eos_token",
              "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id"]


def encode_value(vtype: int, value: object) -> bytes:
    if vtype in _SCALARS:
        return value if isinstance(value, bytes) else struct.pack(_SCALARS[vtype], value)
    if vtype == STRING:
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        return struct.pack("<Q", len(data)) + data
    itype, items = value
    return struct.pack("<IQ", itype, len(items)) + b"".join(encode_value(itype, v) for v in items)


def write_gguf(md: dict[str, tuple[int, object]]) -> bytes:
    vocab_rows = 8
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens and tokens[0] == ARRAY and tokens[1][0] == STRING:
        vocab_rows = max(1, len(tokens[1][1]))
    shapes = {"token_embd.weight": (vocab_rows, DIM), "output_norm.weight": (DIM,), "blk.0.attn_norm.weight": (DIM,),
              "blk.0.ffn_norm.weight": (DIM,), "blk.0.attn_q.weight": (DIM, DIM), "blk.0.attn_k.weight": (4, DIM),
              "blk.0.attn_v.weight": (4, DIM), "blk.0.attn_output.weight": (DIM, DIM),
              "blk.0.ffn_gate.weight": (FFN, DIM), "blk.0.ffn_up.weight": (FFN, DIM),
              "blk.0.ffn_down.weight": (DIM, FFN)}
    kv = b"".join(encode_value(STRING, k) + struct.pack("<I", t) + encode_value(t, v) for k, (t, v) in md.items())
    infos, offset = b"", 0
    for name, shape in shapes.items():
        dims = tuple(reversed(shape))
        infos += encode_value(STRING, name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, offset)
        offset += -(-4 * int(np.prod(shape)) // 32) * 32
    head = b"GGUF" + struct.pack("<IQQ", 3, len(shapes), len(md)) + kv + infos
    return head + b"\0" * (-len(head) % 32) + np.ones(offset // 4, np.float32).tobytes()


# ---- strategies ---------------------------------------------------------------------------------

_INTERESTING = [0, 1, 2, 3, 4, 7, 8, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1]
_TEXTS = ["llama", "gpt2", "qwen2", "", "default", "smollm", "<|im_end|>", "linear", "yarn", "\u00e9\u6f22",
          "{{ messages }}", "{% for m in messages %}{{ m.content * 3 }}{% endfor %}", "{{ 1/0 }}", "{% if %}",
          "a b", "h e", "zz q", "<0x41>", "<0xZZ>"]


def scalar(vtype: int) -> st.SearchStrategy:
    size = struct.calcsize(_SCALARS[vtype])
    return st.one_of(st.binary(min_size=size, max_size=size),
                     st.sampled_from([v.to_bytes(8, "little")[:size] for v in _INTERESTING]))


def value_of(vtype: int, depth: int = 0) -> st.SearchStrategy:
    if vtype in _SCALARS:
        return scalar(vtype)
    if vtype == STRING:
        return st.one_of(st.sampled_from(_TEXTS), st.text(max_size=12), st.binary(max_size=6))
    inner = st.sampled_from([*_SCALARS, STRING] + ([ARRAY] if depth == 0 else []))
    return inner.flatmap(lambda t: st.lists(value_of(t, depth + 1), max_size=6).map(lambda items: (t, items)))


def any_value() -> st.SearchStrategy:
    return st.sampled_from([*_SCALARS, STRING, ARRAY]).flatmap(lambda t: value_of(t).map(lambda v: (t, v)))


def edits(md: dict) -> st.SearchStrategy:
    """A list of (key, operation, payload): replace with any value, delete, cut an array, or
    replace one element of an array with a value of its own type."""
    keys = st.sampled_from(list(md) + EXTRA_KEYS)
    one = st.one_of(
        st.tuples(keys, st.just("set"), any_value()),
        st.tuples(keys, st.just("delete"), st.none()),
        st.tuples(keys, st.just("cut"), st.integers(0, 300)),
        st.tuples(keys, st.just("element"), st.tuples(st.integers(0, 300), st.data())),
    )
    return st.lists(one, min_size=1, max_size=4)


def apply(md: dict, case: list) -> dict:
    md = dict(md)
    for key, op, payload in case:
        if op == "set":
            md[key] = payload
        elif op == "delete":
            md.pop(key, None)
        elif key in md and md[key][0] == ARRAY:
            itype, items = md[key][1]
            if op == "cut":
                md[key] = (ARRAY, (itype, items[:payload]))
            elif items:
                index, data = payload
                items = list(items)
                items[index % len(items)] = data.draw(value_of(itype, depth=1))
                md[key] = (ARRAY, (itype, items))
    return md


def exercise(path) -> None:
    """Everything a server does with a model file before generating; each stage may refuse it."""
    try:
        f = open_gguf(path)
    except UkgpuError:
        return
    try:
        _ = f.config
    except UkgpuError:
        pass
    try:
        tok = Tokenizer.from_gguf(f)
    except UkgpuError:
        return
    messages = [{"role": "user", "content": "hello <|im_end|> w\u00f6rld"}]
    try:
        ids = chat_ids(tok, f, messages)
    except UkgpuError:
        ids = tok.encode("hello <|im_start|>", parse_special=True)
    stream = IncrementalDecoder(tok, special=True)
    "".join(stream.push(i) for i in ids) + stream.flush()
    tok.decode(ids)


@pytest.fixture(scope="module")
def warm() -> None:
    """Compile the pre-tokenizer's Unicode classes and the sandbox once, outside the measured cases."""
    Tokenizer.from_metadata({k: (v[1][1] if v[0] == ARRAY else v[1]) for k, v in base_metadata().items()})


def test_fuzz_metadata_values(tmp_path, warm):
    base = base_metadata()
    path = tmp_path / "case.gguf"
    path.write_bytes(write_gguf(base))
    exercise(path)
    assert open_gguf(path).config.n_layers == 1  # unmutated it is valid, or the test proves nothing

    @FUZZ
    @given(edits(base))
    def run(case):
        data = write_gguf(apply(base, case))
        path.write_bytes(data)
        tracemalloc.start()
        try:
            with time_limit(CASE_SECONDS):
                exercise(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * len(data) + (4 << 20), f"peak {peak} bytes for a {len(data)}-byte file"

    run()


# ---- tokenizer tables -----------------------------------------------------------------------------

_PIECES = ["a", "b", "ab", " ", "\u2581", "\u2581a", "<s>", "</s>", "<0x41>", "<0xC3>", "<|im_end|>", "", "\u00e9", "Ġ"]


@st.composite
def tables(draw) -> dict:
    token = st.one_of(st.sampled_from(_PIECES), st.text(max_size=4), st.integers(0, 9))
    tokens = draw(st.lists(token, min_size=0, max_size=40))
    n = len(tokens)
    md = {"tokenizer.ggml.model": draw(st.sampled_from(["gpt2", "llama", "bert", 3])),
          "tokenizer.ggml.tokens": tokens}
    optional = {
        "tokenizer.ggml.token_type": st.lists(st.integers(-2, 8), min_size=max(0, n - 2), max_size=n + 2),
        "tokenizer.ggml.scores": st.lists(st.floats(allow_nan=True), min_size=max(0, n - 2), max_size=n + 2),
        "tokenizer.ggml.merges": st.lists(st.one_of(
            st.tuples(st.sampled_from(tokens or ["a"]), st.sampled_from(tokens or ["b"]))
            .map(lambda p: f"{p[0]} {p[1]}"),
            st.text(max_size=5)), max_size=20),
        "tokenizer.ggml.pre": st.sampled_from(["gpt-2", "llama-bpe", "qwen2", "default", "klingon", ""]),
        "tokenizer.ggml.bos_token_id": st.integers(-2, n + 2), "tokenizer.ggml.eos_token_id": st.integers(-2, n + 2),
        "tokenizer.ggml.add_bos_token": st.booleans(), "tokenizer.ggml.add_space_prefix": st.booleans(),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            md[key] = draw(strategy)
    return md


@FUZZ
@given(tables(), st.text(max_size=40), st.booleans())
def test_fuzz_tokenizer_tables(md, text, parse_special):
    with time_limit(CASE_SECONDS):
        try:
            tok = Tokenizer.from_metadata(md)
        except UkgpuError:
            return
        try:
            ids = tok.encode(text, add_special=True, parse_special=parse_special)
        except UkgpuError:  # a SentencePiece vocabulary without byte fallback cannot spell everything
            return
        assert all(0 <= i < tok.vocab_size for i in ids)
        tok.decode(ids, special=True)
        tok.decode(range(tok.vocab_size), special=True)  # every entry, whatever its type says
        stream = IncrementalDecoder(tok)
        "".join(stream.push(i) for i in ids) + stream.flush()
