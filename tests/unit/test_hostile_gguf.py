"""Hostile GGUF files: bounded memory and time at open, one GGUFError naming the key.

A 236 KB file with `llama.block_count = 2^32-1` took 2.4 GB in 46 s (a shape entry per
block was built before any tensor was looked at); metadata arrays inflated 9-12x into
Python lists (a 16M-token vocabulary: 1.5 GB, 69 s).  Opening must cost at most about the
file's size in memory, and every nonsense hyperparameter must be refused by name.
"""

from __future__ import annotations

import math
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
from time_limit import time_limit

from ukgpu.llama_core.errors import GGUFError
from ukgpu.llama_core.gguf.file import MAX_OBJECTS, GGUFArray, open_gguf

DIM, HEADS, KV_HEADS, FFN, VOCAB = 8, 2, 1, 16, 8


def write_model(path, **overrides) -> None:
    """A one-block F32 llama; `overrides` replace (or, as None, drop) `llama.*` keys."""
    keys = {"block_count": 1, "context_length": 64, "embedding_length": DIM, "feed_forward_length": FFN,
            "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
            "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-5}
    keys.update({k.replace("__", "."): v for k, v in overrides.items()})
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in keys.items():
        if isinstance(value, float):
            w.add_float32(f"llama.{key}", value)
        elif isinstance(value, int):
            w.add_int64(f"llama.{key}", value)
        elif value is not None:
            w.add_string(f"llama.{key}", value)
    head = DIM // HEADS
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,), "blk.0.attn_norm.weight": (DIM,),
              "blk.0.ffn_norm.weight": (DIM,), "blk.0.attn_q.weight": (DIM, DIM),
              "blk.0.attn_k.weight": (KV_HEADS * head, DIM), "blk.0.attn_v.weight": (KV_HEADS * head, DIM),
              "blk.0.attn_output.weight": (DIM, DIM), "blk.0.ffn_gate.weight": (FFN, DIM),
              "blk.0.ffn_up.weight": (FFN, DIM), "blk.0.ffn_down.weight": (DIM, FFN)}
    for name, shape in shapes.items():
        w.add_tensor(name, np.ones(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_the_base_model_is_valid(tmp_path):
    write_model(tmp_path / "m.gguf")
    cfg = open_gguf(tmp_path / "m.gguf").config
    assert (cfg.n_layers, cfg.head_dim, cfg.rope_dim, cfg.n_kv_heads) == (1, DIM // HEADS, DIM // HEADS, KV_HEADS)


NONSENSE = {
    "block_count 2^32-1": ({"block_count": 2**32 - 1}, "llama.block_count"),
    "block_count past the tensors": ({"block_count": 4000}, "llama.block_count"),
    "block_count 0": ({"block_count": 0}, "llama.block_count"),
    "rope dims odd": ({"rope__dimension_count": 3}, "llama.rope.dimension_count"),
    "rope dims past the head": ({"rope__dimension_count": 8}, "llama.rope.dimension_count"),
    "rope dims 0": ({"rope__dimension_count": 0}, "llama.rope.dimension_count"),
    "freq_base NaN": ({"rope__freq_base": math.nan}, "llama.rope.freq_base"),
    "freq_base inf": ({"rope__freq_base": math.inf}, "llama.rope.freq_base"),
    "freq_base 0": ({"rope__freq_base": 0.0}, "llama.rope.freq_base"),
    "freq_base negative": ({"rope__freq_base": -5.0}, "llama.rope.freq_base"),
    "freq_base a string": ({"rope__freq_base": "1e4"}, "llama.rope.freq_base"),
    "rope scaling factor 0": ({"rope__scaling__type": "linear", "rope__scaling__factor": 0.0},
                              "llama.rope.scaling.factor"),
    "eps negative": ({"attention__layer_norm_rms_epsilon": -1e-5}, "llama.attention.layer_norm_rms_epsilon"),
    "heads 0": ({"attention__head_count": 0}, "llama.attention.head_count"),
    "heads do not divide the width": ({"attention__head_count": 3, "attention__head_count_kv": 1},
                                      "llama.attention.head_count"),
    "kv heads do not divide": ({"attention__head_count_kv": 3, "attention__head_count": 2},
                               "llama.attention.head_count_kv"),
    "kv heads 0": ({"attention__head_count_kv": 0}, "llama.attention.head_count_kv"),
    "context 0": ({"context_length": 0}, "llama.context_length"),
    "context 2^40": ({"context_length": 2**40}, "llama.context_length"),
    "width 2^40": ({"embedding_length": 2**40}, "llama.embedding_length"),
    "head size 2^31": ({"attention__key_length": 2**31}, "llama.attention.key_length"),
}


@pytest.mark.parametrize("name", list(NONSENSE))
def test_nonsense_hyperparameters_name_the_key(tmp_path, name):
    overrides, key = NONSENSE[name]
    path = tmp_path / "m.gguf"
    write_model(path, **overrides)
    with time_limit(5), pytest.raises(GGUFError, match=key.replace(".", r"\.")):
        _ = open_gguf(path).config


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_arrays(path, arrays: dict[str, tuple[int, int, bytes]]) -> int:
    """A metadata-only GGUF: {key: (element type, count, raw elements)}; returns its size."""
    body = b"".join(_string(k) + struct.pack("<IIQ", 9, t, n) + raw for k, (t, n, raw) in arrays.items())
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(arrays)) + body
    path.write_bytes(data)
    return len(data)


def _strings(n: int) -> bytes:
    rec = np.zeros(n, dtype=[("len", "<u8"), ("a", "u1"), ("b", "u1")])
    rec["len"], rec["a"], rec["b"] = 2, 97 + np.arange(n) % 26, 97 + np.arange(n) // 26 % 26
    return rec.tobytes()


def test_large_arrays_cost_about_their_bytes(tmp_path):
    """500k strings and 2M integers: lists took ~10x the file; now offsets and a view."""
    n_str, n_int = 500_000, 2_000_000
    path = tmp_path / "arrays.gguf"
    size = write_arrays(path, {"x.strings": (8, n_str, _strings(n_str)),
                               "x.ints": (5, n_int, np.arange(n_int, dtype="<i4").tobytes())})
    tracemalloc.start()
    try:
        start = time.perf_counter()
        f = open_gguf(path)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.2 * size, f"opening a {size}-byte file peaked at {peak} bytes"
    assert seconds < 10
    strings, ints = f.metadata["x.strings"], f.metadata["x.ints"]
    assert len(strings) == n_str and strings[27] == "bb" and strings[-1] == _strings(n_str)[-2:].decode()
    assert np.shares_memory(np.asarray(ints), f.bytes) and ints[-1] == n_int - 1


def test_metadata_arrays_behave_like_lists(tmp_path):
    path = tmp_path / "small.gguf"
    write_arrays(path, {"s": (8, 3, _string("a") + _string("\u00e9") + _string("")),
                        "b": (7, 3, bytes([0, 1, 2])), "f": (6, 2, struct.pack("<ff", 0.5, -1.0)),
                        "nested": (9, 2, struct.pack("<IQ", 4, 1) + struct.pack("<I", 7) + struct.pack("<IQ", 8, 0))})
    md = open_gguf(path).metadata
    assert md["s"] == ["a", "\u00e9", ""] and md["s"][1:] == ["\u00e9", ""] and list(md["s"]) == ["a", "\u00e9", ""]
    assert md["b"] == [False, True, True] and md["b"][2] is True
    assert md["f"] == (0.5, -1.0) and md["f"] != [0.5] and md["f"] != "ab"
    assert md["nested"] == [[7], []] and isinstance(md["nested"][0], GGUFArray)
    assert "a" in md["s"] and md["s"].index("") == 2
    with pytest.raises(IndexError):
        md["s"][3]
    with pytest.raises(TypeError):
        np.asarray(md["s"])
    assert "3 strings" in repr(md["s"])


def test_bad_utf8_in_an_array_is_a_gguf_error_naming_the_key(tmp_path):
    path = tmp_path / "utf8.gguf"
    write_arrays(path, {"tokenizer.ggml.tokens": (8, 2, _string("ok") + struct.pack("<Q", 1) + b"\xff")})
    tokens = open_gguf(path).metadata["tokenizer.ggml.tokens"]
    assert tokens[0] == "ok"
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.tokens'\[1\] is not valid UTF-8"):
        tokens[1]


def test_strings_past_the_end_are_refused(tmp_path):
    path = tmp_path / "cut.gguf"
    write_arrays(path, {"s": (8, 2, _string("ok") + struct.pack("<Q", 2**63))})
    with pytest.raises(GGUFError, match="run past the end"):
        open_gguf(path)


def test_too_many_nested_arrays_are_refused(tmp_path):
    """An empty inner array is 12 bytes in the file but ~200 as a Python object: their number is capped."""
    path = tmp_path / "nested.gguf"
    n = MAX_OBJECTS + 1
    write_arrays(path, {"x.nested": (9, n, struct.pack("<IQ", 4, 0) * n)})
    with pytest.raises(GGUFError, match="nested arrays"):
        open_gguf(path)
