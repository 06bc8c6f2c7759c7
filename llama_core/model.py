"""The llama / qwen2 forward pass, backend-agnostic.

`Weights` holds backend handles of the GGUF tensors (views of the mapped
file, never copies); `Model.forward` runs a batch of tokens of one sequence at
positions start_pos.. through every layer, reading the KV cache it is given and
writing the new keys and values into it.  Prefill (n tokens) and decode
(1 token) take the same path.

A device backend may record one-token `forward` calls and replay them per token (CUDA graphs), so
`forward` keeps the capture contract of `ukgpu.llama_core.backend`: the same backend calls and
shapes whatever the token and position, no host read but the final `to_host`, and nothing done
in Python that a later step would need repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ukgpu.llama_core.backend import Backend, KVCache, RopeConfig
from ukgpu.llama_core.errors import GGUFError, UkgpuError
from ukgpu.llama_core.gguf.file import GGUFFile, open_gguf
from ukgpu.llama_core.models.config import ModelConfig
from ukgpu.llama_core.models.registry import resolve_model


class ContextOverflowError(UkgpuError):
    """More tokens than the KV cache holds."""


def rope_config(config: ModelConfig) -> RopeConfig:
    """The rotary embedding of a model; linear scaling only."""
    scaling = config.rope_scaling
    if scaling is not None and scaling.type != "linear":
        raise GGUFError(f"rope scaling {scaling.type!r} is not supported (only linear); "
                        "use a model without long-context rope scaling")
    return RopeConfig(n_rot=config.rope_dim, base=config.rope_base,
                      neox=config.rope_style == "neox",
                      scale=1.0 / scaling.factor if scaling is not None else 1.0)


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
    def from_gguf(cls, gguf: GGUFFile, backend: Backend) -> Weights:
        c = gguf.config

        def w(name: str) -> Any:
            return backend.prepare_weight(gguf.tensors[name])

        def bias(name: str) -> Any | None:
            return w(name) if c.has_qkv_bias else None

        layers = []
        for i in range(c.n_layers):
            n = c.layer(i)
            layers.append(LayerWeights(
                attn_norm=w(n.attn_norm), wq=w(n.attn_q), wk=w(n.attn_k), wv=w(n.attn_v),
                bq=bias(n.attn_q_bias), bk=bias(n.attn_k_bias), bv=bias(n.attn_v_bias),
                wo=w(n.attn_output), ffn_norm=w(n.ffn_norm),
                w_gate=w(n.ffn_gate), w_up=w(n.ffn_up), w_down=w(n.ffn_down),
            ))
        embd = w(c.token_embd)
        output = embd if c.tied_embeddings else w(c.output)
        return cls(embd, layers, w(c.output_norm), output)


class Model:
    """A GGUF llama-family model bound to one backend."""

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        self.gguf = gguf
        self.backend = backend
        self.config = gguf.config  # shapes were checked when the file was opened
        self.rope = rope_config(self.config)
        self.weights = Weights.from_gguf(gguf, backend)

    @classmethod
    def load(cls, model: str | Path, backend: Backend | None = None,
             dtype: npt.DTypeLike = np.float32) -> Model:
        """Open a model by name or path; `dtype` picks the CPU backend's precision."""
        from ukgpu.llama_core.cpu.backend import CpuBackend

        return cls(open_gguf(resolve_model(str(model))), backend or CpuBackend(dtype=dtype))

    def new_kv(self, n_ctx: int) -> KVCache:
        c = self.config
        return self.backend.alloc_kv(c.n_layers, n_ctx, c.n_kv_heads, c.head_dim)

    def forward(self, tokens: np.ndarray, start_pos: int, kv: KVCache,
                all_logits: bool = True) -> np.ndarray:
        """Logits float[n, vocab] for tokens int[n] at start_pos.. (float[1, vocab], the
        last position only, when all_logits is False).  A one-token call may be recorded once
        and replayed by the backend (`Backend.decode`): keep the capture contract of
        `ukgpu.llama_core.backend` when changing this code."""
        c, w, be = self.config, self.weights, self.backend
        x = self._layers(tokens, start_pos, kv)
        if not all_logits:
            x = be.take_rows(x, slice(-1, None))  # [1, d]
        x = be.rmsnorm(x, w.output_norm, c.rms_eps)
        return be.to_host(be.matmul(x, w.output))  # [n, vocab]

    def hidden_states(self, tokens: np.ndarray, start_pos: int, kv: KVCache) -> np.ndarray:
        """float[n, d]: the final hidden state of each token after the output norm (what the
        output matrix turns into logits), for embeddings.  Eager on every backend."""
        c, w, be = self.config, self.weights, self.backend
        return np.asarray(be.to_host(be.rmsnorm(self._layers(tokens, start_pos, kv),
                                                w.output_norm, c.rms_eps)))

    def _layers(self, tokens: np.ndarray, start_pos: int, kv: KVCache) -> Any:
        """The residual stream [n, d] after every block, for tokens int[n] at start_pos.."""
        w, be = self.weights, self.backend
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if start_pos + len(tokens) > kv.n_ctx:
            raise ContextOverflowError(
                f"{start_pos + len(tokens)} tokens do not fit a {kv.n_ctx}-token KV cache; "
                "shorten the input or raise n_ctx")
        x = be.embedding(w.token_embd, tokens)  # [n, d]
        for i, lw in enumerate(w.layers):
            def attend(q: Any, k: Any, v: Any, i: int = i) -> Any:
                return self._rope_attend(q, k, v, kv, i, start_pos)  # [n, H*hd]
            x = self._block(x, lw, attend)
        return x

    def forward_batch(self, tokens: np.ndarray, positions: list[int], kvs: list[KVCache]) -> np.ndarray:
        """One decode step of B sequences: token b at position positions[b] of cache kvs[b].
        Logits float[B, vocab]; row b is what forward([tokens[b]], positions[b], kvs[b]) gives.
        The matrix products run once over all B rows (each weight is read once for the batch);
        rope and attention run per sequence.  Needs a backend with `max_batch` > 1."""
        c, w, be = self.config, self.weights, self.backend
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if not len(tokens) == len(positions) == len(kvs) or len(tokens) > be.max_batch:
            raise ValueError(f"forward_batch: {len(tokens)} tokens, {len(positions)} positions, "
                             f"{len(kvs)} caches; need equal counts of at most {be.max_batch}")
        for pos, kv in zip(positions, kvs):
            if pos + 1 > kv.n_ctx:
                raise ContextOverflowError(f"position {pos} is past a {kv.n_ctx}-token KV cache; "
                                           "shorten the input or raise n_ctx")
        rows = [slice(b, b + 1) for b in range(len(tokens))]
        x = be.embedding(w.token_embd, tokens)  # [B, d]
        for i, lw in enumerate(w.layers):
            def attend(q: Any, k: Any, v: Any, i: int = i) -> Any:
                return be.concat_rows([  # [B, H*hd]
                    self._rope_attend(be.take_rows(q, row), be.take_rows(k, row),
                                      be.take_rows(v, row), kv, i, pos)
                    for row, pos, kv in zip(rows, positions, kvs)])
            x = self._block(x, lw, attend)
        x = be.rmsnorm(x, w.output_norm, c.rms_eps)
        return be.to_host(be.matmul(x, w.output))  # [B, vocab]

    def _rope_attend(self, q: Any, k: Any, v: Any, kv: KVCache, layer: int, start_pos: int) -> Any:
        """Rotate q, k for positions start_pos.., store k, v in kv and attend: [n, H*hd]."""
        c, be = self.config, self.backend
        q = be.rope(q, start_pos, c.n_heads, self.rope)
        k = be.rope(k, start_pos, c.n_kv_heads, self.rope)
        return be.attention(q, k, v, kv, layer, start_pos)

    def _block(self, x: Any, lw: Any, attend: Callable[[Any, Any, Any], Any]) -> Any:
        """One transformer block on x [n, d]; `attend(q, k, v)` places and attends."""
        c, be = self.config, self.backend
        h = be.rmsnorm(x, lw.attn_norm, c.rms_eps)  # [n, d]
        q = be.matmul(h, lw.wq, lw.bq)  # [n, H*hd]
        k = be.matmul(h, lw.wk, lw.bk)  # [n, Hkv*hd]
        v = be.matmul(h, lw.wv, lw.bv)
        x = be.add(x, be.matmul(attend(q, k, v), lw.wo))  # [n, d]
        h = be.rmsnorm(x, lw.ffn_norm, c.rms_eps)
        ff = be.swiglu(be.matmul(h, lw.w_gate), be.matmul(h, lw.w_up))  # [n, d_ff]
        return be.add(x, be.matmul(ff, lw.w_down))
