"""tools/bench/cost_model.py costs the fused decode attention and the two-launch argmax."""

from __future__ import annotations

import pytest

from ukgpu.tools.bench import cost_model as cm


def _entry(name: str, family: str, **constexprs: int) -> dict:
    return {"name": name, "family": family, "qtype": "", "constexprs": constexprs,
            "threads_per_block": 256, "shared_bytes": 0}


def test_fused_decode_attention_adds_the_new_rows_to_attn_decode():
    a = {"Hq": 12, "Hkv": 2, "window": 0, "n_ctx": 4096, "lens": 0}
    plain = cm.traffic(_entry("attn_decode_d128", "attention", HEAD_DIM=128), a, (1, 2, 16))
    fused = cm.traffic(_entry("attn_decode_rope_neox_d128", "attention_fused", HEAD_DIM=128, GROUP_PAD=8),
                       a, (1, 2, 16))
    new_rows = 4 * (12 + 2 * 2) * 128 + 2 * 2 * 2 * 128 + 8 * 128  # q, k, v in; k, v f16 out; norms
    assert fused.bytes == pytest.approx(plain.bytes + new_rows - 4 * 12 * 128)
    assert fused.flops > 4.0 * 16 * 128 * 4096  # the group of 6 computes 8 rows
    assert fused.l2_bytes == fused.bytes  # one sub-group per kv head: no re-reads


def test_a_group_of_16_reads_kv_twice_from_l2():
    a = {"Hq": 32, "Hkv": 2, "window": 0, "n_ctx": 1024, "lens": 0}
    t = cm.traffic(_entry("attn_decode_rope_norm_d64", "attention_fused", HEAD_DIM=64, GROUP_PAD=8),
                   a, (1, 4, 4), read_i32=lambda ptr, n: [1024] * n)
    kv = 2 * 2 * 2 * 64 * 1024
    assert t.l2_bytes - t.bytes == kv


def test_argmax_parts_and_reduce():
    part = cm.traffic(_entry("argmax_part_f32", "argmax"), {"V": 151_936, "span": 1024}, (8, 149, 1))
    red = cm.traffic(_entry("argmax_reduce_f32", "argmax"), {"P": 149}, (8, 1, 1))
    assert part.bytes == 4 * 8 * 151_936 + 8 * 8 * 149
    assert red.bytes == 8 * 8 * 149 + 4 * 8
