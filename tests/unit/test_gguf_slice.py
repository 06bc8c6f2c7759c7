"""tools/dev/gguf_slice.py on SmolLM2-135M: the slice loads and runs on the CPU backend, and its
blocks compute exactly what the full model's first blocks compute."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "dev"))  # host-side scripts, not in the wheel
import gguf_slice  # noqa: E402

from ukgpu.llama_core.gguf.file import open_gguf  # noqa: E402
from ukgpu.llama_core.model import Model  # noqa: E402
from ukgpu.llama_core.text.tokenizer import Tokenizer  # noqa: E402

TEXT = "The capital of France is Paris, and the tallest mountain in Europe is"


@pytest.fixture(scope="module")
def sliced(smollm2_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slice") / "smollm2-2blk.gguf"
    info = gguf_slice.slice_gguf(smollm2_path, out, blocks=2, vocab=16384)
    assert info == {"blocks": 2, "vocab": 16384, "tensors": 2 * 9 + 2, "bytes": out.stat().st_size}
    return out


def test_the_slice_is_small_and_says_what_it_holds(sliced, smollm2_path):
    g = open_gguf(sliced)
    assert g.config.n_layers == 2 and g.config.vocab_size == 16384
    assert sliced.stat().st_size < 16 << 20 < smollm2_path.stat().st_size
    full = open_gguf(smollm2_path)
    for name in ("blk.1.ffn_down.weight", "blk.0.attn_q.weight", "output_norm.weight"):
        assert np.array_equal(np.asarray(g.tensors[name].data), np.asarray(full.tensors[name].data))
    embd = np.asarray(g.tensors["token_embd.weight"].data).reshape(-1)  # the first rows' bytes
    assert embd.nbytes == 16384 * 612  # Q8_0: 576 values a row in 18 blocks of 34 bytes
    assert np.array_equal(embd, np.asarray(full.tensors["token_embd.weight"].data).reshape(-1)[:embd.size])


def test_the_sliced_tokenizer_round_trips_with_ids_inside_the_slice(sliced, smollm2_path):
    tok, full = Tokenizer.from_gguf(open_gguf(sliced)), Tokenizer.from_gguf(open_gguf(smollm2_path))
    ids = tok.encode(TEXT)
    assert max(ids) < 16384 and tok.decode(ids) == TEXT
    assert max(full.encode(TEXT + " Mont Blanc")) >= 0  # the full vocabulary still loads


def test_the_slice_runs_on_the_cpu_and_its_blocks_equal_the_full_models(sliced, smollm2_path):
    ids = np.array(Tokenizer.from_gguf(open_gguf(sliced)).encode(TEXT))
    part = Model.load(sliced)
    logits = part.forward(ids, 0, part.new_kv(64))
    assert logits.shape == (len(ids), 16384) and np.isfinite(logits).all()
    full = Model.load(smollm2_path)
    want_30 = full.hidden_states(ids, 0, full.new_kv(64))
    full.weights.layers = full.weights.layers[:2]  # the full model stopped after its block 1
    want = full.hidden_states(ids, 0, full.new_kv(64))
    got = part.hidden_states(ids, 0, part.new_kv(64))
    assert np.array_equal(got, want)
    assert not np.allclose(got, want_30)  # 28 more blocks change the stream: the check can fail


def test_a_slice_past_the_model_is_refused(smollm2_path, tmp_path):
    with pytest.raises(gguf_slice.SliceError, match="the model has 30 blocks"):
        gguf_slice.slice_gguf(smollm2_path, tmp_path / "x.gguf", blocks=31)
    with pytest.raises(gguf_slice.SliceError, match="eos_token_id = 2 is not among the first 2"):
        gguf_slice.cut_tokenizer({"tokenizer.ggml.tokens": ["a", "b", "c"],
                                  "tokenizer.ggml.eos_token_id": 2}, 2)
    cut = gguf_slice.cut_tokenizer({"tokenizer.ggml.tokens": ["a", "b", "ab", "c", "abc"],
                                    "tokenizer.ggml.merges": ["a b", "ab c"]}, 4)
    assert cut["tokenizer.ggml.tokens"] == ["a", "b", "ab", "c"]
    assert cut["tokenizer.ggml.merges"] == ["a b"]  # "abc" is cut: its merge goes with it
