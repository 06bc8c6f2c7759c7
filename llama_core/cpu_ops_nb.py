"""The CPU backend's two compiled loops: rope over rows and single-query attention.

Imported only when numba is usable (`cpu_backend` has numpy versions of both).
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
def attend_one(q, keys, values, end, scale, out):  # pragma: no cover - compiled
    """One query row: q [H*hd] over keys/values [Hkv, n_ctx, hd] up to `end` -> out [H*hd]."""
    n_kv, _, hd = keys.shape
    n_heads = q.shape[0] // hd
    group = n_heads // n_kv
    scores = np.empty(end, dtype=q.dtype)
    for h in range(n_heads):
        g = h // group
        top = -np.inf
        for t in range(end):
            acc = q.dtype.type(0.0)
            for d in range(hd):
                acc += q[h * hd + d] * keys[g, t, d]
            scores[t] = acc * scale
            top = max(top, scores[t])
        total = q.dtype.type(0.0)
        for t in range(end):
            scores[t] = np.exp(scores[t] - top)
            total += scores[t]
        for d in range(hd):
            out[h * hd + d] = 0.0
        for t in range(end):
            p = scores[t] / total
            for d in range(hd):
                out[h * hd + d] += p * values[g, t, d]
