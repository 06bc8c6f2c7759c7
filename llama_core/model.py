"""The forward pass of every supported architecture (llama, qwen2, qwen3, gemma3, phi3),
backend-agnostic.

`Weights` (`ukgpu.llama_core.layers`) holds backend handles of the GGUF tensors (views of the
mapped file, never copies); `Model.forward` runs a batch of tokens of one sequence at
positions start_pos.. through every layer, reading the KV cache it is given and
writing the new keys and values into it.  Prefill (n tokens) and decode
(1 token) take the same path.

One block, with what each family adds (`ModelConfig.family`):

    x = embedding(tokens)  (* sqrt(d): gemma3)
    per layer:  h = rmsnorm(x, attn_norm)
                q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)      (the biases: qwen2)
                q, k = rmsnorm_heads(q), rmsnorm_heads(k)        (qwen3, gemma3)
                a = attention(rope(q), rope(k), v) Wo            (gemma3: a sliding window and
                                                                  their own rope on local layers)
                x = x + rmsnorm(a, post_attention_norm)          (the norm: gemma3)
                h = rmsnorm(x, ffn_norm)
                f = (silu | gelu_tanh)(h Wgate) * (h Wup) Wdown  (gelu: gemma3)
                x = x + rmsnorm(f, post_ffw_norm)                (the norm: gemma3)
    logits = rmsnorm(x, output_norm) Woutput

A device backend may record one-token `forward` calls and replay them per token (CUDA graphs), so
`forward` keeps the capture contract of `ukgpu.llama_core.backend`: the same backend calls and
shapes whatever the token and position, no host read but the final `to_host`, and nothing done
in Python that a later step would need repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ukgpu.llama_core.backend import Backend, KVCache, LayerAttention, check_decode_positions
from ukgpu.llama_core.errors import ContextOverflowError
from ukgpu.llama_core.gguf.file import GGUFFile, open_gguf
from ukgpu.llama_core.layers import RopeTable, Weights, rope_config

__all__ = ["ContextOverflowError", "Model", "Weights", "rope_config"]

Logits = Literal["all", "last", "none"]  # which logits one pass of `Model.forward` returns


class Model:
    """A GGUF llama-family model bound to one backend."""

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        self.gguf = gguf
        self.backend = backend
        self.config = gguf.config  # shapes were checked when the file was opened
        self.ropes = RopeTable(gguf)  # each layer's rope: `self.ropes.layer_rope(i, kv.n_ctx)`
        self.weights = Weights.from_gguf(gguf, backend)

    @classmethod
    def load(cls, model: str | Path, backend: Backend | None = None,
             dtype: npt.DTypeLike = np.float32) -> Model:
        """Open a model by name or path; `dtype` picks the CPU backend's precision."""
        from ukgpu.llama_core.cpu.backend import CpuBackend

        return cls(open_gguf(_resolve(str(model))), backend or CpuBackend(dtype=dtype))

    def has_generic_forward(self) -> bool:
        """Whether `forward` is this class's own (a backend may then replace a decode step with
        an equivalent compiled one; a subclass with its own forward keeps it)."""
        return type(self).forward is Model.forward

    def new_kv(self, n_ctx: int) -> KVCache:
        c = self.config
        return self.backend.alloc_kv(c.n_layers, n_ctx, c.n_kv_heads, c.head_dim)

    def forward(self, tokens: np.ndarray, start_pos: int, kv: KVCache,
                all_logits: bool = True) -> np.ndarray:
        """Logits float[n, vocab] for tokens int[n] at start_pos.. (float[1, vocab], the
        last position only, when all_logits is False).  A prompt longer than the backend's
        `max_prefill_rows` runs as consecutive passes of at most that many rows (each writes its
        keys and values, the next attends to them), so a device's activation memory is sized
        for one chunk, not for the context; the logits are those of one pass.  A one-token call
        may be recorded once and replayed by the backend (`Backend.decode`): keep the capture
        contract of `ukgpu.llama_core.backend` when changing this code."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        want: Logits = "all" if all_logits else "last"
        parts = [self._forward_rows(chunk, pos, kv, want if all_logits or last else "none")
                 for chunk, pos, last in self._chunks(tokens, start_pos, kv)]
        kept = [p for p in parts if p is not None]
        return kept[0] if len(kept) == 1 else np.concatenate(kept)

    def hidden_states(self, tokens: np.ndarray, start_pos: int, kv: KVCache) -> np.ndarray:
        """float[n, d]: the final hidden state of each token after the output norm (what the
        output matrix turns into logits), for embeddings.  Eager on every backend; chunked
        like `forward`."""
        c, w, be = self.config, self.weights, self.backend
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        return np.concatenate([
            np.asarray(be.to_host(be.rmsnorm(self._layers(chunk, pos, kv), w.output_norm, c.rms_eps)))
            for chunk, pos, _ in self._chunks(tokens, start_pos, kv)])

    def _chunks(self, tokens: np.ndarray, start_pos: int, kv: KVCache
                ) -> list[tuple[np.ndarray, int, bool]]:
        """(tokens, start position, is last) of each pass: one unless the backend bounds the
        rows of a pass (`Backend.max_prefill_rows`).  The whole prompt is checked against the
        cache first, so an overflow writes nothing."""
        if start_pos + len(tokens) > kv.n_ctx:
            raise ContextOverflowError(
                f"{start_pos + len(tokens)} tokens do not fit a {kv.n_ctx}-token KV cache; "
                "shorten the input or raise n_ctx")
        rows = self.backend.max_prefill_rows or max(len(tokens), 1)
        starts = range(0, max(len(tokens), 1), rows)
        return [(tokens[s:s + rows], start_pos + s, s + rows >= len(tokens)) for s in starts]

    def _forward_rows(self, tokens: np.ndarray, start_pos: int, kv: KVCache,
                      logits: Logits) -> np.ndarray | None:
        """One pass over tokens int[n]: logits float[n, vocab] ("all"), the last row's
        float[1, vocab] ("last"), or None ("none": a prompt chunk before the last, which only
        fills the cache)."""
        c, w, be = self.config, self.weights, self.backend
        x = self._layers(tokens, start_pos, kv)
        if logits == "none":
            return None
        if logits == "last":
            x = be.take_rows(x, slice(-1, None))  # [1, d]
        (logits,) = be.norm_matmuls(x, w.output_norm, c.rms_eps, [(w.output, None)])
        return be.to_host(logits)  # [n, vocab]

    def _layers(self, tokens: np.ndarray, start_pos: int, kv: KVCache) -> Any:
        """The residual stream [n, d] after every block, for tokens int[n] at start_pos.."""
        w, be = self.weights, self.backend
        x = self._embed(tokens)  # [n, d]
        for i, lw in enumerate(w.layers):
            spec = self.attention_spec(i, kv.n_ctx)

            def attend(q: Any, k: Any, v: Any, i: int = i, spec: LayerAttention = spec) -> Any:
                return be.attend(q, k, v, kv, i, start_pos, spec)  # [n, H*hd]
            x = self._block(x, lw, attend)
        return x

    def forward_batch(self, tokens: np.ndarray, positions: list[int], kvs: list[KVCache]) -> np.ndarray:
        """One decode step of B sequences: token b at position positions[b] of cache kvs[b].
        Logits float[B, vocab]; row b is what forward([tokens[b]], positions[b], kvs[b]) gives.
        The matrix products run once over all B rows (each weight is read once for the batch);
        attention through the backend's `attend_batch` (each row its own cache and position;
        the caches share one n_ctx).  Needs a backend with `max_batch` > 1."""
        c, w, be = self.config, self.weights, self.backend
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if not len(tokens) == len(positions) == len(kvs) or len(tokens) > be.max_batch:
            raise ValueError(f"forward_batch: {len(tokens)} tokens, {len(positions)} positions, "
                             f"{len(kvs)} caches; need equal counts of at most {be.max_batch}")
        if len({kv.n_ctx for kv in kvs}) > 1:
            raise ValueError("forward_batch: the KV caches of one batch must have one n_ctx")
        check_decode_positions(positions, kvs)
        x = self._embed(tokens)  # [B, d]
        for i, lw in enumerate(w.layers):
            spec = self.attention_spec(i, kvs[0].n_ctx)

            def attend(q: Any, k: Any, v: Any, i: int = i, spec: LayerAttention = spec) -> Any:
                return be.attend_batch(q, k, v, kvs, i, positions, spec)  # [B, H*hd]
            x = self._block(x, lw, attend)
        (logits,) = be.norm_matmuls(x, w.output_norm, c.rms_eps, [(w.output, None)])
        return be.to_host(logits)  # [B, vocab]

    def _embed(self, tokens: np.ndarray) -> Any:
        """The embedding rows of tokens int[n] (times sqrt(d) on gemma3): [n, d]."""
        x = self.backend.embedding(self.weights.token_embd, tokens)
        scale = self.config.embed_scale
        return x if scale == 1.0 else self.backend.scale(x, scale)

    def attention_spec(self, layer: int, n_ctx: int) -> LayerAttention:
        """Layer `layer`'s attention for a KV cache of n_ctx positions (its rope, window, scale
        and q/k norms)."""
        c, lw = self.config, self.weights.layers[layer]
        return LayerAttention(n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                              rope=self.ropes.layer_rope(layer, n_ctx), window=c.layer_window(layer),
                              scale=c.attn_scale, q_norm=lw.q_norm, k_norm=lw.k_norm, eps=c.rms_eps)

    def _block(self, x: Any, lw: Any, attend: Callable[[Any, Any, Any], Any]) -> Any:
        """One transformer block on x [n, d]; `attend(q, k, v)` places and attends.  Written in
        the backend's fused steps (norm + projections, projection + residual, norm + gated FFN),
        which a device backend runs as single kernels and the CPU as the plain ops."""
        c, be, eps = self.config, self.backend, self.config.rms_eps
        q, k, v = be.norm_matmuls(x, lw.attn_norm, eps, [(lw.wq, lw.bq), (lw.wk, lw.bk), (lw.wv, lw.bv)])
        a = attend(q, k, v)  # [n, H*hd]
        if lw.attn_post_norm is None:
            x = be.matmul_add(x, a, lw.wo)
        else:
            x = be.add(x, be.rmsnorm(be.matmul(a, lw.wo), lw.attn_post_norm, eps))
        f = be.norm_glu(x, lw.ffn_norm, eps, lw.w_gate, lw.w_up, c.family.ffn_act)  # [n, d_ff]
        if lw.ffn_post_norm is None:
            return be.matmul_add(x, f, lw.w_down)
        return be.add(x, be.rmsnorm(be.matmul(f, lw.w_down), lw.ffn_post_norm, eps))


def _resolve(name: str):
    """A model name or path -> its file (the registry, tqdm and friends load only for a name)."""
    from ukgpu.llama_core.models.registry import resolve_model

    return resolve_model(name)
