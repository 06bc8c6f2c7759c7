"""numpy references for every kernel family (float64 math unless stated), plus random test data.

Each kernel file points at its reference here; the interpreter tests (tests/unit/ptx) and the GPU
tests (tests/gpu/test_ptx_gpu.py) compare the kernels against these functions.
"""

from __future__ import annotations

import numpy as np

from ukgpu.llama_core.gguf.blocks import BLOCKS

from .repack import FORMATS, Repacked, dequantize_repacked, get_format, repack


def random_weight(qtype: str, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw GGUF bytes of an (n_rows, n_cols) weight: every quant bit pattern, sane scales."""
    fmt = get_format(qtype)
    if fmt.block_elems == 1:  # F16, F32, BF16 (the top half of a float32)
        vals = rng.standard_normal((n_rows, n_cols)).astype(np.float16 if qtype == "F16" else np.float32)
        if qtype == "BF16":
            vals = (vals.view(np.uint32) >> 16).astype(np.uint16)
        return vals.view(np.uint8).reshape(-1)
    nb = n_rows * n_cols // fmt.block_elems
    raw = rng.integers(0, 256, (nb, fmt.block_bytes), dtype=np.uint8)
    for field in BLOCKS[fmt.qtype].f16_scales:
        scale = (rng.uniform(0.2, 1.0, nb) * 2.0 ** rng.integers(-9, -5, nb)).astype(np.float16)
        raw[:, field.offset : field.offset + 2] = scale.view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


def random_repacked(qtype: str, n_rows: int, n_cols: int, rng: np.random.Generator) -> Repacked:
    return repack(random_weight(qtype, n_rows, n_cols, rng), qtype, n_rows, n_cols)


QTYPES = tuple(FORMATS)


def matvec(w: Repacked, x: np.ndarray) -> np.ndarray:
    """x (B, K) -> y (B, N) = x @ W.T  (also the reference of the prefill GEMM)."""
    return (x.astype(np.float64) @ dequantize_repacked(w).astype(np.float64).T)


def embedding(w: Repacked, ids: np.ndarray) -> np.ndarray:
    """ids (T,) -> (T, K) float32 rows of the dequantized table."""
    return dequantize_repacked(w)[ids]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (M, D), weight (D,) -> (M, D)"""
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, pos: np.ndarray, base: float, neox: bool, *, freqs: np.ndarray | None = None,
         n_rot: int | None = None, mscale: float = 1.0) -> np.ndarray:
    """x (T, H, D), pos (T,) -> rotated (T, H, D): the first n_rot (default D) dims of each head
    rotate, NORM by pairs (2i, 2i+1), NEOX by (i, i+n_rot/2); the rest are copied.  The angle of
    pair i is pos * freqs[i] (default base^(-2i/n_rot)); cos and sin are scaled by mscale."""
    t, h, d = x.shape
    n_rot = d if n_rot is None else n_rot
    inv = (base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot) if freqs is None
           else np.asarray(freqs, np.float64))  # (n_rot/2,)
    ang = pos.astype(np.float64)[:, None, None] * inv  # (T, 1, n_rot/2)
    cos, sin = np.cos(ang) * mscale, np.sin(ang) * mscale
    x = x.astype(np.float64)
    r = x[..., :n_rot]
    half = n_rot // 2
    a, b = (r[..., :half], r[..., half:]) if neox else (r[..., 0::2], r[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = x.copy()
    if neox:
        out[..., :half], out[..., half:n_rot] = ra, rb
    else:
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = ra, rb
    return out


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float,
              window: int = 0) -> np.ndarray:
    """Causal GQA attention of queries at positions q_pos over keys 0..S-1.

    q (T, Hq, D), k/v (S, Hkv, D) -> (T, Hq, D); query t sees keys 0..q_pos[t], and with
    window > 0 only the last `window` of them: q_pos[t] - window < j <= q_pos[t].
    """
    t, hq, d = q.shape
    s_len, hkv, _ = k.shape
    grp = hq // hkv
    out = np.zeros((t, hq, d))
    j = np.arange(s_len)[None, :]
    hidden = j > q_pos[:, None]
    if window > 0:
        hidden |= j <= q_pos[:, None] - window
    for h in range(hq):
        kh, vh = k[:, h // grp].astype(np.float64), v[:, h // grp].astype(np.float64)  # (S, D)
        scores = q[:, h].astype(np.float64) @ kh.T * scale  # (T, S)
        scores[hidden] = -np.inf
        out[:, h] = _softmax_rows(scores) @ vh
    return out


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    return g / (1.0 + np.exp(-g)) * up


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu_tanh(gate) * up: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * up."""
    g = gate.astype(np.float64)
    return 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3))) * up


def scale(x: np.ndarray, s: float) -> np.ndarray:
    return x.astype(np.float64) * s


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) + b


def add_bias(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x (M, N), bias (N,) -> x + bias"""
    return x.astype(np.float64) + bias


def argmax(logits: np.ndarray) -> np.ndarray:
    """(B, V) -> (B,) int32, first index of the maximum."""
    return logits.argmax(-1).astype(np.int32)


def store_rows(dst: np.ndarray, src: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """dst (R, W) float16, src (T, W) float32, rows (T,) -> dst with dst[rows[t]] = src[t]."""
    out = dst.copy()
    out[rows] = src.astype(np.float16)
    return out


def matvec_norm(w: Repacked, x: np.ndarray, g: np.ndarray, eps: float,
                bias: np.ndarray | None = None) -> np.ndarray:
    """rmsnorm(x (B, K), g) @ W.T (+ bias): the fused `matvec_norm` entries."""
    y = matvec(w, rmsnorm(x, g, eps))
    return y if bias is None else y + bias


def matvec_glu(w_gate: Repacked, w_up: Repacked, x: np.ndarray, g: np.ndarray, eps: float,
               act: int) -> np.ndarray:
    """act(h @ Wg.T) * (h @ Wu.T), h = rmsnorm(x, g); act 0 = SiLU, 1 = GELU-tanh."""
    h = rmsnorm(x, g, eps)
    return (geglu if act else swiglu)(matvec(w_gate, h), matvec(w_up, h))


def matvec_add(w: Repacked, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y + x @ W.T: the fused residual update."""
    return y.astype(np.float64) + matvec(w, x)


def matvec_qkv(ws: list[Repacked], x: np.ndarray, g: np.ndarray, eps: float,
               biases: list[np.ndarray | None]) -> list[np.ndarray]:
    """rmsnorm(x, g) @ W_i.T (+ bias_i) for each weight: the fused `matvec_qkv` entries."""
    return [matvec_norm(w, x, g, eps, b) for w, b in zip(ws, biases)]


def rope_kv(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, freqs: np.ndarray,
            neox: bool, n_rot: int, mscale: float, q_norm: np.ndarray | None = None,
            k_norm: np.ndarray | None = None, eps: float = 1e-6) -> tuple[np.ndarray, ...]:
    """q (T, Hq, hd), k, v (T, Hkv, hd) -> (q rotated, k rotated, v): the per-head norms (when
    given) then rope at pos; the kernel then stores k and v as float16 cache rows."""
    if q_norm is not None:
        q, k = rmsnorm(q, q_norm, eps), rmsnorm(k, k_norm, eps)
    return (rope(q, pos, 0.0, neox, freqs=freqs, n_rot=n_rot, mscale=mscale),
            rope(k, pos, 0.0, neox, freqs=freqs, n_rot=n_rot, mscale=mscale), v)
