"""A whole one-token decode step in one compiled call: the CPU backend's `decode`.

The generic forward pass (`Model.forward`) drives a decode step through ~15 backend calls per
layer (SmolLM2: 455 a token), each a Python call, a numpy temporary or two and, for the
products, a numba dispatch.  At a few microseconds each that is milliseconds a token, a large
share of a small model's step.  `DecodePlan.step` runs the same step (same kernels, same float
arithmetic, same order) as one numba function over arrays gathered once per model:

    plan = DecodePlan.build(model, backend)   # None when the model needs the generic path
    logits = plan.step(token, start_pos, kv)  # float32[1, vocab]

What it covers: every family whose block is rmsnorm -> q, k, v (optional biases, optional
per-head q/k norms) -> rope -> causal attention -> o -> residual -> rmsnorm -> SwiGLU -> down ->
residual, with one rope for every layer (llama, llama 3, mistral, qwen2, qwen3, phi3), on matrices
with a numba kernel.  Anything else (gemma3's windows, post-norms and GELU, an F16 matrix, the
float64 reference mode) keeps the generic path: `build` says None and why (`why_not`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit
from numba.typed import List

from ukgpu.llama_core.cpu import int8_act, tiled
from ukgpu.llama_core.cpu import superblocks as sb
from ukgpu.llama_core.cpu.rope_attention import PARALLEL_MIN_WORK, _attend_heads, _attend_heads_par, swiglu_rows
from ukgpu.llama_core.cpu.rope_attention import rmsnorm_row as _rmsnorm

# Matrix kinds the step dispatches on (tiled: a `tiled.TilePack`; rows: raw GGUF rows).
_TILED_KIND = {T.Q4_0: 0, T.Q4_1: 1, T.Q5_0: 2, T.Q5_1: 3, T.Q8_0: 4}
_ROWS_KIND = {T.Q4_K: 5, T.Q5_K: 6, T.Q6_K: 7}
F32_KIND = 8
INT8_KIND = 9  # + int8_act.KINDS[qtype]: GGUF rows times activations rounded to 8 bits (aux: row bytes)
PER_LAYER = 7  # q, k, v, o, gate, up, down


@njit(cache=True)
def _matvec(kind, data, n_out, aux, x, y):  # pragma: no cover - compiled
    """y[1, n_out] = x[1, in] @ W.T for one matrix of the plan (aux: tile rows, or row bytes)."""
    if kind == 0:
        tiled.t_q4(data, n_out, aux, 18, x, y, False)
    elif kind == 1:
        tiled.t_q4(data, n_out, aux, 20, x, y, True)
    elif kind == 2:
        tiled.t_q5(data, n_out, aux, 22, x, y, False)
    elif kind == 3:
        tiled.t_q5(data, n_out, aux, 24, x, y, True)
    elif kind == 4:
        tiled.t_q8_0(data, n_out, aux, 34, x, y)
    elif kind == 5:
        sb.mv_q4_k(data.reshape((n_out, aux)), x, y)
    elif kind == 6:
        sb.mv_q5_k(data.reshape((n_out, aux)), x, y)
    elif kind == 7:
        sb.mv_q6_k(data.reshape((n_out, aux)), x, y)
    elif kind >= INT8_KIND:
        int8_act.mv_int8(kind - INT8_KIND, data, n_out, aux, x, y)
    else:
        w = data.view(np.float32).reshape((n_out, x.shape[1]))
        for r in range(n_out):
            acc = np.float32(0.0)
            for c in range(x.shape[1]):
                acc += w[r, c] * x[0, c]
            y[0, r] = acc


@njit(cache=True)
def _rope(x, n_heads, hd, pos, cos, sin, n_rot, neox):  # pragma: no cover - compiled
    half = n_rot // 2
    for h in range(n_heads):
        base = h * hd
        for j in range(half):
            a = base + j if neox else base + 2 * j
            b = a + half if neox else a + 1
            c, s = cos[pos, j], sin[pos, j]
            x0, x1 = x[a], x[b]
            x[a] = x0 * c - x1 * s
            x[b] = x0 * s + x1 * c


@njit(cache=True)
def _attend_rows(layer, q, k, v, biases, qk_norms, k_caches, v_caches, positions, cos, sin, ints, eps, scale,
                 att):  # pragma: no cover - compiled
    """Each row's attention in `layer`: biases, q/k norms, rope, cache write, then att[b]."""
    n_heads, n_kv, hd, n_rot, neox = ints[1], ints[2], ints[3], ints[4], ints[5] != 0
    qd, kvd = n_heads * hd, n_kv * hd
    for b in range(q.shape[0]):
        qb, kb, vb, pos = q[b], k[b], v[b], positions[b]
        if biases.shape[0]:
            for i in range(qd):
                qb[i] += biases[layer, i]
            for i in range(kvd):
                kb[i] += biases[layer, qd + i]
                vb[i] += biases[layer, qd + kvd + i]
        if qk_norms.shape[0]:
            for hh in range(n_heads):
                _rmsnorm(qb[hh * hd:(hh + 1) * hd], qk_norms[layer, 0], eps, qb[hh * hd:(hh + 1) * hd])
            for hh in range(n_kv):
                _rmsnorm(kb[hh * hd:(hh + 1) * hd], qk_norms[layer, 1], eps, kb[hh * hd:(hh + 1) * hd])
        _rope(qb, n_heads, hd, pos, cos, sin, n_rot, neox)
        _rope(kb, n_kv, hd, pos, cos, sin, n_rot, neox)
        kc, vc = k_caches[b][layer], v_caches[b][layer]
        for hh in range(n_kv):
            kc[hh, pos] = kb[hh * hd:(hh + 1) * hd]
            vc[hh, pos] = vb[hh * hd:(hh + 1) * hd]
        if qd * (pos + 1) >= PARALLEL_MIN_WORK:
            _attend_heads_par(qb, kc, vc, 0, pos + 1, scale, att[b])
        else:
            _attend_heads(qb, kc, vc, 0, pos + 1, scale, att[b])


@njit(cache=True)
def _step(x, mats, meta, norms, biases, qk_norms, k_caches, v_caches, positions, cos, sin, ints, eps, scale,
          logits):  # pragma: no cover - compiled
    """B tokens (one per sequence) through every layer, then the output norm and matrix, into
    logits[B, vocab]; each weight is read once for all B rows (the kernels take up to 4).

    x float32[B, d] (the tokens' embeddings; updated in place), mats/meta the matrices (meta row:
    kind, n_out, aux), norms [2 n_layers + 1, d], biases [n_layers, q + 2 kv] (empty: none),
    qk_norms [n_layers, 2, hd] (empty: none), k_caches/v_caches row b's cache [n_layers, Hkv,
    n_ctx, hd], positions[b] row b's position, ints = (n_layers, n_heads, n_kv_heads, head_dim,
    n_rot, neox)."""
    n_layers, n_heads, n_kv, hd = ints[0], ints[1], ints[2], ints[3]
    n, d = x.shape
    qd, kvd = n_heads * hd, n_kv * hd
    h = np.empty((n, d), np.float32)
    q = np.empty((n, qd), np.float32)
    k = np.empty((n, kvd), np.float32)
    v = np.empty((n, kvd), np.float32)
    att = np.empty((n, qd), np.float32)
    o = np.empty((n, d), np.float32)
    ffn = meta[4, 1]  # the FFN width: layer 0's gate rows
    g = np.empty((n, ffn), np.float32)
    u = np.empty((n, ffn), np.float32)
    for layer in range(n_layers):
        m0 = layer * PER_LAYER
        for b in range(n):
            _rmsnorm(x[b], norms[2 * layer], eps, h[b])
        _matvec(meta[m0, 0], mats[m0], meta[m0, 1], meta[m0, 2], h, q)
        _matvec(meta[m0 + 1, 0], mats[m0 + 1], meta[m0 + 1, 1], meta[m0 + 1, 2], h, k)
        _matvec(meta[m0 + 2, 0], mats[m0 + 2], meta[m0 + 2, 1], meta[m0 + 2, 2], h, v)
        _attend_rows(layer, q, k, v, biases, qk_norms, k_caches, v_caches, positions, cos, sin, ints, eps, scale,
                     att)
        _matvec(meta[m0 + 3, 0], mats[m0 + 3], meta[m0 + 3, 1], meta[m0 + 3, 2], att, o)
        for b in range(n):
            for i in range(d):
                x[b, i] += o[b, i]
            _rmsnorm(x[b], norms[2 * layer + 1], eps, h[b])
        _matvec(meta[m0 + 4, 0], mats[m0 + 4], meta[m0 + 4, 1], meta[m0 + 4, 2], h, g)
        _matvec(meta[m0 + 5, 0], mats[m0 + 5], meta[m0 + 5, 1], meta[m0 + 5, 2], h, u)
        swiglu_rows(g, u)
        _matvec(meta[m0 + 6, 0], mats[m0 + 6], meta[m0 + 6, 1], meta[m0 + 6, 2], g, o)
        for b in range(n):
            for i in range(d):
                x[b, i] += o[b, i]
    for b in range(n):
        _rmsnorm(x[b], norms[2 * n_layers], eps, h[b])
    last = n_layers * PER_LAYER
    _matvec(meta[last, 0], mats[last], meta[last, 1], meta[last, 2], h, logits)


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only flat view (the plan's matrices share one numba type: mapped rows are read-only)."""
    v = np.ascontiguousarray(a).reshape(-1).view()
    v.flags.writeable = False
    return v


def _matrix(w: Any, q8: bool) -> tuple[np.ndarray, tuple[int, int, int]] | str:
    """(flat bytes, (kind, n_out, aux)) of a CpuWeight, or why the step cannot take it (`q8`: the
    backend rounds activations to 8 bits, so matrices with an integer kernel take that)."""
    pw = w.kernel
    if pw is None:
        return "the float64 reference mode"
    n_out, n_in = pw.shape
    if q8 and pw.rows is not None and pw.qtype in int8_act.KINDS:
        return _readonly(pw.rows), (INT8_KIND + int8_act.KINDS[pw.qtype], n_out, pw.rows.shape[1])
    if pw.tiles is not None:
        return _readonly(pw.tiles.data), (_TILED_KIND[pw.qtype], n_out, pw.tiles.rt)
    if pw.qtype in _ROWS_KIND:
        return _readonly(pw.rows), (_ROWS_KIND[pw.qtype], n_out, pw.rows.shape[1])
    if pw.qtype == T.F32:
        return _readonly(pw.rows), (F32_KIND, n_out, n_in * 4)
    return f"a {pw.qtype.name} matrix"


def _dense(w: Any) -> np.ndarray:
    return np.ascontiguousarray(w.dense, dtype=np.float32)


@dataclass
class DecodePlan:
    """Everything `_step` reads, gathered once per model (views of the prepared weights)."""

    backend: Any
    model: Any
    mats: Any  # numba typed List of read-only uint8[:] (7 per layer, then the output matrix)
    meta: np.ndarray  # int64[n_mats, 3]: kind, n_out, aux
    norms: np.ndarray  # float32[2 n_layers + 1, d]
    biases: np.ndarray  # float32[n_layers, q + 2 kv] or [0, 0]
    qk_norms: np.ndarray  # float32[n_layers, 2, hd] or [0, 0, 0]
    ints: np.ndarray  # int64: n_layers, n_heads, n_kv_heads, head_dim, n_rot, neox
    eps: float
    scale: float

    @staticmethod
    def why_not(model: Any, backend: Any) -> str | None:
        """Why `model` needs the generic decode path on `backend`, or None when the step fits."""
        c = model.config
        if not backend.use_kernels or backend._ops is None:
            return "numba is off or the backend runs in float64"
        if c.family.post_norms or c.family.ffn_act != "silu" or c.embed_scale != 1.0:
            return f"the {c.arch} block (post-norms, GELU or an embedding scale)"
        if any(c.layer_window(i) for i in range(c.n_layers)):
            return "sliding-window layers"
        ropes = {model.ropes.layer_rope(i, 4096) for i in range(c.n_layers)}
        if len(ropes) > 1:
            return "layers with different ropes"
        return None

    @classmethod
    def build(cls, model: Any, backend: Any) -> DecodePlan | None:
        """The plan of `model`, or None when it needs the generic path."""
        if cls.why_not(model, backend) is not None:
            return None
        c, w = model.config, model.weights
        q8 = backend.activations == "q8"
        mats, meta = List(), []
        for lw in w.layers:
            for m in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down):
                got = _matrix(m, q8)
                if isinstance(got, str):
                    return None
                mats.append(got[0])
                meta.append(got[1])
        got = _matrix(w.output, q8)
        if isinstance(got, str):
            return None
        mats.append(got[0])
        meta.append(got[1])
        norms = np.stack([_dense(n) for lw in w.layers for n in (lw.attn_norm, lw.ffn_norm)]
                         + [_dense(w.output_norm)])
        l0 = w.layers[0]
        biases = np.stack([np.concatenate([_dense(lw.bq), _dense(lw.bk), _dense(lw.bv)]) for lw in w.layers]) \
            if l0.bq is not None else np.zeros((0, 0), np.float32)
        qk_norms = np.stack([np.stack([_dense(lw.q_norm), _dense(lw.k_norm)]) for lw in w.layers]) \
            if l0.q_norm is not None else np.zeros((0, 0, 0), np.float32)
        rope = model.ropes.layer_rope(0, 4096)
        ints = np.array([c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, rope.n_rot, int(rope.neox)], np.int64)
        scale = 1.0 / np.sqrt(c.head_dim) if c.attn_scale is None else c.attn_scale
        return cls(backend, model, mats, np.array(meta, np.int64), norms, biases, qk_norms, ints,
                   float(c.rms_eps), float(scale))

    def step(self, token: int, start_pos: int, kv: Any) -> np.ndarray:
        """Logits float32[1, vocab] of `token` at `start_pos`; writes the token's keys and values."""
        return self.step_batch(np.array([token]), [start_pos], [kv])

    def step_batch(self, tokens: np.ndarray, positions: Sequence[int], kvs: Sequence[Any]) -> np.ndarray:
        """Logits float32[B, vocab]: row b is `step(tokens[b], positions[b], kvs[b])`; the rows
        share each pass over the weights (B at most the kernels' MV_MAX_ROWS)."""
        be, model = self.backend, self.model
        rope = model.ropes.layer_rope(0, kvs[0].n_ctx)
        cos, sin = be._rope_table(rope, max(positions) + 1)
        x = np.ascontiguousarray(be.embedding(model.weights.token_embd, np.asarray(tokens, np.int64)), np.float32)
        k_caches, v_caches = List(), List()
        for kv in kvs:
            k_caches.append(kv.k)
            v_caches.append(kv.v)
        logits = np.empty((len(kvs), int(self.meta[-1, 1])), np.float32)
        _step(x, self.mats, self.meta, self.norms, self.biases, self.qk_norms, k_caches, v_caches,
              np.asarray(positions, np.int64), cos, sin, self.ints, np.float32(self.eps), np.float32(self.scale),
              logits)
        return logits


def compile_step() -> None:
    """Compile (or load from numba's cache) `_step` on a one-layer model of random Q8_0 blocks:
    the argument types, and thus the machine code, are those of every real plan."""
    from ukgpu.llama_core.cpu import matmul

    rng = np.random.default_rng(0)
    d, hd, n_heads, n_kv, ffn, vocab = 64, 32, 2, 1, 64, 32
    shapes = [(n_heads * hd, d), (n_kv * hd, d), (n_kv * hd, d), (d, n_heads * hd), (ffn, d), (ffn, d), (d, ffn),
              (vocab, d)]
    mats, meta = List(), []
    for n_out, n_in in shapes:
        pw = matmul.prepare(matmul.RawWeight(T.Q8_0, (n_out, n_in), matmul.random_blocks(T.Q8_0, n_out, n_in, rng)))
        mats.append(_readonly(pw.tiles.data))
        meta.append((_TILED_KIND[T.Q8_0], n_out, pw.tiles.rt))
    k_caches, v_caches = List(), List()
    k_caches.append(np.zeros((1, n_kv, 4, hd), np.float32))
    v_caches.append(np.zeros((1, n_kv, 4, hd), np.float32))
    angles = np.outer(np.arange(4, dtype=np.float64), 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    logits = np.empty((1, vocab), np.float32)
    _step(rng.standard_normal((1, d)).astype(np.float32), mats, np.array(meta, np.int64), np.ones((3, d), np.float32),
          np.zeros((0, 0), np.float32), np.zeros((0, 0, 0), np.float32), k_caches, v_caches, np.zeros(1, np.int64),
          cos, sin,
          np.array([1, n_heads, n_kv, hd, hd, 0], np.int64), np.float32(1e-6), np.float32(hd ** -0.5), logits)
