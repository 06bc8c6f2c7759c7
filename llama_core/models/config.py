"""ModelConfig: the hyperparameters of a llama-family model, read from GGUF metadata.

Tensor names follow llama.cpp's GGUF scheme:

    token_embd.weight        [vocab, dim]
    output_norm.weight       [dim]
    output.weight            [vocab, dim]   (absent when tied: token_embd is reused)
    rope_freqs.weight        [rope_dim/2]   (llama3 rope scaling: frequency divisors)
    rope_factors_long.weight, rope_factors_short.weight [rope_dim/2]   (phi3, optional)
    blk.{i}.attn_norm.weight [dim]
    blk.{i}.attn_q.weight    [n_heads * head_dim, dim]     (+ .bias on qwen2)
    blk.{i}.attn_k.weight    [n_kv_heads * head_dim, dim]  (+ .bias on qwen2)
    blk.{i}.attn_v.weight    [n_kv_heads * head_dim, dim]  (+ .bias on qwen2)
    blk.{i}.attn_qkv.weight  [(n_heads + 2 n_kv_heads) * head_dim, dim]  (phi3: q, k, v fused)
    blk.{i}.attn_q_norm.weight, attn_k_norm.weight [head_dim]  (qwen3, gemma3)
    blk.{i}.attn_output.weight [dim, n_heads * head_dim]
    blk.{i}.post_attention_norm.weight [dim]   (gemma3)
    blk.{i}.ffn_norm.weight  [dim]
    blk.{i}.ffn_gate.weight  [ffn_dim, dim]    (absent on phi3: ffn_up holds gate then up)
    blk.{i}.ffn_up.weight    [ffn_dim, dim]    ([2 ffn_dim, dim] on phi3)
    blk.{i}.ffn_down.weight  [dim, ffn_dim]
    blk.{i}.post_ffw_norm.weight [dim]         (gemma3)

Shapes are numpy order (rows first): `y = W @ x` for W of shape [out, in].  What differs per
architecture beyond the tensors is one row of `FAMILIES`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ukgpu.llama_core.errors import GGUFError
from ukgpu.llama_core.models.metadata import Meta


@dataclass(frozen=True)
class Family:
    """What an architecture does beyond llama's block (llama.cpp's graph for it)."""

    rope_style: str  # "norm": adjacent pairs rotate; "neox": first/second half
    qk_norm: bool = False  # per-head RMSNorm of q and k before rope (qwen3, gemma3)
    post_norms: bool = False  # RMSNorm of the attention and FFN outputs (gemma3)
    ffn_act: str = "silu"  # "silu": SwiGLU; "gelu": GELU-tanh gate (gemma3)
    embed_scale: bool = False  # embeddings times sqrt(dim) (gemma3)
    swa_pattern: int = 0  # with a sliding window: layer i is local when i % n < n - 1 (gemma3: 6)


FAMILIES = {
    "llama": Family("norm"),
    "qwen2": Family("neox"),
    "qwen3": Family("neox", qk_norm=True),
    "gemma3": Family("neox", qk_norm=True, post_norms=True, ffn_act="gelu", embed_scale=True, swa_pattern=6),
    "phi3": Family("neox"),
}
SUPPORTED_ARCHS = tuple(FAMILIES)
ROPE_STYLE = {arch: f.rope_style for arch, f in FAMILIES.items()}
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's rope base of gemma3's sliding-window layers

TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"
ROPE_FREQS = "rope_freqs.weight"
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class LayerNames:
    attn_norm: str
    attn_q: str
    attn_k: str
    attn_v: str
    attn_qkv: str
    attn_q_bias: str
    attn_k_bias: str
    attn_v_bias: str
    attn_q_norm: str
    attn_k_norm: str
    attn_output: str
    attn_post_norm: str
    ffn_norm: str
    ffn_gate: str
    ffn_up: str
    ffn_down: str
    ffn_post_norm: str


def layer_names(i: int) -> LayerNames:
    """The tensor names of block i."""
    p = f"blk.{i}."
    return LayerNames(
        attn_norm=p + "attn_norm.weight", attn_q=p + "attn_q.weight", attn_k=p + "attn_k.weight",
        attn_v=p + "attn_v.weight", attn_qkv=p + "attn_qkv.weight",
        attn_q_bias=p + "attn_q.bias", attn_k_bias=p + "attn_k.bias", attn_v_bias=p + "attn_v.bias",
        attn_q_norm=p + "attn_q_norm.weight", attn_k_norm=p + "attn_k_norm.weight",
        attn_output=p + "attn_output.weight", attn_post_norm=p + "post_attention_norm.weight",
        ffn_norm=p + "ffn_norm.weight", ffn_gate=p + "ffn_gate.weight", ffn_up=p + "ffn_up.weight",
        ffn_down=p + "ffn_down.weight", ffn_post_norm=p + "post_ffw_norm.weight",
    )


@dataclass(frozen=True)
class RopeScaling:
    type: str  # "none", "linear", "yarn" or "longrope"
    factor: float
    original_ctx_len: int | None
    beta_fast: float = 32.0  # YaRN ramp bounds (rope.scaling.yarn_beta_fast / _slow)
    beta_slow: float = 1.0
    ext_factor: float | None = None  # YaRN mix; None: 1.0 for yarn, else 0.0
    attn_factor: float = 1.0  # rope.scaling.attn_factor (phi3 longrope) / yarn_attn_factor


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # one of SUPPORTED_ARCHS
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int  # leading dims of each head that are rotated (<= head_dim)
    ffn_dim: int
    vocab_size: int
    ctx_len: int
    rope_base: float
    rope_scaling: RopeScaling | None
    rms_eps: float
    rope_style: str  # "norm" | "neox"
    has_qkv_bias: bool
    tied_embeddings: bool  # no output.weight: logits use token_embd
    family: Family = FAMILIES["llama"]
    fused_qkv: bool = False  # attn_qkv instead of attn_q/k/v (phi3)
    fused_up: bool = False  # ffn_up = [gate; up], no ffn_gate (phi3)
    rope_freqs: str | None = None  # the llama3 frequency-divisor tensor
    rope_factors: tuple[str, str] | None = None  # phi3's (long, short) factor tensors
    sliding_window: int = 0  # gemma3's local layers: keys within this many positions
    rope_base_local: float = GEMMA3_LOCAL_ROPE_BASE  # rope base of the sliding-window layers
    attn_scale: float | None = None  # factor on q.k; None: 1/sqrt(head_dim)

    token_embd: str = TOKEN_EMBD
    output_norm: str = OUTPUT_NORM

    @property
    def output(self) -> str:
        """Name of the logits matrix [vocab, dim]."""
        return TOKEN_EMBD if self.tied_embeddings else OUTPUT

    @property
    def embed_scale(self) -> float:
        """The factor on the embeddings (gemma3: sqrt(dim)), 1.0 for the others."""
        return math.sqrt(self.dim) if self.family.embed_scale else 1.0

    @property
    def orig_ctx(self) -> int:
        """The training context rope scaling refers to (llama.cpp's n_ctx_orig_yarn)."""
        s = self.rope_scaling
        return s.original_ctx_len if s is not None and s.original_ctx_len else self.ctx_len

    def layer(self, i: int) -> LayerNames:
        return layer_names(i)

    def is_local(self, i: int) -> bool:
        """Layer i attends within the sliding window (gemma3's local layers)."""
        n = self.family.swa_pattern
        return self.sliding_window > 0 and (n == 0 or i % n < n - 1)

    def layer_window(self, i: int) -> int:
        """The attention window of layer i: 0 for full causal attention."""
        return self.sliding_window if self.is_local(i) else 0


def config_from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, Any], path: Path) -> ModelConfig:
    """Build and check the config; tensors map names to objects with a `.shape`."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: architecture {arch!r:.80} (general.architecture) is not supported:"
                        f" use a model of architecture {', '.join(SUPPORTED_ARCHS)}")
    m = Meta(metadata, arch, path)
    n_layers = m.get("{arch}.block_count", int)
    _check_blocks(m, n_layers, tensors)
    dim, heads = m.get("{arch}.embedding_length", int), _heads(m)
    head_dim = _head_dim(m, dim, heads[0])
    rope_dim = m.get("{arch}.rope.dimension_count", int, head_dim)
    if rope_dim % 2 or rope_dim > head_dim:
        raise m.fail("{arch}.rope.dimension_count",
                     f"= {rope_dim} is not an even number up to the head size {head_dim}")
    if TOKEN_EMBD not in tensors:
        raise GGUFError(f"{path}: tensor {TOKEN_EMBD!r} is missing: not a complete model")
    family = FAMILIES[arch]
    names = layer_names(0)
    cfg = ModelConfig(
        arch=arch, n_layers=n_layers, dim=dim, n_heads=heads[0], n_kv_heads=heads[1],
        head_dim=head_dim, rope_dim=rope_dim,
        ffn_dim=m.get("{arch}.feed_forward_length", int),
        vocab_size=tensors[TOKEN_EMBD].shape[0],
        ctx_len=m.get("{arch}.context_length", int),
        rope_base=m.get("{arch}.rope.freq_base", float, 10000.0),
        rope_scaling=_rope_scaling(m),
        rms_eps=m.get("{arch}.attention.layer_norm_rms_epsilon", float),
        rope_style=family.rope_style,
        has_qkv_bias=names.attn_q_bias in tensors,
        tied_embeddings=OUTPUT not in tensors,
        family=family,
        fused_qkv=names.attn_qkv in tensors,
        fused_up=arch == "phi3" and names.ffn_gate not in tensors,
        rope_freqs=ROPE_FREQS if ROPE_FREQS in tensors else None,
        rope_factors=ROPE_FACTORS if arch == "phi3" and ROPE_FACTORS[0] in tensors else None,
        **_attention(m, arch, n_layers, dim, heads[0], head_dim),
    )
    _check_shapes(cfg, tensors, path)
    return cfg


def _head_dim(m: Meta, dim: int, n_heads: int) -> int:
    """attention.key_length, else dim / heads; value_length, where given, must equal it."""
    head_dim = m.get("{arch}.attention.key_length", int, None)
    if head_dim is None:
        if dim % n_heads:
            raise m.fail("{arch}.attention.head_count", f"= {n_heads} does not divide embedding_length {dim}")
        head_dim = dim // n_heads
    value_dim = m.get("{arch}.attention.value_length", int, head_dim)
    if value_dim != head_dim:
        raise m.fail("{arch}.attention.value_length", f"= {value_dim} differs from the key length {head_dim}"
                     " (not supported)")
    return head_dim


def _attention(m: Meta, arch: str, n_layers: int, dim: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    """gemma3's sliding window, local rope base and q.k scale (llama.cpp's rules); {} otherwise.
    Other archs' sliding_window keys are ignored, as llama.cpp does (phi3's is disabled there)."""
    if arch != "gemma3":
        return {}
    window = m.get("{arch}.attention.sliding_window", int, 0)
    if window == 0 and "gemma3.final_logit_softcapping" in m.metadata:
        raise m.fail("{arch}.final_logit_softcapping", "is set on a model without a sliding window"
                     " (logit soft-capping is not supported)")
    # query_pre_attn_scalar: dim / heads for the 62-layer (27B) model, the head size otherwise
    scalar = dim // n_heads if n_layers == 62 else head_dim
    return {"sliding_window": window, "attn_scale": 1.0 / math.sqrt(scalar),
            "rope_base_local": m.get("{arch}.rope.freq_base_swa", float, GEMMA3_LOCAL_ROPE_BASE)}


def _heads(m: Meta) -> tuple[int, int]:
    """(query heads, key/value heads); the second must divide the first."""
    n_heads = m.get("{arch}.attention.head_count", int)
    n_kv_heads = m.get("{arch}.attention.head_count_kv", int, n_heads)
    if n_heads % n_kv_heads:
        raise m.fail("{arch}.attention.head_count_kv", f"= {n_kv_heads} does not divide head_count {n_heads}")
    return n_heads, n_kv_heads


def _check_blocks(m: Meta, n_layers: int, tensors: Mapping[str, Any]) -> None:
    """block_count may not exceed the blocks the file has tensors for (`blk.{i}.*`): checked before
    anything is built per block, so a huge count costs nothing (the shape check then names any
    tensor missing from blocks 0 .. n-1)."""
    present = {name.split(".", 2)[1] for name in tensors if name.startswith("blk.")}
    if n_layers > len(present):
        raise m.fail("{arch}.block_count", f"= {n_layers} but the file has tensors for {len(present)} blocks")


def _rope_scaling(m: Meta) -> RopeScaling | None:
    """The rope scaling keys; None when there are none.  As in llama.cpp, a scaling factor
    divides the positions whatever the type (phi3's longrope files carry one)."""
    kind = m.get("{arch}.rope.scaling.type", str, "none")
    if kind not in ROPE_SCALING_TYPES:
        raise m.fail("{arch}.rope.scaling.type", f"= {kind!r:.40} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    attn_factor = m.get("{arch}.rope.scaling.attn_factor", float, None)
    if attn_factor is None:
        attn_factor = m.get("{arch}.rope.scaling.yarn_attn_factor", float, 1.0)
    factor = m.get("{arch}.rope.scaling.factor", float, None)
    if kind == "none" and factor is None and attn_factor == 1.0:
        return None
    return RopeScaling(
        kind, 1.0 if factor is None else factor,
        m.get("{arch}.rope.scaling.original_context_length", int, None),
        beta_fast=m.get("{arch}.rope.scaling.yarn_beta_fast", float, 32.0),
        beta_slow=m.get("{arch}.rope.scaling.yarn_beta_slow", float, 1.0),
        ext_factor=m.get("{arch}.rope.scaling.yarn_ext_factor", float, None),
        attn_factor=attn_factor)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with its numpy shape."""
    shapes = {TOKEN_EMBD: (cfg.vocab_size, cfg.dim), OUTPUT_NORM: (cfg.dim,), cfg.output: (cfg.vocab_size, cfg.dim)}
    for name in ([cfg.rope_freqs] if cfg.rope_freqs else []) + list(cfg.rope_factors or ()):
        shapes[name] = (cfg.rope_dim // 2,)
    for i in range(cfg.n_layers):
        shapes |= _layer_shapes(cfg, layer_names(i))
    return shapes


def _layer_shapes(cfg: ModelConfig, n: LayerNames) -> dict[str, tuple[int, ...]]:
    d, ff = cfg.dim, cfg.ffn_dim
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {n.attn_norm: (d,), n.ffn_norm: (d,), n.attn_output: (d, q_dim), n.ffn_down: (d, ff)}
    if cfg.fused_qkv:
        shapes[n.attn_qkv] = (q_dim + 2 * kv_dim, d)
    else:
        shapes |= {n.attn_q: (q_dim, d), n.attn_k: (kv_dim, d), n.attn_v: (kv_dim, d)}
    if cfg.fused_up:
        shapes[n.ffn_up] = (2 * ff, d)
    else:
        shapes |= {n.ffn_gate: (ff, d), n.ffn_up: (ff, d)}
    if cfg.has_qkv_bias:
        shapes |= {n.attn_q_bias: (q_dim,), n.attn_k_bias: (kv_dim,), n.attn_v_bias: (kv_dim,)}
    if cfg.family.qk_norm:
        shapes |= {n.attn_q_norm: (cfg.head_dim,), n.attn_k_norm: (cfg.head_dim,)}
    if cfg.family.post_norms:
        shapes |= {n.attn_post_norm: (d,), n.ffn_post_norm: (d,)}
    return shapes


def _check_shapes(cfg: ModelConfig, tensors: Mapping[str, Any], path: Path) -> None:
    for name, shape in expected_shapes(cfg).items():
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name!r} is missing: the file is not a complete {cfg.arch} model")
        if tuple(tensors[name].shape) != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                            "from the metadata")
