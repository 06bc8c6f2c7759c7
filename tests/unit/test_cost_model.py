"""tools/bench/cost_model.py on hand-made launch traces: bytes, flops, occupancy, bounds, options."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ukgpu.tools.bench import cost_model as cm

DEV = cm.H200
STREAM = DEV.hbm_bytes_s * DEV.reach  # bytes/s a full-occupancy streaming kernel gets


def _entry(name: str, family: str, qtype: str = "", threads: int = 128, shared: int = 0,
           **constexprs: int) -> dict:
    return {"name": name, "family": family, "qtype": qtype, "constexprs": constexprs,
            "threads_per_block": threads, "shared_bytes": shared}


def _matvec(n: int = 4096, k: int = 4096, grid: tuple = (512, 1, 1)) -> cm.Node:
    return (_entry("matvec_q8_0_b1", "matvec", "Q8_0", shared=8192), {"N": n, "K": k, "B": 1}, grid)


def _gemm(m: int = 512, n: int = 8960, k: int = 1536, scaled: bool = True) -> cm.Node:
    consts = {"X_EXP_SHIFT": 141} if scaled else {}
    e = _entry("gemm_q4_k", "gemm", "Q4_K", shared=55296, **consts)
    return (e, {"M": m, "N": n, "K": k}, (-(-m // 64), -(-n // 64), 1))


def test_weight_bytes_follow_the_repacked_planes():
    assert cm.weight_bytes_per_element("Q4_K") == 0.5 + 2 / 32 + 4 / 256  # nibbles, u8 sc+mn, f16 d+dmin
    assert cm.weight_bytes_per_element("Q8_0") == 1 + 2 / 32  # int8, f16 scale
    assert cm.weight_bytes_per_element("Q6_K") == 0.75 + 1 / 16 + 2 / 256  # 6 bits, i8 sc, f16 d
    assert cm.weight_bytes_per_element("Q4_0") == 18 / 32  # nibbles, f16 d: the GGUF size
    assert cm.weight_bytes_per_element("F16") == 2.0


def test_matvec_streams_its_weights_at_hbm_bandwidth():
    c = cm.node_cost(_matvec(), DEV, graph=True)
    want_bytes = 4096 * 4096 * 1.0625 + 2 * 4 * 4096
    assert c.bytes == pytest.approx(want_bytes)
    assert c.flops == 2 * 4096 * 4096
    assert c.bound == "memory"
    assert c.seconds == pytest.approx(DEV.node_s + want_bytes / STREAM)


def test_a_small_grid_gets_a_share_of_the_bandwidth():
    full = cm.node_cost(_matvec(grid=(512, 1, 1)), DEV)
    one = cm.node_cost(_matvec(grid=(1, 1, 1)), DEV)
    # one 4-warp CTA on one SM: 4 of the 132 * 12 warps that saturate HBM
    assert one.work_s == pytest.approx(full.work_s * DEV.sms * DEV.warps_to_saturate / 4)


def test_resident_ctas_are_limited_by_threads_and_shared_memory():
    assert cm.resident_ctas_per_sm(_entry("a", "x", threads=128), DEV) == 16  # 2048 threads
    assert cm.resident_ctas_per_sm(_entry("a", "x", threads=32), DEV) == 32  # the CTA cap
    assert cm.resident_ctas_per_sm(_entry("a", "x", shared=55296), DEV) == 4  # 228 KiB / 54 KiB


def test_prefill_gemm_is_bound_by_the_x_tiles_every_column_program_loads():
    c = cm.node_cost(_gemm(), DEV, graph=False)
    x, w, y = 4 * 512 * 1536, 8960 * 1536 * cm.weight_bytes_per_element("Q4_K"), 4 * 512 * 8960
    l2 = x * 140 + w * 8 + y  # grid (8, 140): x once per column program, W once per row program
    assert c.bytes == pytest.approx(x + w + y)
    assert c.bound == "memory"  # L2 traffic: 27 flops a byte against the tensor peak's ~113
    assert c.work_s == pytest.approx(l2 / DEV.l2_bytes_s)
    assert c.seconds == pytest.approx(DEV.eager_node_s + c.work_s)


def test_compute_term_counts_wave_quantization():
    fast_memory = replace(DEV, l2_bytes_s=1e18, hbm_bytes_s=1e18, fp32_flops=1e18)
    c = cm.node_cost(_gemm(), fast_memory, graph=False)
    ctas = 8 * 140  # 1120 CTAs: 9 waves of 132 SMs, the last one 64/132 full
    assert c.bound == "compute"
    assert c.work_s == pytest.approx(2 * 512 * 8960 * 1536 / (DEV.tensor_flops * ctas / (9 * 132)))


def test_row_prepass_loads_x_twice_tile_scaling_adds_only_alu():
    pre, dev = cm.gemm_option(_gemm(), "f16_row_prepass")
    tile, _ = cm.gemm_option(_gemm(), "f16_tile_scale")
    plain, _ = cm.gemm_option(_gemm(), "f16")
    t_pre, t_tile, t_plain = cm.traffic(*pre), cm.traffic(*tile), cm.traffic(*plain)
    assert t_pre.bytes == t_tile.bytes == t_plain.bytes  # HBM: x once either way
    assert t_pre.l2_bytes - t_tile.l2_bytes == 4 * 512 * 1536 * 140
    assert t_tile.l2_bytes == t_plain.l2_bytes
    assert t_tile.alu_ops - t_plain.alu_ops == 3 * 512 * 1536 * 140 + 2 * 512 * 8960 * 1536 / 64
    assert t_pre.flops == t_tile.flops == t_plain.flops


def test_gemm_options_order_and_tf32_halves_the_tensor_rate():
    t = cm.gemm_options([_gemm(), _matvec()], DEV, graph=False)
    assert t["f16"] == t["bf16"] <= t["f16_tile_scale"] < t["f16_row_prepass"]
    assert t["f16"] <= t["tf32"] < t["fp32"]
    node, dev = cm.gemm_option(_gemm(), "tf32")
    assert dev.tensor_flops == DEV.tensor_flops / 2
    assert cm.resident_ctas_per_sm(node[0], dev) == 2  # f32 tiles: 108 KiB a CTA
    with pytest.raises(ValueError):
        cm.gemm_option(_gemm(), "int4")


def test_decode_attention_counts_the_keys_it_reads():
    e = _entry("attn_decode_d64", "attention", threads=128, shared=14400, HEAD_DIM=64)
    a = {"Hq": 9, "Hkv": 3, "window": 0, "n_ctx": 1024, "lens": 0x1000}
    grid = (2, 3, 4)
    short = cm.traffic(e, a, grid, read_i32=lambda ptr, n: [10, 30])
    bound = cm.traffic(e, a, grid)  # no reader: n_ctx keys per row
    assert short.bytes - bound.bytes == pytest.approx(2 * 2 * 3 * 64 * (40 - 2048))
    assert short.flops == 4 * 9 * 64 * 40
    windowed = cm.traffic(e, {**a, "window": 16}, grid, read_i32=lambda ptr, n: [10, 30])
    assert windowed.flops == 4 * 9 * 64 * (10 + 16)


def test_prefill_attention_flops_are_causal():
    e = _entry("attn_prefill_d64", "attention", shared=40960, HEAD_DIM=64)
    tr = cm.traffic(e, {"T": 4, "start": 0, "Hq": 2, "Hkv": 1, "window": 0}, (1, 2, 1))
    assert tr.flops == 4 * 2 * 64 * (1 + 2 + 3 + 4) and tr.tensor


def test_tiny_nodes_are_latency_bound_and_eager_runs_wait_for_the_host():
    norm = (_entry("rmsnorm_f32", "rmsnorm"), {"D": 256}, (1, 1, 1))
    p = cm.predict([norm] * 10, DEV, graph=True)
    assert {n.bound for n in p.nodes} == {"latency"}
    assert p.device_s == pytest.approx(10 * (DEV.node_s + p.nodes[0].work_s))
    assert cm.eager_seconds(p, DEV) == pytest.approx(10 * DEV.host_launch_s)  # Python is slower
    assert cm.summary(p)["bound"] == {"latency": 10}


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="no traffic rule"):
        cm.traffic(_entry("mystery_f32", "elementwise"), {"n": 4}, (1, 1, 1))
