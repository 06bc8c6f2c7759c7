"""ModelConfig: the hyperparameters of a llama-family model, read from GGUF metadata.

Tensor names follow llama.cpp's GGUF scheme:

    token_embd.weight        [vocab, dim]
    output_norm.weight       [dim]
    output.weight            [vocab, dim]   (absent when tied: token_embd is reused)
    blk.{i}.attn_norm.weight [dim]
    blk.{i}.attn_q.weight    [n_heads * head_dim, dim]     (+ .bias on qwen2)
    blk.{i}.attn_k.weight    [n_kv_heads * head_dim, dim]  (+ .bias on qwen2)
    blk.{i}.attn_v.weight    [n_kv_heads * head_dim, dim]  (+ .bias on qwen2)
    blk.{i}.attn_output.weight [dim, n_heads * head_dim]
    blk.{i}.ffn_norm.weight  [dim]
    blk.{i}.ffn_gate.weight  [ffn_dim, dim]
    blk.{i}.ffn_up.weight    [ffn_dim, dim]
    blk.{i}.ffn_down.weight  [dim, ffn_dim]

Shapes are numpy order (rows first): `y = W @ x` for W of shape [out, in].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ukgpu.llama_core.errors import GGUFError

SUPPORTED_ARCHS = ("llama", "qwen2")
ROPE_STYLE = {"llama": "norm", "qwen2": "neox"}  # norm: adjacent pairs; neox: first/second half

TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"


@dataclass(frozen=True)
class LayerNames:
    attn_norm: str
    attn_q: str
    attn_k: str
    attn_v: str
    attn_q_bias: str
    attn_k_bias: str
    attn_v_bias: str
    attn_output: str
    ffn_norm: str
    ffn_gate: str
    ffn_up: str
    ffn_down: str


def layer_names(i: int) -> LayerNames:
    """The tensor names of block i."""
    p = f"blk.{i}."
    return LayerNames(
        attn_norm=p + "attn_norm.weight",
        attn_q=p + "attn_q.weight",
        attn_k=p + "attn_k.weight",
        attn_v=p + "attn_v.weight",
        attn_q_bias=p + "attn_q.bias",
        attn_k_bias=p + "attn_k.bias",
        attn_v_bias=p + "attn_v.bias",
        attn_output=p + "attn_output.weight",
        ffn_norm=p + "ffn_norm.weight",
        ffn_gate=p + "ffn_gate.weight",
        ffn_up=p + "ffn_up.weight",
        ffn_down=p + "ffn_down.weight",
    )


@dataclass(frozen=True)
class RopeScaling:
    type: str  # "linear" or "yarn"
    factor: float
    original_ctx_len: int | None


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2"
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int  # leading dims of each head that are rotated (== head_dim here)
    ffn_dim: int
    vocab_size: int
    ctx_len: int
    rope_base: float
    rope_scaling: RopeScaling | None
    rms_eps: float
    rope_style: str  # "norm" | "neox"
    has_qkv_bias: bool
    tied_embeddings: bool  # no output.weight: logits use token_embd

    token_embd: str = TOKEN_EMBD
    output_norm: str = OUTPUT_NORM

    @property
    def output(self) -> str:
        """Name of the logits matrix [vocab, dim]."""
        return TOKEN_EMBD if self.tied_embeddings else OUTPUT

    def layer(self, i: int) -> LayerNames:
        return layer_names(i)


# Accepted range of each hyperparameter (`{arch}.` + key): about 4x the largest released
# model's, so a corrupt or hostile value is refused by name before anything is sized by it.
_BOUNDS: dict[str, tuple[float, float]] = {
    "block_count": (1, 4096), "embedding_length": (1, 1 << 17), "feed_forward_length": (1, 1 << 20),
    "attention.head_count": (1, 4096), "attention.head_count_kv": (1, 4096),
    "attention.key_length": (1, 4096), "rope.dimension_count": (2, 4096), "context_length": (1, 1 << 24),
    "rope.scaling.original_context_length": (1, 1 << 24),
    # floats: finite and above the lower bound
    "rope.freq_base": (0.0, 1e12), "rope.scaling.factor": (0.0, 1e4), "attention.layer_norm_rms_epsilon": (0.0, 1.0),
}
_ANY = (-math.inf, math.inf)


class _Meta:
    """Typed, range-checked reads of `{arch}.*` keys with errors naming the key and the file."""

    def __init__(self, metadata: Mapping[str, Any], arch: str, path: Path):
        self.metadata, self.arch, self.path = metadata, arch, path

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        full = key.replace("{arch}", self.arch)
        if full not in self.metadata:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata key {full!r} is missing: the file is not a complete "
                                f"{self.arch} model")
            return default
        value = self.metadata[full]
        if not _is_kind(value, kind):
            raise GGUFError(f"{self.path}: metadata key {full!r} should be {kind.__name__}, got {value!r:.80}")
        value = kind(value)
        lo, hi = _BOUNDS.get(key.removeprefix("{arch}."), _ANY)
        if kind in (int, float) and not _in_range(value, lo, hi):
            raise GGUFError(f"{self.path}: metadata key {full!r} = {value} is outside {lo:g}..{hi:g}:"
                            " the file is corrupt")
        return value

    def fail(self, key: str, why: str) -> GGUFError:
        return GGUFError(f"{self.path}: metadata key {key.replace('{arch}', self.arch)!r} {why}: the file is corrupt")


def _in_range(value: float, lo: float, hi: float) -> bool:
    """lo <= value <= hi for an int; lo < value <= hi, and finite, for a float."""
    if isinstance(value, int):
        return lo <= value <= hi
    return math.isfinite(value) and lo < value <= hi


def _is_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def config_from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, Any], path: Path) -> ModelConfig:
    """Build and check the config; tensors map names to objects with a `.shape`."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: architecture {arch!r:.80} (general.architecture) is not supported:"
                        f" use a {' or '.join(SUPPORTED_ARCHS)} model")
    m = _Meta(metadata, arch, path)
    n_layers = m.get("{arch}.block_count", int)
    _check_blocks(m, n_layers, tensors)
    dim, heads = m.get("{arch}.embedding_length", int), _heads(m)
    head_dim = m.get("{arch}.attention.key_length", int, None)
    if head_dim is None:
        if dim % heads[0]:
            raise m.fail("{arch}.attention.head_count", f"= {heads[0]} does not divide embedding_length {dim}")
        head_dim = dim // heads[0]
    rope_dim = m.get("{arch}.rope.dimension_count", int, head_dim)
    if rope_dim % 2 or rope_dim > head_dim:
        raise m.fail("{arch}.rope.dimension_count",
                     f"= {rope_dim} is not an even number up to the head size {head_dim}")
    if TOKEN_EMBD not in tensors:
        raise GGUFError(f"{path}: tensor {TOKEN_EMBD!r} is missing: not a complete model")
    cfg = ModelConfig(
        arch=arch,
        n_layers=n_layers,
        dim=dim,
        n_heads=heads[0],
        n_kv_heads=heads[1],
        head_dim=head_dim,
        rope_dim=rope_dim,
        ffn_dim=m.get("{arch}.feed_forward_length", int),
        vocab_size=tensors[TOKEN_EMBD].shape[0],
        ctx_len=m.get("{arch}.context_length", int),
        rope_base=m.get("{arch}.rope.freq_base", float, 10000.0),
        rope_scaling=_rope_scaling(m),
        rms_eps=m.get("{arch}.attention.layer_norm_rms_epsilon", float),
        rope_style=ROPE_STYLE[arch],
        has_qkv_bias=layer_names(0).attn_q_bias in tensors,
        tied_embeddings=OUTPUT not in tensors,
    )
    _check_shapes(cfg, tensors, path)
    return cfg


def _heads(m: _Meta) -> tuple[int, int]:
    """(query heads, key/value heads); the second must divide the first."""
    n_heads = m.get("{arch}.attention.head_count", int)
    n_kv_heads = m.get("{arch}.attention.head_count_kv", int, n_heads)
    if n_heads % n_kv_heads:
        raise m.fail("{arch}.attention.head_count_kv", f"= {n_kv_heads} does not divide head_count {n_heads}")
    return n_heads, n_kv_heads


def _check_blocks(m: _Meta, n_layers: int, tensors: Mapping[str, Any]) -> None:
    """block_count may not exceed the blocks the file has tensors for (`blk.{i}.*`): checked before
    anything is built per block, so a huge count costs nothing (the shape check then names any
    tensor missing from blocks 0 .. n-1)."""
    present = {name.split(".", 2)[1] for name in tensors if name.startswith("blk.")}
    if n_layers > len(present):
        raise m.fail("{arch}.block_count", f"= {n_layers} but the file has tensors for {len(present)} blocks")


def _rope_scaling(m: _Meta) -> RopeScaling | None:
    kind = m.get("{arch}.rope.scaling.type", str, "none")
    if kind == "none":
        return None
    factor = m.get("{arch}.rope.scaling.factor", float, 1.0)
    return RopeScaling(kind, factor, m.get("{arch}.rope.scaling.original_context_length", int, None))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with its numpy shape."""
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {TOKEN_EMBD: (cfg.vocab_size, cfg.dim), OUTPUT_NORM: (cfg.dim,), cfg.output: (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        n = layer_names(i)
        shapes |= {
            n.attn_norm: (cfg.dim,), n.ffn_norm: (cfg.dim,),
            n.attn_q: (q_dim, cfg.dim), n.attn_k: (kv_dim, cfg.dim), n.attn_v: (kv_dim, cfg.dim),
            n.attn_output: (cfg.dim, q_dim),
            n.ffn_gate: (cfg.ffn_dim, cfg.dim), n.ffn_up: (cfg.ffn_dim, cfg.dim), n.ffn_down: (cfg.dim, cfg.ffn_dim),
        }
        if cfg.has_qkv_bias:
            shapes |= {n.attn_q_bias: (q_dim,), n.attn_k_bias: (kv_dim,), n.attn_v_bias: (kv_dim,)}
    return shapes


def _check_shapes(cfg: ModelConfig, tensors: Mapping[str, Any], path: Path) -> None:
    for name, shape in expected_shapes(cfg).items():
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name!r} is missing: the file is not a complete {cfg.arch} model")
        if tuple(tensors[name].shape) != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                            "from the metadata")
