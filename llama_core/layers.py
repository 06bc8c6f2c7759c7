"""The weights of a model on a backend, and the rotary embedding each layer uses.

`Weights.from_gguf` turns every tensor the forward pass reads into a backend handle (views of
the mapped file, never copies).  Fused tensors (phi3's `attn_qkv` [q + 2 kv, d] and `ffn_up`
[2 ffn, d]) are cut into row ranges here, so the forward pass sees separate q, k, v, gate and
up matrices whatever the file holds: a row range of a quantized matrix is whole rows of blocks.

`layer_rope` gives the `RopeConfig` of one layer for a KV cache of n_ctx positions, following
llama.cpp: linear scale 1 / rope.scaling.factor, llama3's `rope_freqs` divisors, phi3's long
factors when the context exceeds the training one (short ones otherwise), YaRN's ramp for
scaling type yarn, and gemma3's sliding-window layers with their own base and no scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ukgpu.llama_core.backend import Backend, RopeConfig
from ukgpu.llama_core.gguf.file import GGUFFile, TensorView
from ukgpu.llama_core.models.config import ModelConfig


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
    q_norm: Any | None = None  # [head_dim] (qwen3, gemma3)
    k_norm: Any | None = None
    attn_post_norm: Any | None = None  # [d] (gemma3)
    ffn_post_norm: Any | None = None


def row_range(view: TensorView, start: int, stop: int) -> TensorView:
    """Rows start .. stop-1 of a matrix tensor, as a view of the same mapped bytes."""
    rows = view.rows()[start:stop]
    return TensorView(f"{view.name}[{start}:{stop}]", view.qtype, (stop - start, *view.shape[1:]),
                      rows.reshape(-1))


def _layer(gguf: GGUFFile, backend: Backend, i: int) -> LayerWeights:
    c, n = gguf.config, gguf.config.layer(i)

    def w(name: str) -> Any:
        return backend.prepare_weight(gguf.tensors[name])

    def opt(name: str, present: bool) -> Any | None:
        return w(name) if present else None

    if c.fused_qkv:
        qkv, q_dim, kv_dim = gguf.tensors[n.attn_qkv], c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        wq, wk, wv = (backend.prepare_weight(row_range(qkv, a, b)) for a, b in
                      ((0, q_dim), (q_dim, q_dim + kv_dim), (q_dim + kv_dim, q_dim + 2 * kv_dim)))
    else:
        wq, wk, wv = w(n.attn_q), w(n.attn_k), w(n.attn_v)
    if c.fused_up:  # [gate; up]: llama.cpp's swiglu of the fused product takes silu of the first half
        up = gguf.tensors[n.ffn_up]
        w_gate, w_up = (backend.prepare_weight(row_range(up, a, b)) for a, b in
                        ((0, c.ffn_dim), (c.ffn_dim, 2 * c.ffn_dim)))
    else:
        w_gate, w_up = w(n.ffn_gate), w(n.ffn_up)
    return LayerWeights(
        attn_norm=w(n.attn_norm), wq=wq, wk=wk, wv=wv,
        bq=opt(n.attn_q_bias, c.has_qkv_bias), bk=opt(n.attn_k_bias, c.has_qkv_bias),
        bv=opt(n.attn_v_bias, c.has_qkv_bias), wo=w(n.attn_output), ffn_norm=w(n.ffn_norm),
        w_gate=w_gate, w_up=w_up, w_down=w(n.ffn_down),
        q_norm=opt(n.attn_q_norm, c.family.qk_norm), k_norm=opt(n.attn_k_norm, c.family.qk_norm),
        attn_post_norm=opt(n.attn_post_norm, c.family.post_norms),
        ffn_post_norm=opt(n.ffn_post_norm, c.family.post_norms),
    )


@dataclass
class Weights:
    token_embd: Any
    layers: list[LayerWeights]
    output_norm: Any
    output: Any  # token_embd when the model ties its embeddings

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, backend: Backend) -> Weights:
        c = gguf.config
        layers = [_layer(gguf, backend, i) for i in range(c.n_layers)]
        embd = backend.prepare_weight(gguf.tensors[c.token_embd])
        output = embd if c.tied_embeddings else backend.prepare_weight(gguf.tensors[c.output])
        return cls(embd, layers, backend.prepare_weight(gguf.tensors[c.output_norm]), output)


def rope_config(config: ModelConfig) -> RopeConfig:
    """The rotary embedding of the model's global layers, before frequency factors (those are
    tensors: `RopeTable` adds them)."""
    s = config.rope_scaling
    rope = RopeConfig(n_rot=config.rope_dim, base=config.rope_base, neox=config.rope_style == "neox")
    if s is None:
        return rope
    ext = s.ext_factor if s.ext_factor is not None else (1.0 if s.type == "yarn" else 0.0)
    return replace(rope, scale=1.0 / s.factor, ext_factor=ext, attn_factor=s.attn_factor,
                   beta_fast=s.beta_fast, beta_slow=s.beta_slow, orig_ctx=config.orig_ctx)


def _factors(gguf: GGUFFile, name: str) -> tuple[float, ...]:
    return tuple(float(f) for f in gguf.tensors[name].dequantize().astype(np.float64))


class RopeTable:
    """The `RopeConfig` of each layer, per KV cache size (phi3's factors depend on it)."""

    def __init__(self, gguf: GGUFFile) -> None:
        c = self.config = gguf.config
        self.base = rope_config(c)
        self.local = RopeConfig(n_rot=c.rope_dim, base=c.rope_base_local, neox=c.rope_style == "neox")
        self.global_ = replace(self.base, freq_factors=_factors(gguf, c.rope_freqs)) if c.rope_freqs else self.base
        self.long_short = tuple(replace(self.base, freq_factors=_factors(gguf, n)) for n in c.rope_factors) \
            if c.rope_factors else None

    def layer_rope(self, i: int, n_ctx: int) -> RopeConfig:
        """Layer i's rope for a KV cache of n_ctx positions."""
        if self.config.is_local(i):
            return self.local
        if self.long_short is not None:
            return self.long_short[0] if n_ctx > self.config.orig_ctx else self.long_short[1]
        return self.global_
