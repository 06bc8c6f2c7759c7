"""Tiny random-weight GGUF models for the CUDA backend's fast tests.

Two layers, width 256, every weight type the kernels read, both architectures (llama: NORM rope,
separate output matrix; qwen2: NEOX rope, Q/K/V biases, tied embeddings).  `write_model(path,
SHAPES["tiny-qwen2"])` writes a file `llama_core.engine.Engine` loads (a minimal byte-level
vocabulary included).  Benchmarks use the
real-layout synthetic models of `llama_core.synthetic` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WEIGHT_STD = 0.02  # like an initialized transformer: keeps activations finite over many layers


@dataclass(frozen=True)
class ModelShape:
    arch: str  # "llama" | "qwen2"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int
    types: dict[str, str]  # tensor role -> GGML type name ("embd", "q", "k", "v", "o", ...)
    tied: bool = True  # no output.weight: the output reuses token_embd
    rope_base: float = 10000.0
    eps: float = 1e-5
    context: int = 4096

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


_ALL_TYPES = {"embd": "Q8_0", "q": "Q4_K", "k": "Q4_1", "v": "Q6_K", "o": "Q8_0", "gate": "Q5_0",
              "up": "Q4_0", "down": "Q6_K", "output": "F16"}
_K_QUANTS = {"embd": "Q6_K", "q": "Q4_K", "k": "Q4_K", "v": "Q6_K", "o": "Q4_K", "gate": "Q4_K",
             "up": "Q4_K", "down": "Q6_K", "output": "Q6_K"}

SHAPES = {
    "tiny-llama": ModelShape("llama", 2, 256, 4, 2, 512, 512, _ALL_TYPES, tied=False),
    "tiny-qwen2": ModelShape("qwen2", 2, 256, 4, 2, 512, 512, _K_QUANTS, rope_base=1e6, eps=1e-6),
}


def _matrix(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> tuple[np.ndarray, Any]:
    """Raw GGUF bytes (rows, row_bytes) of a random (rows, cols) weight, and its GGML type."""
    from gguf import GGMLQuantizationType as T

    from ukgpu.llama_core.gguf.quants import quantize

    values = (rng.standard_normal((rows, cols)) * WEIGHT_STD).astype(np.float32)
    if qtype == "F32":
        return values, None
    if qtype == "F16":
        return values.astype(np.float16), None
    return quantize(values, T[qtype]), T[qtype]


def _add(writer: Any, name: str, rng: np.random.Generator, qtype: str, rows: int, cols: int) -> None:
    data, raw_type = _matrix(rng, qtype, rows, cols)
    if raw_type is None:
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw_type)


def _metadata(writer: Any, s: ModelShape) -> None:
    writer.add_block_count(s.n_layers)
    writer.add_context_length(s.context)
    writer.add_embedding_length(s.d_model)
    writer.add_feed_forward_length(s.d_ff)
    writer.add_head_count(s.n_heads)
    writer.add_head_count_kv(s.n_kv_heads)
    writer.add_layer_norm_rms_eps(s.eps)
    writer.add_rope_freq_base(s.rope_base)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_file_type(1)


def _tokenizer(writer: Any, s: ModelShape) -> None:
    """The minimal byte-level BPE vocabulary of `llama_core.synthetic`, so `Engine` can load it."""
    from gguf import GGUFValueType

    from ukgpu.llama_core.gguf.synthetic import minimal_vocab

    writer.add_tokenizer_model("gpt2")
    for key, (values, vtype) in minimal_vocab(s.vocab).items():
        writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=vtype)
    writer.add_eos_token_id(s.vocab - 1)


def write_model(path: Path | str, s: ModelShape, seed: int = 0) -> Path:
    """Write a random-weight GGUF of shape `s`; returns the path."""
    from gguf import GGUFWriter

    path, rng = Path(path), np.random.default_rng(seed)
    writer = GGUFWriter(str(path), s.arch)
    _metadata(writer, s)
    _tokenizer(writer, s)
    t, hd, kvw = s.types, s.head_dim, s.n_kv_heads * s.head_dim
    _add(writer, "token_embd.weight", rng, t["embd"], s.vocab, s.d_model)
    for i in range(s.n_layers):
        p = f"blk.{i}"
        writer.add_tensor(f"{p}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(s.d_model)).astype(np.float32))
        _add(writer, f"{p}.attn_q.weight", rng, t["q"], s.n_heads * hd, s.d_model)
        _add(writer, f"{p}.attn_k.weight", rng, t["k"], kvw, s.d_model)
        _add(writer, f"{p}.attn_v.weight", rng, t["v"], kvw, s.d_model)
        if s.arch == "qwen2":
            for n, width in (("q", s.n_heads * hd), ("k", kvw), ("v", kvw)):
                writer.add_tensor(f"{p}.attn_{n}.bias", (0.1 * rng.standard_normal(width)).astype(np.float32))
        _add(writer, f"{p}.attn_output.weight", rng, t["o"], s.d_model, s.n_heads * hd)
        writer.add_tensor(f"{p}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(s.d_model)).astype(np.float32))
        _add(writer, f"{p}.ffn_gate.weight", rng, t["gate"], s.d_ff, s.d_model)
        _add(writer, f"{p}.ffn_up.weight", rng, t["up"], s.d_ff, s.d_model)
        _add(writer, f"{p}.ffn_down.weight", rng, t["down"], s.d_model, s.d_ff)
    writer.add_tensor("output_norm.weight", np.ones(s.d_model, dtype=np.float32))
    if not s.tied:
        _add(writer, "output.weight", rng, t["output"], s.vocab, s.d_model)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
