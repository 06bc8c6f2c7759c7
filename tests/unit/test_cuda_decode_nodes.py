"""The decode graph's size on the real shapes: graph nodes per layer of one decode step (single
sequence and a batch of four), counted on the stand-in driver (`emulate=False`: every launch is
checked and recorded, nothing computed) over the random-weight GGUFs of SmolLM2-135M and
Qwen2.5-Coder-1.5B Q4_K_M.  Each node costs ~1.5 us of launch latency on an H200 whatever it
does, so the count bounds the decode speed (tests/perf/predict_cuda.py prices it).  And the
launches of one eager prefill pass per layer (each costs the host a launch)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ukgpu.gpu.cuda.select import create_backend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.gguf.synthetic import build_synthetic
from ukgpu.llama_core.model import Model

from fakes.cuda_driver import FakeDevice, FakeDriver

MAX_NODES_PER_LAYER = 8


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-1.5b"])
def shape(request):
    gguf = open_gguf(build_synthetic(request.param))
    fake = FakeDriver(devices=[FakeDevice(name="H200 (stand-in)", total_bytes=141 << 30)], emulate=False)
    be = create_backend(gguf=gguf, driver=fake, n_ctx=64, n_slots=4)
    return Model(gguf, be), be, fake


def _replayed_nodes(fake, run) -> int:
    """Nodes of the graph one `run` replays (its warm-up and capture happened before)."""
    replays, eager = fake.graph_launches, len(fake.launches)
    fake.trace.clear()
    run()
    assert fake.graph_launches == replays + 1 and len(fake.launches) == eager  # a replay only
    return len(fake.trace)


def test_a_decode_step_is_at_most_8_nodes_per_layer(shape):
    model, be, fake = shape
    kv = model.new_kv(64)
    be.decode_greedy(model, 5, 0, kv)  # eager step, then the capture
    nodes = _replayed_nodes(fake, lambda: be.decode_greedy(model, 6, 1, kv))
    per_layer = nodes / model.config.n_layers
    print(f"{model.config.n_layers} layers: {nodes} nodes, {per_layer:.2f} per layer")
    assert per_layer <= MAX_NODES_PER_LAYER


def test_a_batched_decode_step_is_at_most_8_nodes_per_layer(shape):
    model, be, fake = shape
    kvs = [model.new_kv(64) for _ in range(4)]
    tokens, pos = np.array([5, 6, 7, 8]), [0, 0, 0, 0]
    be.decode_batch(model, tokens, pos, kvs)
    nodes = _replayed_nodes(fake, lambda: be.decode_batch(model, tokens, [1, 1, 1, 1], kvs))
    assert nodes / model.config.n_layers <= MAX_NODES_PER_LAYER


MAX_PREFILL_LAUNCHES_PER_LAYER = 7  # 6 a layer, 7 where v's weight type differs from q's and k's


def test_a_prefill_pass_is_at_most_7_launches_per_layer(shape):
    """A prompt of 40 rows (the GEMM path): norms, biases, the GLU's activation and the residual
    adds run inside the fused GEMMs; the one rmsnorm left is the output norm of the last row."""
    model, be, fake = shape
    kv = model.new_kv(64)
    fake.trace.clear()
    model.forward(np.arange(1, 41), 0, kv, all_logits=False)
    names = [e["name"] for e, _, _ in fake.trace]
    per_layer = len(names) / model.config.n_layers
    print(f"{model.config.n_layers} layers: {len(names)} launches, {per_layer:.2f} per layer")
    assert per_layer <= MAX_PREFILL_LAUNCHES_PER_LAYER
    plain = re.compile(r"(add_f32|add_bias|swiglu|geglu|gemm_(?!qkv_|glu_|add_))")
    assert not [n for n in names if plain.match(n)]
    assert names.count("rmsnorm_f32") == 1


def test_the_plain_prefill_stays_available_for_measurements(shape, monkeypatch):
    """UKGPU_FUSED_GEMM=0 (the sweep's `prefill-plain`): rmsnorm, GEMMs, adds as separate launches."""
    model, be, fake = shape
    monkeypatch.setenv("UKGPU_FUSED_GEMM", "0")
    kv = model.new_kv(64)
    fake.trace.clear()
    model.forward(np.arange(1, 41), 0, kv, all_logits=False)
    names = [e["name"] for e, _, _ in fake.trace]
    assert not [n for n in names if n.startswith(("gemm_qkv_", "gemm_glu_", "gemm_add_"))]
    assert names.count("rmsnorm_f32") == 2 * model.config.n_layers + 1
