"""The `Backend` interface: every operation the forward pass needs.

`model.py` speaks only to this interface, so a device backend (the CUDA one in
`ukgpu.gpu.cuda.backend`) replaces `CpuBackend` without touching the model.
Activations are backend arrays (`Act`); the model never looks inside them
except through `to_host`.  Weights are opaque handles from `prepare_weight`.

Shapes below: n = tokens in this call, d = model width, H/Hkv = query/KV
heads, hd = head dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Act = Any  # a backend's activation array
Allocator = Callable[[tuple[int, ...], np.dtype], Any]  # alloc(shape, dtype) -> zeroed array


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding as a GGUF file describes it."""

    n_rot: int  # leading dims of each head that rotate (rope.dimension_count)
    base: float  # rope.freq_base
    neox: bool  # True: pairs (i, i + n_rot/2) (qwen2); False: adjacent pairs (llama)
    scale: float = 1.0  # linear scaling: positions are multiplied by this

    def inv_freq(self) -> np.ndarray:
        """float64[n_rot/2]: the angle per position of each rotated pair."""
        return self.base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)


@dataclass
class KVCache:
    """Keys and values of one sequence: k, v are [n_layers, Hkv, n_ctx, hd]."""

    k: Any
    v: Any
    n_ctx: int


class Backend(ABC):
    """Operations of a llama-family forward pass over one sequence."""

    name: str
    max_batch: int = 1  # sequences one decode step may carry (`Model.forward_batch`)

    @abstractmethod
    def prepare_weight(self, view: Any) -> Any:
        """A handle for one GGUF tensor (`TensorView`), shaped (out, in) for matrices."""

    @abstractmethod
    def alloc_kv(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int) -> KVCache:
        """A zeroed KV cache for one sequence of up to n_ctx tokens."""

    @abstractmethod
    def embedding(self, table: Any, tokens: np.ndarray) -> Act:
        """Rows `tokens` (int[n]) of the embedding table: [n, d]."""

    @abstractmethod
    def matmul(self, x: Act, weight: Any, bias: Any | None = None) -> Act:
        """x [n, in] @ weight^T (+ bias): [n, out]."""

    @abstractmethod
    def rmsnorm(self, x: Act, weight: Any, eps: float) -> Act:
        """x [n, d] / rms(x) * weight: [n, d]."""

    @abstractmethod
    def rope(self, x: Act, start_pos: int, n_heads: int, rope: RopeConfig) -> Act:
        """Rotate x [n, n_heads*hd] for positions start_pos .. start_pos+n-1."""

    @abstractmethod
    def attention(self, q: Act, k: Act, v: Act, kv: KVCache, layer: int, start_pos: int) -> Act:
        """Store k, v [n, Hkv*hd] at start_pos in `kv`, then causal GQA attention of
        q [n, H*hd] over positions 0 .. start_pos+n-1: [n, H*hd]."""

    @abstractmethod
    def swiglu(self, gate: Act, up: Act) -> Act:
        """silu(gate) * up, both [n, d_ff]."""

    @abstractmethod
    def add(self, x: Act, y: Act) -> Act:
        """x + y (x may be updated in place and returned)."""

    @abstractmethod
    def take_rows(self, x: Act, rows: slice) -> Act:
        """x[rows] for an [n, d] activation."""

    @abstractmethod
    def to_host(self, x: Act) -> np.ndarray:
        """x as a numpy array."""

    def concat_rows(self, parts: list[Act]) -> Act:
        """The rows of `parts` ([n_i, d] each) stacked: [sum n_i, d].  Only backends with
        max_batch > 1 need it."""
        raise NotImplementedError(f"the {self.name} backend decodes one sequence per step "
                                  "(max_batch 1): call Model.forward per sequence")
