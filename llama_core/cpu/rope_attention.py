"""The CPU backend's compiled loops: rope over rows, single-query attention, and the row-wise
rmsnorm and SwiGLU of decode steps (shared by `CpuBackend` and `decode_step`, so both paths
compute the same bits: with activations rounded to 8 bits a last-bit difference can flip a code).

Imported only when numba is usable (`cpu_backend` has numpy versions of both).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def rope_rows(x, n_heads, start_pos, cos, sin, n_rot, neox):  # pragma: no cover - compiled
    """Rotate x [n, n_heads*hd] in place; pairs (j, j+n_rot/2) if neox else (2j, 2j+1)."""
    n, width = x.shape
    hd, half = width // n_heads, n_rot // 2
    for i in range(n):
        for h in range(n_heads):
            base = h * hd
            for j in range(half):
                a = base + j if neox else base + 2 * j
                b = a + half if neox else a + 1
                c, s = cos[start_pos + i, j], sin[start_pos + i, j]
                x0, x1 = x[i, a], x[i, b]
                x[i, a] = x0 * c - x1 * s
                x[i, b] = x0 * s + x1 * c


@njit(cache=True)
def rmsnorm_row(x, w, eps, out):  # pragma: no cover - compiled
    """out = x / sqrt(mean(x^2) + eps) * w, the mean square summed in float64."""
    ss = 0.0
    for i in range(x.shape[0]):
        ss += np.float64(x[i]) * np.float64(x[i])
    ms = np.float32(ss / x.shape[0])
    scale = np.float32(1.0) / np.sqrt(ms + np.float32(eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * scale * w[i]


@njit(cache=True)
def rmsnorm_rows(x, w, eps, out):  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        rmsnorm_row(x[r], w, eps, out[r])


@njit(cache=True)
def swiglu_rows(g, u):  # pragma: no cover - compiled
    """g = silu(g) * u in place, row by row (g, u float32[n, ffn])."""
    for b in range(g.shape[0]):
        for i in range(g.shape[1]):
            gi = g[b, i]
            g[b, i] = gi / (np.float32(1.0) + np.exp(-gi)) * u[b, i]


# Reassociation lets LLVM vectorize the dot products and sums; no flag that assumes away
# infinities (the running maximum starts at -inf).
_FAST = {"reassoc", "contract", "arcp"}
PARALLEL_MIN_WORK = 1 << 15  # heads * keys * head_dim below which threads cost more than they save


def attend_one(q, keys, values, end, scale, out, first=0):
    """One query row: q [H*hd] over keys/values [Hkv, n_ctx, hd] at positions first .. end-1
    (first > 0: a sliding window) -> out [H*hd]; the heads run on numba's threads once the
    work pays for them."""
    work = q.shape[0] * (end - first)
    (_attend_heads_par if work >= PARALLEL_MIN_WORK else _attend_heads)(q, keys, values, first, end, scale, out)


@njit(inline="always")
def _attend_head(q, keys, values, first, end, scale, out, h, group, hd):  # pragma: no cover - compiled
    g = h // group
    qh = q[h * hd:(h + 1) * hd]
    scores = np.zeros(end, dtype=q.dtype)
    top = -np.inf
    for t in range(first, end):
        kt = keys[g, t]
        acc = q.dtype.type(0.0)
        for d in range(hd):
            acc += qh[d] * kt[d]
        scores[t] = acc * scale
        top = max(top, scores[t])
    total = q.dtype.type(0.0)
    for t in range(first, end):
        scores[t] = np.exp(scores[t] - top)
        total += scores[t]
    acc_out = np.zeros(hd, dtype=q.dtype)
    for t in range(first, end):
        p = scores[t] / total
        vt = values[g, t]
        for d in range(hd):
            acc_out[d] += p * vt[d]
    out[h * hd:(h + 1) * hd] = acc_out


@njit(cache=True, fastmath=_FAST)
def _attend_heads(q, keys, values, first, end, scale, out):  # pragma: no cover - compiled
    hd = keys.shape[2]
    n_heads = q.shape[0] // hd
    for h in range(n_heads):
        _attend_head(q, keys, values, first, end, scale, out, h, n_heads // keys.shape[0], hd)


@njit(cache=True, fastmath=_FAST, parallel=True)
def _attend_heads_par(q, keys, values, first, end, scale, out):  # pragma: no cover - compiled
    hd = keys.shape[2]
    n_heads = q.shape[0] // hd
    for h in prange(n_heads):
        _attend_head(q, keys, values, first, end, scale, out, h, n_heads // keys.shape[0], hd)
