"""Tiny random-weight GGUF models for the CUDA backend's fast tests.

Two layers, width 256, every weight type the kernels read, both architectures (llama: NORM rope,
separate output matrix; qwen2: NEOX rope, Q/K/V biases, tied embeddings).  `write_model(path,
SHAPES["tiny-qwen2"])` writes a file `llama_core.engine.Engine` loads.  Only the shapes live
here: `tiny_spec` turns one into a shape spec and `llama_core.gguf.synthetic.write_spec` (the
writer behind `ukgpu bench`'s real-layout models) writes it, with random weights of std 0.02,
norms near 1 and the minimal byte-level BPE vocabulary.  `write_outlier_model` adds what real
checkpoints have and those weights lack: one "massive activation" channel, a norm weight scaled
by 1e3..1e5, so the prefill GEMM's input passes float16's 65504.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from ukgpu.llama_core.gguf.synthetic import write_spec


@dataclass(frozen=True)
class ModelShape:
    name: str
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
    "tiny-llama": ModelShape("tiny-llama", "llama", 2, 256, 4, 2, 512, 512, _ALL_TYPES, tied=False),
    "tiny-qwen2": ModelShape("tiny-qwen2", "qwen2", 2, 256, 4, 2, 512, 512, _K_QUANTS,
                             rope_base=1e6, eps=1e-6),
}


def _value(value: Any, gguf_type: str) -> dict[str, Any]:
    return {"type": gguf_type, "sub_type": None, "value": value}


def _metadata(s: ModelShape) -> dict[str, dict[str, Any]]:
    a = s.arch
    ints = {"block_count": s.n_layers, "context_length": s.context, "embedding_length": s.d_model,
            "feed_forward_length": s.d_ff, "attention.head_count": s.n_heads,
            "attention.head_count_kv": s.n_kv_heads, "rope.dimension_count": s.head_dim}
    return {"general.architecture": _value(a, "STRING"),
            **{f"{a}.{key}": _value(v, "UINT32") for key, v in ints.items()},
            f"{a}.attention.layer_norm_rms_epsilon": _value(s.eps, "FLOAT32"),
            f"{a}.rope.freq_base": _value(s.rope_base, "FLOAT32"),
            "general.file_type": _value(1, "UINT32"),
            "tokenizer.ggml.model": _value("gpt2", "STRING"),
            "tokenizer.ggml.eos_token_id": _value(s.vocab - 1, "UINT32")}


def _tensors(s: ModelShape) -> list[dict[str, Any]]:
    t, q_width, kv_width = s.types, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    out = [("token_embd.weight", t["embd"], [s.vocab, s.d_model])]
    for i in range(s.n_layers):
        p = f"blk.{i}"
        out += [(f"{p}.attn_norm.weight", "F32", [s.d_model]),
                (f"{p}.attn_q.weight", t["q"], [q_width, s.d_model]),
                (f"{p}.attn_k.weight", t["k"], [kv_width, s.d_model]),
                (f"{p}.attn_v.weight", t["v"], [kv_width, s.d_model])]
        if s.arch == "qwen2":
            out += [(f"{p}.attn_{n}.bias", "F32", [w]) for n, w in (("q", q_width), ("k", kv_width),
                                                                 ("v", kv_width))]
        out += [(f"{p}.attn_output.weight", t["o"], [s.d_model, q_width]),
                (f"{p}.ffn_norm.weight", "F32", [s.d_model]),
                (f"{p}.ffn_gate.weight", t["gate"], [s.d_ff, s.d_model]),
                (f"{p}.ffn_up.weight", t["up"], [s.d_ff, s.d_model]),
                (f"{p}.ffn_down.weight", t["down"], [s.d_model, s.d_ff])]
    out.append(("output_norm.weight", "F32", [s.d_model]))
    if not s.tied:
        out.append(("output.weight", t["output"], [s.vocab, s.d_model]))
    return [{"name": n, "type": qtype, "shape": shape} for n, qtype, shape in out]


def tiny_spec(s: ModelShape) -> dict[str, Any]:
    """The shape spec of `llama_core.gguf.synthetic` for a tiny shape (no tokenizer donor)."""
    return {"name": s.name, "source": f"the test shape {s.name}", "metadata": _metadata(s),
            "tensors": _tensors(s)}


def write_model(path: Path | str, s: ModelShape, seed: int = 0) -> Path:
    """Write a random-weight GGUF of shape `s`; returns the path."""
    path = Path(path)
    write_spec(tiny_spec(s), path, seed)
    return path


def write_outlier_model(path: Path | str, s: ModelShape, channel: int = 5, factor: float = 1e5,
                        norm: str = "ffn_norm", seed: int = 0) -> Path:
    """`write_model`, then every block's `norm` weight (F32) multiplied by `factor` in one channel:
    the rows entering gate/up (ffn_norm) carry values near factor x |x_c| / rms(x)."""
    path = write_model(path, s, seed)
    reader = GGUFReader(path, "r+")
    for t in reader.tensors:
        if t.name.endswith(f".{norm}.weight"):
            t.data[channel] *= factor  # a memory map of the file: written in place
    reader.data.flush()
    return path
