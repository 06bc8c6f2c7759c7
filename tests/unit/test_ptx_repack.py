"""The device weight layout (ptx_kernels/repack.py) is lossless: bit-exact vs gguf-py's dequantize."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from ukgpu.llama_core.gguf import quants
from ukgpu.llama_core.gguf.blocks import BLOCKS
from ukgpu.ptx_kernels.reference import QTYPES, random_weight
from ukgpu.ptx_kernels.repack import FORMATS, LAYOUTS, RepackError, dequantize_repacked, repack


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", [(1, 256), (5, 768)])
def test_repack_is_bit_exact(qtype, shape):
    rng = np.random.default_rng(len(qtype) * 1000 + shape[1])
    n, k = shape
    raw = random_weight(qtype, n, k, rng)
    want = dequantize(raw.reshape(n, -1), GGMLQuantizationType[qtype]).astype(np.float32)
    got = dequantize_repacked(repack(raw, qtype, n, k))
    assert got.shape == (n, k)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", QTYPES)
def test_plane_shapes_and_dtypes_match_the_documented_layout(qtype):
    fmt = FORMATS[qtype]
    n, k = 3, 512
    r = repack(random_weight(qtype, n, k, np.random.default_rng(1)), qtype, n, k)
    planes = r.planes()
    assert set(planes) == set(fmt.planes)
    for name, spec in fmt.planes.items():
        assert planes[name].dtype == np.dtype(spec.dtype), name
        assert planes[name].shape == (n, spec.per_row(k)), name
        assert planes[name].flags.c_contiguous
    assert sum(p.nbytes for p in planes.values()) == fmt.bytes_per_element * n * k


@pytest.mark.parametrize("qtype", QTYPES)
def test_device_bytes_are_within_3_percent_of_the_gguf_bytes(qtype):
    fmt = FORMATS[qtype]
    gguf_per_element = fmt.block_bytes / fmt.block_elems
    assert gguf_per_element <= fmt.bytes_per_element <= 1.03 * gguf_per_element


def test_q6_k_top_bits_lie_in_16_byte_chunks_of_two_groups():
    # one Q6_K block, d = 1, every scale 1, all low bits 0 and the top bits of element e = e % 4
    block = np.zeros(210, np.uint8)
    block[128:192] = 0b11100100  # qh: bits 2g..2g+1 of qh[l] -> element 32g + l of each half
    block[192:208] = 1
    block[208:210] = np.array([1.0], np.float16).view(np.uint8)
    r = repack(block, "Q6_K", 1, 256)
    top = r.q[0, 128:].reshape(4, 16)  # chunk c: groups 2c, 2c+1
    for e in range(256):
        grp, pos = divmod(e, 32)
        want = (e // 32 % 4)  # element 32g + l of a half takes bits 2g..2g+1 of qh[l]
        byte = top[grp // 2, pos % 16]
        assert (byte >> ((grp % 2) * 4 + (pos // 16) * 2)) & 3 == want, e
    w = dequantize_repacked(r)[0]
    np.testing.assert_array_equal(w, (np.arange(256) // 32 % 4) * 16 - 32)


def test_nibble_order_low_is_element_i_high_is_element_i_plus_16():
    # Q4_1 block with d=1, m=0: values are the raw nibbles
    block = np.zeros(20, np.uint8)
    block[0:2] = np.array([1.0], np.float16).view(np.uint8)
    block[4:20] = np.arange(16, dtype=np.uint8) | ((15 - np.arange(16, dtype=np.uint8)) << 4)
    w = dequantize_repacked(repack(block, "Q4_1", 1, 32))[0]
    np.testing.assert_array_equal(w[:16], np.arange(16))
    np.testing.assert_array_equal(w[16:], 15 - np.arange(16))


def test_wrong_sizes_and_types_raise_clear_errors():
    with pytest.raises(RepackError, match="multiple of 256"):
        repack(np.zeros(144, np.uint8), "Q4_K", 1, 128)
    with pytest.raises(RepackError, match="needs 288 bytes"):
        repack(np.zeros(144, np.uint8), "Q4_K", 2, 256)
    with pytest.raises(RepackError, match="supported"):
        repack(np.zeros(10, np.uint8), "IQ2_XS", 1, 256)


def test_layouts_are_keyed_by_the_ggml_enum_and_take_block_sizes_from_quants():
    assert list(FORMATS) == [t.name for t in LAYOUTS]
    for qtype, layout in LAYOUTS.items():
        assert FORMATS[qtype.name] is layout and layout.qtype is qtype
        assert (layout.block_elems, layout.block_bytes) == (BLOCKS[qtype].elems, BLOCKS[qtype].nbytes)


K_QUANTS = {"Q5_K": 176, "Q3_K": 110, "Q2_K": 84}  # GGUF bytes per 256-block


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quants_lie_on_the_device_at_their_gguf_size_bit_exact_with_llama_core(qtype):
    assert FORMATS[qtype].bytes_per_element * 256 == K_QUANTS[qtype] == FORMATS[qtype].block_bytes
    rng = np.random.default_rng(3)
    for n, k in [(1, 256), (7, 512), (3, 1280)]:
        raw = random_weight(qtype, n, k, rng)
        r = repack(raw, qtype, n, k)
        assert sum(p.nbytes for p in r.planes().values()) == raw.nbytes
        want = quants.dequantize(raw, GGMLQuantizationType[qtype], n * k).reshape(n, k)
        np.testing.assert_array_equal(dequantize_repacked(r).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype,field", [("Q5_K", "qh"), ("Q3_K", "hmask")])
def test_the_high_bit_of_element_32g_plus_j_is_bit_j_of_word_g(qtype, field):
    fmt = quants.FORMATS[GGMLQuantizationType[qtype]]
    raw = np.zeros((1, fmt.block.nbytes), np.uint8)
    fmt.field(raw, field)[0, 5] = 0b01000010  # element 32g + 5 for g = 1 and 6
    fmt.field(raw, "scales")[0] = np.arange(12, dtype=np.uint8) * 21
    r = repack(raw, qtype, 1, 256)
    words = r.m.view(np.uint32)[0]
    assert list(words[:8]) == [0, 1 << 5, 0, 0, 0, 0, 1 << 5, 0]
    assert words[8:].view(np.uint8).tolist() == (np.arange(12) * 21).tolist()  # ggml's scale bytes


def test_q2_k_crumbs_lie_in_16_byte_chunks_and_its_scale_bytes_are_ggml_s():
    raw = np.zeros((1, 84), np.uint8)
    q2 = quants.Q2_K
    q2.field(raw, "qs")[0] = 0b11100100  # element 128h + 32j + l = j (bits 2j of qs[32h + l])
    q2.field(raw, "scales")[0] = 0x01  # scale 1, min 0
    q2.field(raw, "d")[0] = 1.0
    r = repack(raw, "Q2_K", 1, 256)
    assert r.m.tolist() == [[1] * 16]
    np.testing.assert_array_equal(dequantize_repacked(r)[0], np.arange(256) // 32 % 4)
    chunk = r.q[0].reshape(4, 16)  # chunk c: groups 2c, 2c+1, element i (bits 0-1) and i + 16 (2-3)
    assert all(chunk[c, i] == (2 * c % 4) * 0b0101 | ((2 * c + 1) % 4) * 0b01010000 for c in range(4) for i in range(16))
