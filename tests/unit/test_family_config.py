"""Config, rope and CPU ops of the model families: what is read from the file, what is refused,
and the small ops checked against their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ukgpu.llama_core.backend import RopeConfig
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.errors import GGUFError
from ukgpu.llama_core.gguf import synthetic
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.layers import RopeTable
from ukgpu.llama_core.models.config import SUPPORTED_ARCHS


def _write(tmp_path, name: str, **metadata):
    """The family layout `name` with metadata keys changed (None: removed); its GGUFFile."""
    spec = synthetic.load_spec(name)
    for key, value in metadata.items():
        key = key.replace("__", ".")
        if value is None:
            spec["metadata"].pop(key)
        else:
            spec["metadata"][key] = value
    path = tmp_path / f"{name}.gguf"
    synthetic.write_spec(spec, path, seed=1)
    return open_gguf(path)


def test_unsupported_arch_names_every_supported_one(tmp_path):
    gguf = _write(tmp_path, "syn-qwen3", general__architecture={"type": "STRING", "sub_type": None,
                                                                "value": "mamba"})
    with pytest.raises(GGUFError, match="architecture 'mamba'") as err:
        gguf.config
    assert all(arch in str(err.value) for arch in ("llama", "qwen2", "qwen3", "gemma3", "phi3"))
    assert set(SUPPORTED_ARCHS) == {"llama", "qwen2", "qwen3", "gemma3", "phi3"}


def test_gemma3_layers_follow_llama_cpp_pattern(tmp_path):
    c = _write(tmp_path, "syn-gemma3").config
    assert [c.is_local(i) for i in range(6)] == [True] * 5 + [False]  # every 6th layer is global
    assert [c.layer_window(i) for i in (0, 5)] == [24, 0]
    assert c.attn_scale == pytest.approx(1 / math.sqrt(c.head_dim)) and c.embed_scale == pytest.approx(16.0)
    assert c.rope_base_local == 10000.0 and c.rope_base == 1e6 and c.tied_embeddings


def test_phi3_uses_long_factors_past_the_original_context(tmp_path):
    gguf = _write(tmp_path, "syn-phi3")
    table = RopeTable(gguf)
    long, short = (tuple(float(x) for x in gguf.tensors[n].dequantize()) for n in gguf.config.rope_factors)
    assert gguf.config.orig_ctx == 64
    assert table.layer_rope(0, 65).freq_factors == long and table.layer_rope(1, 64).freq_factors == short
    assert table.layer_rope(0, 65).mscale == pytest.approx(1.1902380714238083, rel=1e-6)


def test_llama3_rope_freqs_divide_the_frequencies(tmp_path):
    gguf = _write(tmp_path, "syn-llama3")
    rope = RopeTable(gguf).layer_rope(0, 128)
    plain = RopeConfig(rope.n_rot, rope.base, rope.neox)
    factors = gguf.tensors["rope_freqs.weight"].dequantize()
    assert np.allclose(rope.inv_freq(), plain.inv_freq() / factors) and factors.max() == pytest.approx(8.0)


@pytest.mark.parametrize("key, value, message", [
    ("syn-llama-yarn:llama.rope.scaling.type", "ntk", "rope.scaling.type"),
    ("syn-qwen3:qwen3.attention.value_length", 64, "value_length"),
    ("syn-gemma3:gemma3.attention.sliding_window", 1 << 30, "sliding_window"),
])
def test_bad_family_keys_are_refused_by_name(tmp_path, key, value, message):
    name, key = key.split(":")
    kind = "STRING" if isinstance(value, str) else "UINT32"
    gguf = _write(tmp_path, name, **{key.replace(".", "__"): {"type": kind, "sub_type": None, "value": value}})
    with pytest.raises(GGUFError, match=message):
        gguf.config


def test_missing_family_tensor_is_named(tmp_path):
    spec = synthetic.load_spec("syn-qwen3")
    spec["tensors"] = [t for t in spec["tensors"] if t["name"] != "blk.1.attn_k_norm.weight"]
    synthetic.write_spec(spec, tmp_path / "x.gguf", seed=1)
    with pytest.raises(GGUFError, match="blk.1.attn_k_norm.weight"):
        open_gguf(tmp_path / "x.gguf").config


def test_yarn_rope_keeps_fast_pairs_and_interpolates_slow_ones():
    rope = RopeConfig(64, 10000.0, False, scale=0.25, ext_factor=1.0, orig_ctx=32)
    plain = RopeConfig(64, 10000.0, False).inv_freq()
    inv = rope.inv_freq()
    assert inv[0] == pytest.approx(plain[0]) and inv[-1] == pytest.approx(0.25 * plain[-1])
    assert np.all(inv <= plain + 1e-15) and np.all(inv >= 0.25 * plain - 1e-15)
    assert rope.mscale == pytest.approx(1 + 0.1 * math.log(4))
    linear = RopeConfig(64, 10000.0, False, scale=0.5)
    assert np.allclose(linear.inv_freq(), 0.5 * plain) and linear.mscale == 1.0


def test_cpu_rope_multiplies_by_mscale():
    be = CpuBackend(dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((3, 2 * 8))
    plain = be.rope(x.copy(), 5, 2, RopeConfig(8, 100.0, True))
    scaled = be.rope(x.copy(), 5, 2, RopeConfig(8, 100.0, True, attn_factor=1.5))
    assert np.allclose(scaled, 1.5 * plain)


def test_cpu_head_norm_gelu_gate_and_scale_follow_their_formulas():
    be = CpuBackend(dtype=np.float64)
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 4 * 8)), 1 + 0.1 * rng.standard_normal(8)
    weight = be.prepare_weight(_F32View(w))
    heads = x.reshape(3, 4, 8)
    want = heads / np.sqrt((heads ** 2).mean(-1, keepdims=True) + 1e-6) * w
    assert np.allclose(be.rmsnorm_heads(x.copy(), weight, 4, 1e-6), want.reshape(3, 32))
    g, u = 3 * rng.standard_normal((2, 16)), rng.standard_normal((2, 16))
    g[0, :3] = (-12.0, 11.0, 0.1234567)
    exact = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    h = g.astype(np.float16).astype(np.float64)  # llama.cpp's table: half-precision in and out
    table = (0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))).astype(np.float16)
    table = np.where(g <= -10, 0.0, np.where(g >= 10, g, table))
    ours = be.gelu_gate(g.copy(), u)
    assert np.array_equal(ours, table * u) and ours[0, 0] == 0.0 and ours[0, 1] == 11.0 * u[0, 1]
    assert np.allclose(ours, exact * u, rtol=2e-3, atol=1e-3) and not np.array_equal(ours, exact * u)
    assert np.array_equal(be.scale(x.copy(), 2.0), 2 * x)


class _F32View:
    """A stand-in F32 vector tensor for `prepare_weight`."""

    def __init__(self, values: np.ndarray) -> None:
        from gguf import GGMLQuantizationType

        self.shape = values.shape
        self.qtype = GGMLQuantizationType.F32
        self.data = np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)
