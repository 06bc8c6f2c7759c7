"""The llama / qwen2 forward pass, backend-agnostic.

`Weights` holds backend handles of the GGUF tensors (views of the mapped
file, never copies); `Model.forward` runs a batch of tokens of one sequence at
positions start_pos.. through every layer, reading the KV cache it is given and
writing the new keys and values into it.  Prefill (n tokens) and decode
(1 token) take the same path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Backend, KVCache, RopeConfig
from .errors import GGUFError, UkgpuError

SUPPORTED_ARCHS = {"llama": False, "qwen2": True}  # arch -> NEOX rope


class ContextOverflowError(UkgpuError):
    """More tokens than the KV cache holds."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    eps: float
    rope: RopeConfig
    context_length: int

    @classmethod
    def from_gguf(cls, gguf: Any) -> "ModelConfig":
        md = gguf.metadata
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise GGUFError(f"architecture {arch!r} is not supported; use a model of "
                            f"{sorted(SUPPORTED_ARCHS)} (e.g. `ukgpu models list`)")

        def key(name: str, default: Any = None) -> Any:
            value = md.get(f"{arch}.{name}", default)
            if value is None:
                raise GGUFError(f"GGUF metadata lacks {arch}.{name}; the file is incomplete")
            return value

        d_model, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", d_model // n_heads))
        rope = RopeConfig(
            n_rot=int(key("rope.dimension_count", head_dim)),
            base=float(key("rope.freq_base", 10000.0)),
            neox=SUPPORTED_ARCHS[arch],
            scale=_rope_linear_scale(md, arch),
        )
        return cls(
            arch=arch,
            n_layers=int(key("block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(key("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            d_ff=int(key("feed_forward_length")),
            vocab_size=int(gguf.tensors["token_embd.weight"].shape[0]),
            eps=float(key("attention.layer_norm_rms_epsilon")),
            rope=rope,
            context_length=int(key("context_length", 2048)),
        )


def _rope_linear_scale(md: dict, arch: str) -> float:
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    factor = float(md.get(f"{arch}.rope.scaling.factor", md.get(f"{arch}.rope.scale_linear", 1.0)))
    if kind == "linear" or (kind == "none" and factor != 1.0):
        return 1.0 / factor
    if kind != "none":
        raise GGUFError(f"rope scaling {kind!r} is not supported (only linear); "
                        "use a model without long-context rope scaling")
    return 1.0


@dataclass
class LayerWeights:
    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    bq: Any | None  # qwen2 only
    bk: Any | None
    bv: Any | None
    wo: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any


@dataclass
class Weights:
    token_embd: Any
    layers: list[LayerWeights]
    output_norm: Any
    output: Any  # token_embd when the model ties its embeddings

    @classmethod
    def from_gguf(cls, gguf: Any, config: ModelConfig, backend: Backend) -> "Weights":
        tensors = gguf.tensors

        def w(name: str, optional: bool = False) -> Any:
            if name not in tensors:
                if optional:
                    return None
                raise GGUFError(f"tensor {name} missing from the GGUF file; it is not a "
                                f"complete {config.arch} model")
            return backend.prepare_weight(tensors[name])

        layers = [
            LayerWeights(
                attn_norm=w(f"blk.{i}.attn_norm.weight"),
                wq=w(f"blk.{i}.attn_q.weight"),
                wk=w(f"blk.{i}.attn_k.weight"),
                wv=w(f"blk.{i}.attn_v.weight"),
                bq=w(f"blk.{i}.attn_q.bias", optional=True),
                bk=w(f"blk.{i}.attn_k.bias", optional=True),
                bv=w(f"blk.{i}.attn_v.bias", optional=True),
                wo=w(f"blk.{i}.attn_output.weight"),
                ffn_norm=w(f"blk.{i}.ffn_norm.weight"),
                w_gate=w(f"blk.{i}.ffn_gate.weight"),
                w_up=w(f"blk.{i}.ffn_up.weight"),
                w_down=w(f"blk.{i}.ffn_down.weight"),
            )
            for i in range(config.n_layers)
        ]
        embd = w("token_embd.weight")
        output = w("output.weight", optional=True)
        return cls(embd, layers, w("output_norm.weight"), embd if output is None else output)


class Model:
    """A GGUF llama-family model bound to one backend."""

    def __init__(self, gguf: Any, backend: Backend) -> None:
        self.gguf = gguf
        self.backend = backend
        self.config = ModelConfig.from_gguf(gguf)
        self.weights = Weights.from_gguf(gguf, self.config, backend)

    @classmethod
    def load(cls, model: str | Path, backend: Backend | None = None,
             dtype: np.dtype = np.float32) -> "Model":
        """Open a model by name or path; `dtype` picks the CPU backend's precision."""
        from .cpu_backend import CpuBackend

        return cls(open_model_file(model), backend or CpuBackend(dtype=dtype))

    def new_kv(self, n_ctx: int) -> KVCache:
        c = self.config
        return self.backend.alloc_kv(c.n_layers, n_ctx, c.n_kv_heads, c.head_dim)

    def forward(self, tokens: np.ndarray, start_pos: int, kv: KVCache,
                all_logits: bool = True) -> np.ndarray:
        """Logits float[n, vocab] for tokens int[n] at start_pos.. (float[1, vocab], the
        last position only, when all_logits is False)."""
        c, w, be = self.config, self.weights, self.backend
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if start_pos + len(tokens) > kv.n_ctx:
            raise ContextOverflowError(
                f"{start_pos + len(tokens)} tokens do not fit a {kv.n_ctx}-token KV cache; "
                "shorten the input or raise n_ctx")
        x = be.embedding(w.token_embd, tokens)  # [n, d]
        for i, lw in enumerate(w.layers):
            h = be.rmsnorm(x, lw.attn_norm, c.eps)  # [n, d]
            q = be.rope(be.matmul(h, lw.wq, lw.bq), start_pos, c.n_heads, c.rope)  # [n, H*hd]
            k = be.rope(be.matmul(h, lw.wk, lw.bk), start_pos, c.n_kv_heads, c.rope)  # [n, Hkv*hd]
            v = be.matmul(h, lw.wv, lw.bv)  # [n, Hkv*hd]
            attn = be.attention(q, k, v, kv, i, start_pos)  # [n, H*hd]
            x = be.add(x, be.matmul(attn, lw.wo))  # [n, d]
            h = be.rmsnorm(x, lw.ffn_norm, c.eps)
            ff = be.swiglu(be.matmul(h, lw.w_gate), be.matmul(h, lw.w_up))  # [n, d_ff]
            x = be.add(x, be.matmul(ff, lw.w_down))
        if not all_logits:
            x = be.take_rows(x, slice(-1, None))  # [1, d]
        x = be.rmsnorm(x, w.output_norm, c.eps)
        return be.to_host(be.matmul(x, w.output))  # [n, vocab]


def open_model_file(model: str | Path) -> Any:
    """The GGUF file of a model name or path, memory-mapped."""
    from .registry import resolve_model

    return _open_gguf(resolve_model(str(model)))


@dataclass(frozen=True)
class _TensorView:
    name: str
    qtype: Any
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class _GGUFFile:
    metadata: dict
    tensors: dict


def _open_gguf(path: Path) -> _GGUFFile:
    """Interim reader on gguf-py until `gguf_file.open_gguf` lands."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    metadata = {}
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            metadata[name] = field.contents()
    tensors = {
        t.name: _TensorView(t.name, t.tensor_type, tuple(int(s) for s in reversed(t.shape)),
                            t.data.view(np.uint8))
        for t in reader.tensors
    }
    return _GGUFFile(metadata, tensors)
