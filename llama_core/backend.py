"""The `Backend` interface: every operation the forward pass needs, and every call the engine,
the benchmarks and the API make on a backend.

`model.py` speaks only to this interface, so a device backend (the CUDA one in
`ukgpu.gpu.cuda.backend`) replaces `CpuBackend` without touching the model.
Activations are backend arrays (`Act`); the model never looks inside them
except through `to_host`.  Weights are opaque handles from `prepare_weight`.
Which backend runs a model is decided in one place, `ukgpu.llama_core.backend_choice`.

Shapes below: n = tokens in this call, d = model width, H/Hkv = query/KV
heads, hd = head dim.

Decode steps (`decode`, `decode_greedy`) give what `Model.forward([token], pos, kv,
all_logits=False)` gives; the defaults here run exactly that.  A device backend may instead
record that forward once and replay the recording for every later token of the same KV cache
(the CUDA backend: a CUDA graph, `ukgpu.gpu.cuda.graph`).  The contract of that capture:

- What the backend does.  It first runs one step eagerly (the kernels load, the step's logits
  are real), then calls `Model.forward` again with a placeholder token and position while its
  ops *record* instead of run: each op only enqueues device work on the captured stream.  Values
  that change per step (token id, position, key count) are not uploaded: the ops read them from
  fixed device words that each replay rewrites first.  While recording there is no host<->device
  copy, no synchronisation, no device allocation (buffers come from the backend's own pools) and
  no kernel load (the eager step loaded them); `to_host` returns a zero-filled placeholder of
  the right shape and only marks its argument as the recording's output.  A recording belongs
  to one (model, KV cache) pair: it bakes in the cache's and the weights' device addresses and
  is dropped with either.
- What `Model.forward` must therefore keep true of a one-token call (`Model.forward_batch` is
  never recorded): the same sequence of backend calls, with the same shapes, whatever the token
  and position.  No branch or loop on token ids or on start_pos, no shape or slice computed from
  start_pos (positions reach the device only as the start_pos argument of `rope` and
  `attention`, token ids only through `embedding`); exactly one `to_host`, on the final logits,
  whose value it returns without reading it, and no other host read of an activation.  Python
  code in `forward` runs once, at capture: replays run only the recorded device work, so
  per-step host side effects (counters, logging, caches kept in Python) would silently stop.
  The backend checks the context bound on the host before each replay, as `forward` does.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ukgpu.llama_core.errors import ContextOverflowError

Act = Any  # a backend's activation array
Allocator = Callable[[tuple[int, ...], np.dtype], Any]  # alloc(shape, dtype) -> zeroed array


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding as a GGUF file describes it.

    Every backend rotates pair i of a head at position p by the angle p * inv_freq()[i] and
    multiplies the rotated pair by `mscale`: linear scaling, per-pair frequency factors
    (llama3's `rope_freqs.weight`, phi3's long/short factors) and the YaRN ramp are all folded
    into that one per-pair table, as llama.cpp's rope does (its YaRN mix of interpolated and
    extrapolated angles is linear in the position, so it folds too).
    """

    n_rot: int  # leading dims of each head that rotate (rope.dimension_count)
    base: float  # rope.freq_base
    neox: bool  # True: pairs (i, i + n_rot/2) (qwen2); False: adjacent pairs (llama)
    scale: float = 1.0  # linear scaling: positions are multiplied by this (1 / scaling factor)
    freq_factors: tuple[float, ...] | None = None  # [n_rot/2]: pair i's frequency is divided by it
    ext_factor: float = 0.0  # YaRN extrapolation mix (1.0 for rope scaling type yarn)
    attn_factor: float = 1.0  # multiplies cos and sin (YaRN / longrope attention factor)
    beta_fast: float = 32.0  # YaRN ramp: rotations per context below which pairs interpolate
    beta_slow: float = 1.0
    orig_ctx: int = 0  # the context the model was trained with (YaRN's ramp bounds)

    def inv_freq(self) -> np.ndarray:
        """float64[n_rot/2]: the effective angle per position of each rotated pair."""
        theta = self.base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)
        if self.freq_factors is not None:
            theta = theta / np.asarray(self.freq_factors, dtype=np.float64)
        interp = self.scale * theta
        if self.ext_factor == 0.0:
            return interp
        mix = self._yarn_ramp() * self.ext_factor  # 1: extrapolate (keep), 0: interpolate
        return interp * (1.0 - mix) + theta * mix

    @property
    def mscale(self) -> float:
        """The factor on cos and sin: attn_factor, times YaRN's 1 + 0.1 ln(1/scale)."""
        if self.ext_factor == 0.0:
            return self.attn_factor
        return self.attn_factor * (1.0 + 0.1 * math.log(1.0 / self.scale))

    def _yarn_ramp(self) -> np.ndarray:
        """float64[n_rot/2]: 1 for the fast pairs (kept), 0 for the slow ones (interpolated),
        linear between YaRN's correction dims."""
        def corr_dim(rotations: float) -> float:
            return self.n_rot * math.log(self.orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(self.base))

        low = max(0.0, math.floor(corr_dim(self.beta_fast)))
        high = min(self.n_rot - 1.0, math.ceil(corr_dim(self.beta_slow)))
        y = (np.arange(self.n_rot // 2, dtype=np.float64) - low) / max(0.001, high - low)
        return 1.0 - np.clip(y, 0.0, 1.0)


@dataclass(frozen=True)
class LayerAttention:
    """What the attention of one layer needs besides its activations: head counts, the rope,
    the sliding window, the q.k scale and the optional per-head q/k RMSNorm weights."""

    n_heads: int
    n_kv_heads: int
    rope: RopeConfig
    window: int = 0  # 0: causal; > 0: sliding window (see `Backend.attention`)
    scale: float | None = None  # None: 1/sqrt(hd)
    q_norm: Any = None  # [hd] weight handles (qwen3, gemma3), or None
    k_norm: Any = None
    eps: float = 1e-6


@dataclass
class KVCache:
    """Keys and values of one sequence: k, v are [n_layers, Hkv, n_ctx, hd]."""

    k: Any
    v: Any
    n_ctx: int


def check_decode_positions(positions: Sequence[int], kvs: Sequence[KVCache]) -> None:
    """Refuse (before anything is written) a decode step whose position is past its cache."""
    for pos, kv in zip(positions, kvs):
        if pos + 1 > kv.n_ctx:
            raise ContextOverflowError(f"position {pos} is past a {kv.n_ctx}-token KV cache; "
                                       "shorten the input or raise n_ctx")


class Backend(ABC):
    """Operations of a llama-family forward pass over one sequence, and the whole decode steps,
    memory report and release that callers use (those have defaults for a host backend)."""

    name: str
    max_batch: int = 1  # sequences one decode step may carry (`Model.forward_batch`)
    max_prefill_rows: int | None = None  # rows of one prefill pass (`Model.forward`); None: all

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
        """Rotate x [n, n_heads*hd] for positions start_pos .. start_pos+n-1: pair i of each
        head at position p by the angle p * rope.inv_freq()[i], the pair then times rope.mscale
        (x may be rotated in place and returned)."""

    @abstractmethod
    def attention(self, q: Act, k: Act, v: Act, kv: KVCache, layer: int, start_pos: int,
                  window: int = 0, scale: float | None = None) -> Act:
        """Store k, v [n, Hkv*hd] at start_pos in `kv`, then causal GQA attention of
        q [n, H*hd] over positions 0 .. start_pos+n-1: [n, H*hd].  window > 0: a sliding
        window, the query at position i sees the keys j with i - window < j <= i (llama.cpp's
        standard SWA mask).  scale: the factor on q.k; None for 1/sqrt(hd)."""

    @abstractmethod
    def rmsnorm_heads(self, x: Act, weight: Any, n_heads: int, eps: float) -> Act:
        """RMSNorm of each head's hd values of x [n, n_heads*hd], times weight [hd] (the
        per-head q/k norms of qwen3 and gemma3): [n, n_heads*hd]."""

    @abstractmethod
    def swiglu(self, gate: Act, up: Act) -> Act:
        """silu(gate) * up, both [n, d_ff]."""

    @abstractmethod
    def gelu_gate(self, gate: Act, up: Act) -> Act:
        """gelu_tanh(gate) * up, both [n, d_ff] (gemma3's FFN)."""

    @abstractmethod
    def scale(self, x: Act, s: float) -> Act:
        """x * s (gemma3's embedding scale; x may be updated in place and returned)."""

    @abstractmethod
    def add(self, x: Act, y: Act) -> Act:
        """x + y (x may be updated in place and returned)."""

    @abstractmethod
    def take_rows(self, x: Act, rows: slice) -> Act:
        """x[rows] for an [n, d] activation."""

    @abstractmethod
    def to_host(self, x: Act) -> np.ndarray:
        """x as a numpy array (while a decode step is being recorded: a placeholder, see the
        module docstring)."""

    @abstractmethod
    def copy_kv(self, src: KVCache, dst: KVCache, n_tokens: int) -> None:
        """Make dst hold src's keys and values of positions 0 .. n_tokens-1 in every layer (two
        sequences sharing a prompt prefix: n choices of one request, one system prompt)."""

    def concat_rows(self, parts: list[Act]) -> Act:
        """The rows of `parts` ([n_i, d] each) stacked: [sum n_i, d].  Only backends with
        max_batch > 1 need it."""
        raise NotImplementedError(f"the {self.name} backend decodes one sequence per step "
                                  "(max_batch 1): call Model.forward per sequence")

    # --- fused steps (defaults: the ops above; a device backend may run each as one kernel) --
    def norm_matmuls(self, x: Act, norm: Any, eps: float,
                     mats: Sequence[tuple[Any, Any | None]]) -> list[Act]:
        """h = rmsnorm(x, norm), then h @ w^T (+ b) for each (w, b) of `mats` (q, k, v of an
        attention block; the output matrix): one [n, out_i] per matrix."""
        h = self.rmsnorm(x, norm, eps)
        return [self.matmul(h, w, b) for w, b in mats]

    def norm_glu(self, x: Act, norm: Any, eps: float, w_gate: Any, w_up: Any, act: str) -> Act:
        """act(h Wgate^T) * (h Wup^T) with h = rmsnorm(x, norm); act "silu" or "gelu"
        (`swiglu` / `gelu_gate`): [n, d_ff]."""
        h = self.rmsnorm(x, norm, eps)
        gate_act = self.gelu_gate if act == "gelu" else self.swiglu
        return gate_act(self.matmul(h, w_gate), self.matmul(h, w_up))

    def matmul_add(self, x: Act, a: Act, weight: Any) -> Act:
        """x + a @ weight^T, the residual update (x may be updated in place and returned)."""
        return self.add(x, self.matmul(a, weight))

    def attend(self, q: Act, k: Act, v: Act, kv: KVCache, layer: int, start_pos: int,
               spec: LayerAttention) -> Act:
        """The attention of one sequence's n rows at start_pos..: per-head q/k norms (when the
        spec has them), rope of q and k, store k and v in `kv`, attention: [n, H*hd]."""
        if spec.q_norm is not None:
            q = self.rmsnorm_heads(q, spec.q_norm, spec.n_heads, spec.eps)
            k = self.rmsnorm_heads(k, spec.k_norm, spec.n_kv_heads, spec.eps)
        q = self.rope(q, start_pos, spec.n_heads, spec.rope)
        k = self.rope(k, start_pos, spec.n_kv_heads, spec.rope)
        return self.attention(q, k, v, kv, layer, start_pos, window=spec.window, scale=spec.scale)

    def attend_batch(self, q: Act, k: Act, v: Act, kvs: Sequence[KVCache], layer: int,
                     positions: Sequence[int], spec: LayerAttention) -> Act:
        """`attend` of B sequences, one row each: row b at positions[b] of kvs[b]: [B, H*hd].
        Default: one `attend` per row, stacked with `concat_rows`."""
        rows = [slice(b, b + 1) for b in range(len(positions))]
        return self.concat_rows([
            self.attend(self.take_rows(q, r), self.take_rows(k, r), self.take_rows(v, r), kv,
                        layer, pos, spec) for r, pos, kv in zip(rows, positions, kvs)])

    # --- whole steps and lifetime (defaults: nothing beyond the ops above) -------------
    def decode(self, model: Any, token: int, start_pos: int, kv: KVCache) -> np.ndarray:
        """Logits float[1, vocab] of `token` at `start_pos` of `kv` (a one-token decode step of
        `model`, a `Model` on this backend).  Default: `model.forward` itself; a device backend
        may replay a recorded step instead (the capture contract: module docstring)."""
        return model.forward(np.array([token]), start_pos, kv, all_logits=False)

    def decode_batch(self, model: Any, tokens: np.ndarray, positions: Sequence[int],
                     kvs: Sequence[KVCache]) -> np.ndarray:
        """Logits float[B, vocab] of one decode step of B sequences (`Model.forward_batch`);
        a device backend may replay a recorded batched step instead."""
        return model.forward_batch(tokens, list(positions), list(kvs))

    def decode_greedy(self, model: Any, token: int, start_pos: int, kv: KVCache) -> int:
        """The argmax token after `token` at `start_pos` (what `decode` then a greedy `Sampler`
        pick).  Default: `decode`'s logits as float32, as the sampler reads them, first index
        on ties; a device backend may compute it on the device and copy back only the id."""
        logits = np.asarray(self.decode(model, token, start_pos, kv)[-1], dtype=np.float32)
        return int(np.argmax(logits))

    def usage(self) -> str:
        """One line on the device memory the backend holds, for reports; "" when it holds none
        of its own (the CPU backend: its arrays are the process's)."""
        return ""

    def runtime_note(self) -> str:
        """What the backend changed of its own accord while running (e.g. decode no longer
        from CUDA graphs), for the engine's backend note; "" when nothing."""
        return ""

    def close(self) -> None:  # noqa: B027 - an optional hook: a host backend has nothing to free
        """Free what the backend holds on its device; it is unusable afterwards.  Default:
        nothing to free (host arrays go with their last reference)."""
