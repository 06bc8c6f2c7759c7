"""The CUDA backend's ops for the newer families on the fake driver, against the float64 CPU
backend: rope from scaled tables (llama3 frequency factors, YaRN with mscale, linear, partial
rotation, NEOX and NORM, head_dim 64/96/256), sliding-window attention with a model's own
score scale (prefill, chunked prefill and decode), per-head RMSNorm, GELU-tanh gate, scale;
and a two-layer step with gemma3's pattern (a local layer: window and its own rope base; a
global one) decoded from a captured CUDA graph."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from ukgpu.gpu.cuda.select import create_backend
from ukgpu.gpu.cuda.verify_checks import nmse
from ukgpu.llama_core.backend import RopeConfig
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.file import TensorView
from ukgpu.ptx_kernels import reference

from fakes.cuda_driver import FakeDriver

F32 = GGMLQuantizationType.F32
_ACT_IDS = itertools.count()


def _view(name: str, arr: np.ndarray) -> TensorView:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return TensorView(name, F32, arr.shape, arr.view(np.uint8).reshape(-1))


def _backends():
    return create_backend(driver=FakeDriver(), arena_bytes=64 << 20), CpuBackend(dtype=np.float64)


def _acts(be, arr: np.ndarray):
    """arr [n, d] as an activation of `be` (the rows of an embedding table; a unique name, as
    the backend caches weights by name, address and shape)."""
    table = be.prepare_weight(_view(f"act{next(_ACT_IDS)}", arr))
    return be.embedding(table, np.arange(arr.shape[0]))


def _yarn(n_rot: int) -> RopeConfig:
    return RopeConfig(n_rot, 1e6, True, scale=0.25, ext_factor=1.0, orig_ctx=4096)


ROPES = {
    "llama3 factors, NORM": (64, RopeConfig(64, 5e5, False, freq_factors=tuple(np.linspace(1, 8, 32)))),
    "yarn, NEOX, mscale": (128, _yarn(128)),
    "linear, head_dim 256": (256, RopeConfig(256, 1e6, False, scale=0.125)),
    "partial 64 of 96 (phi3)": (96, RopeConfig(64, 1e4, True)),
    "partial 32 of 64, NORM": (64, RopeConfig(32, 1e4, False, freq_factors=tuple(np.linspace(1, 2, 16)))),
}


@pytest.mark.parametrize("case", sorted(ROPES))
def test_rope_from_the_config_table(case):
    hd, rope = ROPES[case]
    gpu, cpu = _backends()
    x = np.random.default_rng(1).standard_normal((5, 3 * hd))
    got = gpu.to_host(gpu.rope(_acts(gpu, x), 30000, 3, rope))
    want = cpu.rope(x.copy(), 30000, 3, rope)
    assert got.shape == want.shape and nmse(got, want) < 1e-12
    assert len(gpu._rope_tables) == 1  # the table is made once per config
    gpu.rope(_acts(gpu, x), 7, 3, rope)
    assert len(gpu._rope_tables) == 1


@pytest.mark.parametrize("hd,window,scale", [(64, 5, None), (256, 3, 0.0625), (96, 0, 0.2),
                                             (64, 100, None)])
def test_windowed_attention_prefill_chunks_and_decode(hd, window, scale):
    gpu, cpu = _backends()
    rng = np.random.default_rng(hd + window)
    hq, hkv, n_ctx = 4, 2, 32
    gkv, ckv = gpu.alloc_kv(1, n_ctx, hkv, hd), cpu.alloc_kv(1, n_ctx, hkv, hd)
    for start, n in ((0, 9), (9, 4), (13, 1), (14, 1)):  # prefill, a second chunk, two decodes
        q, k, v = (rng.standard_normal((n, h * hd)) for h in (hq, hkv, hkv))
        got = gpu.to_host(gpu.attention(_acts(gpu, q), _acts(gpu, k), _acts(gpu, v), gkv, 0, start,
                                        window=window, scale=scale))
        want = cpu.attention(q, k, v, ckv, 0, start, window=window, scale=scale)
        assert nmse(got, want) < 1e-5, (start, n)  # the cache is float16


def test_head_norm_gelu_gate_and_scale():
    gpu, cpu = _backends()
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((3, 4 * 256)), rng.standard_normal(256)
    gw, cw = gpu.prepare_weight(_view("q_norm", w)), cpu.prepare_weight(_view("q_norm", w))
    got = gpu.to_host(gpu.rmsnorm_heads(_acts(gpu, x), gw, 4, 1e-6))
    assert nmse(got, cpu.rmsnorm_heads(x.copy(), cw, 4, 1e-6)) < 1e-12
    g, u = rng.standard_normal((3, 640)) * 4, rng.standard_normal((3, 640))
    got = gpu.to_host(gpu.gelu_gate(_acts(gpu, g), _acts(gpu, u)))
    assert nmse(got, reference.geglu(g, u)) < 1e-12
    # the CPU reference rounds GELU to float16 as llama.cpp's CPU table does; the GPU is exact
    assert nmse(got, cpu.gelu_gate(g.copy(), u.copy())) < 1e-6
    got = gpu.to_host(gpu.scale(_acts(gpu, g), 25.3))
    np.testing.assert_allclose(got, g * 25.3, rtol=1e-6)


class TwoLayerStep:
    """gemma3's layer pattern cut to the new ops: a local layer (window 4, rope base 1e4) then a
    global one (rope base 1e6 with linear scaling), per-head q/k norms, a GELU gate, an
    embedding scale, logits from a float32 output matrix."""

    H, HD, VOCAB = 2, 64, 40
    LAYERS = ((RopeConfig(64, 1e4, False), 4), (RopeConfig(64, 1e6, False, scale=0.5), 0))

    def __init__(self, be, seed=0):
        rng = np.random.default_rng(seed)
        d = self.H * self.HD
        self.be = be
        self.emb = be.prepare_weight(_view("token_embd.weight", rng.standard_normal((self.VOCAB, d))))
        self.norms = [be.prepare_weight(_view(f"{r}_norm", rng.standard_normal(self.HD)))
                      for r in "qkvgu"]  # unrelated q and k: no self-attention spike
        self.out = be.prepare_weight(_view("output.weight", rng.standard_normal((self.VOCAB, d)) * 0.1))

    def forward(self, tokens, start_pos, kv, all_logits=True):
        be, n = self.be, len(tokens)
        x = be.scale(be.embedding(self.emb, np.asarray(tokens)), 0.5)
        for layer, (rope, window) in enumerate(self.LAYERS):
            q, k, v, g, u = (be.rmsnorm_heads(x, w, self.H, 1e-6) for w in self.norms)
            q, k = (be.rope(a, start_pos, self.H, rope) for a in (q, k))
            x = be.add(x, be.attention(q, k, v, kv, layer, start_pos, window=window, scale=0.05))
            x = be.add(x, be.gelu_gate(g, u))
        if not all_logits:
            x = be.take_rows(x, slice(n - 1, n))
        return be.to_host(be.matmul(x, self.out))


def test_two_rope_configs_and_windows_decode_from_a_captured_graph(monkeypatch):
    gpu, cpu = _backends()
    gm, cm = TwoLayerStep(gpu), TwoLayerStep(cpu)
    gkv, ckv = gpu.alloc_kv(2, 32, 2, 64), cpu.alloc_kv(2, 32, 2, 64)
    prompt = np.array([3, 17, 9, 25, 4, 11, 0, 38, 7, 30])
    assert nmse(gm.forward(prompt, 0, gkv), cm.forward(prompt, 0, ckv)) < 1e-5
    token, pos = 5, len(prompt)
    for _ in range(8):  # the first step runs eagerly and records; the rest replay the graph
        want = cm.forward(np.array([token]), pos, ckv, all_logits=False)
        got = gpu.decode(gm, token, pos, gkv)
        assert nmse(got, want) < 1e-5, pos
        token, pos = int(want.argmax()), pos + 1
    assert gpu.graphs.captures == 1 and len(gpu._rope_tables) == 2
    assert next(iter(gpu.graphs.graphs.values())).replays == 7
    windowed = cm.forward(prompt, 0, cpu.alloc_kv(2, 32, 2, 64))
    monkeypatch.setattr(TwoLayerStep, "LAYERS", ((TwoLayerStep.LAYERS[0][0], 0), TwoLayerStep.LAYERS[1]))
    unwindowed = cm.forward(prompt, 0, cpu.alloc_kv(2, 32, 2, 64))
    assert nmse(unwindowed, windowed) > 1e-3  # the window changes the result: the test can fail


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q6_K"])
def test_row_slices_of_a_fused_tensor_are_separate_weights(qtype):
    """phi3's attn_qkv / ffn_up are split into row ranges of one GGUF tensor at load time: each
    range is its own device weight (same tensor name, different bytes) and multiplies alone."""
    gpu, cpu = _backends()
    rows, k = (64, 32, 32), 256
    qt = GGMLQuantizationType[qtype]
    fused = TensorView("blk.0.attn_qkv.weight", qt, (sum(rows), k),
                       reference.random_weight(qtype, sum(rows), k, np.random.default_rng(5)))
    x = np.random.default_rng(6).standard_normal((3, k))
    want = cpu.matmul(x, cpu.prepare_weight(fused))
    start = 0
    for n in rows:
        part = TensorView(fused.name, qt, (n, k),
                          fused.data[start * fused.row_bytes:(start + n) * fused.row_bytes])
        got = gpu.to_host(gpu.matmul(_acts(gpu, x), gpu.prepare_weight(part)))
        assert nmse(got, want[:, start:start + n]) < 1e-10
        start += n
    assert sum(w.name == fused.name for w in gpu._weights.values()) == len(rows)
