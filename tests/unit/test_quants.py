"""ggml formats: bit-exact dequantization against gguf-py, on random blocks and real tensors."""

from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ukgpu.llama_core.errors import QuantError
from ukgpu.llama_core.gguf import quants
from ukgpu.llama_core.gguf.blocks import BLOCKS

ALL_TYPES = list(BLOCKS)


def random_blocks(qtype: T, n_blocks: int, seed: int = 0) -> np.ndarray:
    """uint8[n_blocks, block_bytes]: random bits, with finite float fields (as real files have)."""
    rng = np.random.default_rng(seed)
    block = BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block.nbytes), dtype=np.uint8)
    for f in block.fields:
        if f.dtype in ("<f2", "<f4"):
            finite = (rng.standard_normal((n_blocks, f.size // int(f.dtype[-1]))) * 0.1).astype(f.dtype)
            blocks[:, f.offset : f.offset + f.size] = finite.view(np.uint8)
    if qtype == T.BF16:
        top = (rng.standard_normal(n_blocks).astype("<f4").view("<u4") >> 16).astype("<u2")
        blocks = top.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def reference(raw: np.ndarray, qtype: T) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)


def test_table_matches_ggml_sizes():
    for qtype, block in BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[qtype] == (block.elems, block.nbytes)
        assert quants.FORMATS[qtype].block is block
        spans = sorted((f.offset, f.offset + f.size) for f in block.fields)
        assert spans[0][0] == 0 and spans[-1][1] == block.nbytes
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "fields must tile the block"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype):
    blocks = random_blocks(qtype, 300 if BLOCKS[qtype].elems > 1 else 4096)
    n = blocks.shape[0] * BLOCKS[qtype].elems
    mine = quants.dequantize(blocks.reshape(-1), qtype, n)
    ref = reference(blocks.reshape(-1), qtype)
    assert mine.dtype == np.float32 and mine.shape == (n,)
    assert not np.isnan(mine).any()
    assert np.array_equal(mine, ref)
    per_block = quants.FORMATS[qtype].dequantize_blocks(blocks)
    assert np.array_equal(per_block.reshape(-1), mine)


def test_dequantize_spans_chunks():
    blocks = random_blocks(T.Q4_K, quants._CHUNK_BLOCKS + 7, seed=3)
    mine = quants.dequantize(blocks.reshape(-1), T.Q4_K, blocks.shape[0] * 256)
    assert np.array_equal(mine, reference(blocks.reshape(-1), T.Q4_K))


def test_field_views_address_the_layout():
    blocks = random_blocks(T.Q4_K, 5)
    d = quants.Q4_K.field(blocks, "d")
    assert d.shape == (5, 1) and d.dtype == np.float16 and np.shares_memory(d, blocks)
    assert np.array_equal(quants.Q4_K.field(blocks, "qs"), blocks[:, 16:144])
    assert quants.Q3_K.scales6(random_blocks(T.Q3_K, 2)).max() < 64


def _types_in(f) -> Counter:
    return Counter(v.qtype.name for v in f.tensors.values())


def test_real_models_have_expected_types(smollm2, qwen05):
    assert _types_in(smollm2) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert _types_in(qwen05) == {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}


def _smallest_of_each_type(f) -> list:
    best = {}
    for view in f.tensors.values():
        if view.qtype not in best or view.data.nbytes < best[view.qtype].data.nbytes:
            best[view.qtype] = view
    return list(best.values())


def test_real_tensors_bit_exact(smollm2, qwen05):
    seen = set()
    for f in (smollm2, qwen05):
        for view in _smallest_of_each_type(f):
            mine = view.dequantize()
            ref = gguf.quants.dequantize(np.asarray(view.data), view.qtype).astype(np.float32).reshape(view.shape)
            assert mine.shape == view.shape and np.isfinite(mine).all()
            assert np.array_equal(mine, ref), view.name
            seen.add(view.qtype.name)
    assert seen == {"Q4_1", "Q8_0", "F32", "Q5_0", "Q6_K", "Q4_K"}


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1])
def test_quantize_matches_ggml_reference(qtype):
    x = np.random.default_rng(5).standard_normal((6, 256)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    mine = quants.quantize(x, qtype)
    ref = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(mine.shape)
    assert np.array_equal(mine, ref)


@pytest.mark.parametrize("qtype,tolerance", [(T.Q8_0, 0.01), (T.Q4_1, 0.1), (T.Q4_K, 0.1), (T.Q6_K, 0.03),
                                             (T.Q4_0, 0.1), (T.Q5_0, 0.06), (T.F16, 0.001),
                                             (T.Q5_K, 0.05), (T.Q3_K, 0.2), (T.Q2_K, 0.4)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_quantize_round_trip(qtype, tolerance):
    x = np.random.default_rng(7).standard_normal((8, 512)).astype(np.float32)
    raw = quants.quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (8, quants.row_bytes(qtype, 512))
    y = quants.dequantize(raw.reshape(-1), qtype, x.size).reshape(x.shape)
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < tolerance


def test_errors():
    with pytest.raises(QuantError, match="not supported"):
        quants.dequantize(np.zeros(18, np.uint8), T.IQ4_NL, 32)
    with pytest.raises(QuantError, match="need 34 bytes"):
        quants.dequantize(np.zeros(30, np.uint8), T.Q8_0, 32)
    with pytest.raises(QuantError, match="whole number"):
        quants.row_bytes(T.Q4_K, 100)
    with pytest.MonkeyPatch.context() as mp:  # a type left to gguf-py, which has no quantizer for it
        mp.setattr(quants._gguf_quants, "quantize", lambda *a: (_ for _ in ()).throw(NotImplementedError))
        with pytest.raises(QuantError, match="no Q5_0 quantizer"):
            quants.quantize(np.zeros((1, 256), np.float32), T.Q5_0)


@pytest.mark.parametrize("qtype", [T.Q5_K, T.Q3_K, T.Q2_K], ids=lambda q: q.name)
def test_k_quantizers_write_blocks_gguf_py_reads_back(qtype):
    """quants_k's packing is the inverse of the unpacking: gguf-py's dequantize of the blocks is
    the quantizer's own grid (d, sub-scales, quants), and a smooth ramp keeps its order."""
    x = np.linspace(-1, 1, 4 * 256, dtype=np.float32).reshape(4, 256)
    raw = quants.quantize(x, qtype)
    ref = gguf.quants.dequantize(raw, qtype).reshape(x.shape).astype(np.float32)
    np.testing.assert_array_equal(quants.dequantize(raw.reshape(-1), qtype, x.size).reshape(x.shape), ref)
    assert np.all(np.diff(ref.reshape(-1, 16), axis=1) >= 0)  # monotone per 16: each element in its place
    assert np.abs(ref - x).max() < {T.Q5_K: 0.02, T.Q3_K: 0.1, T.Q2_K: 0.2}[qtype]


def test_f16_scales_are_the_float16_fields_of_quantized_blocks():
    assert [f.name for f in BLOCKS[T.Q4_K].f16_scales] == ["d", "dmin"]
    assert [f.name for f in BLOCKS[T.Q6_K].f16_scales] == ["d"]
    assert [(f.name, f.offset) for f in BLOCKS[T.Q4_1].f16_scales] == [("d", 0), ("m", 2)]
    assert BLOCKS[T.F16].f16_scales == ()


def test_k4_scale_unpack_matches_ggml_get_scale_min_k4():
    packed = np.random.default_rng(11).integers(0, 256, (500, 12), dtype=np.uint8)
    sc_lo, mn_lo, sc_hi, mn_hi = quants.k4_scales(packed[:, 0:4], packed[:, 4:8], packed[:, 8:12])
    sc, mn = np.concatenate([sc_lo, sc_hi], 1), np.concatenate([mn_lo, mn_hi], 1)
    for row, q in enumerate(packed.astype(int)):  # ggml-quants.c get_scale_min_k4, element by element
        for j in range(8):
            want = ((q[j] & 63, q[j + 4] & 63) if j < 4 else
                    ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)))
            assert (sc[row, j], mn[row, j]) == want
