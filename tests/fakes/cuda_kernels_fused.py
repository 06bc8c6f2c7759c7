"""numpy emulation of the fused decode attention (`attn_decode_rope_*`, ptx_kernels/attention_fused.py)
and the two-launch argmax (`argmax_part_f32`, `argmax_reduce_f32`, ptx_kernels/argmax.py) for the
stand-in driver.  Fused attention: per-head norms, rope at pos, k and v rounded to float16 and
stored at (slot, pos), then the split-K partials of `cuda_kernels.attn_decode` over the cache
(which now holds the f16 new row, as the kernel's registers do)."""

from __future__ import annotations

import numpy as np

from ukgpu.ptx_kernels import reference as ref

from .cuda_kernels import EmulationError, Mem

GROUP_PAD = 8
MAX_SPLITS = 32


def _check(e: dict, a: dict, grid: tuple, pos: np.ndarray, slots: np.ndarray, lens: np.ndarray) -> None:
    hq, hkv, n_ctx, n_rot = a["Hq"], a["Hkv"], a["n_ctx"], a["n_rot"]
    d, name = e["constexprs"]["HEAD_DIM"], e["name"]
    if hkv < 1 or hq % hkv or grid[1] != hkv * -(-(hq // hkv) // GROUP_PAD):
        raise EmulationError(f"{name}: grid {grid} does not fit Hq={hq}, Hkv={hkv}")
    if not 1 <= grid[2] <= MAX_SPLITS or grid[2] * a["chunk"] < n_ctx or a["chunk"] % 64:
        raise EmulationError(f"{name}: S={grid[2]}, chunk={a['chunk']} do not cover n_ctx={n_ctx}")
    if n_rot % 2 or not 2 <= n_rot <= d or a["window"] < 0:
        raise EmulationError(f"{name}: n_rot={n_rot} or window={a['window']} break its limits")
    for i in range(grid[0]):
        if not 0 <= pos[i] < n_ctx or lens[i] != pos[i] + 1 or slots[i] < 0:
            raise EmulationError(f"{name}: row {i}: pos={pos[i]}, lens={lens[i]}, slot={slots[i]} "
                                 f"(need 0 <= pos < n_ctx={n_ctx}, lens = pos + 1, slot >= 0)")


def _partials(q: np.ndarray, k: np.ndarray, v: np.ndarray, n: int, window: int, chunk: int,
              part: np.ndarray, ml: np.ndarray) -> None:
    """One row: q (Hq, D) scaled, k/v (n, Hkv, D) -> part (Hq, S, D), ml (Hq, S, 2) as attn_decode."""
    group = q.shape[0] // k.shape[1]
    first = max(0, n - window) if window > 0 else 0
    for sp in range(part.shape[1]):
        lo, hi = max(first, sp * chunk), min(n, (sp + 1) * chunk)
        if lo >= hi:
            part[:, sp], ml[:, sp, 0], ml[:, sp, 1] = 0, -np.inf, 0
            continue
        kh = np.repeat(k[lo:hi].astype(np.float64), group, axis=1)  # (keys, Hq, D)
        vh = np.repeat(v[lo:hi].astype(np.float64), group, axis=1)
        s = np.einsum("hd,thd->ht", q, kh)
        m = s.max(-1)
        p = np.exp(s - m[:, None])
        part[:, sp] = np.einsum("ht,thd->hd", p, vh)
        ml[:, sp, 0], ml[:, sp, 1] = m, p.sum(-1)


def attn_decode_rope(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    d = e["constexprs"]["HEAD_DIM"]
    b, n_split, hq, hkv, n_ctx = grid[0], grid[2], a["Hq"], a["Hkv"], a["n_ctx"]
    pos, slots, lens = (mem.view(a[p], np.int32, b).copy() for p in ("pos", "slots", "lens"))
    _check(e, a, grid, pos, slots, lens)
    q = mem.view(a["q"], np.float32, b * hq * d).reshape(b, hq, d)
    k = mem.view(a["k"], np.float32, b * hkv * d).reshape(b, hkv, d)
    v = mem.view(a["v"], np.float32, b * hkv * d).reshape(b, hkv, d)
    norms = (mem.view(a["q_norm"], np.float32, d), mem.view(a["k_norm"], np.float32, d)) \
        if a["has_norm"] else (None, None)
    freqs = mem.view(a["freqs"], np.float64, a["n_rot"] // 2).copy()
    rq, rk, _ = ref.rope_kv(q, k, v, pos, freqs, bool(e["constexprs"]["NEOX"]), a["n_rot"],
                            a["mscale"], *norms, eps=a["eps"])
    rq = rq.astype(np.float32).astype(np.float64) * np.float32(a["scale"])
    part = mem.view(a["part_out"], np.float32, b * hq * n_split * d).reshape(b, hq, n_split, d)
    ml = mem.view(a["part_ml"], np.float32, b * hq * n_split * 2).reshape(b, hq, n_split, 2)
    for i in range(b):
        at = n_ctx * hkv * d * 2 * int(slots[i])  # bytes to the slot's first row
        kc = mem.view(a["k_cache"] + at, np.float16, n_ctx * hkv * d).reshape(n_ctx, hkv, d)
        vc = mem.view(a["v_cache"] + at, np.float16, n_ctx * hkv * d).reshape(n_ctx, hkv, d)
        kc[pos[i]] = rk[i].astype(np.float32).astype(np.float16)
        vc[pos[i]] = v[i].astype(np.float16)
        _partials(rq[i], kc, vc, int(lens[i]), a["window"], a["chunk"], part[i], ml[i])


def argmax_part(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    b, n_parts, v, span = grid[0], grid[1], a["V"], a["span"]
    if span < 1 or span % 1024 or n_parts != -(-v // span):
        raise EmulationError(f"{e['name']}: grid {grid} is not cdiv(V={v}, span={span}) parts")
    logits = mem.view(a["logits"], np.float32, b * v).reshape(b, v)
    vals = mem.view(a["part_val"], np.float32, b * n_parts).reshape(b, n_parts)
    idx = mem.view(a["part_idx"], np.int32, b * n_parts).reshape(b, n_parts)
    for p in range(n_parts):
        cols = logits[:, p * span:(p + 1) * span]
        first = ref.argmax(cols)
        idx[:, p] = p * span + first
        vals[:, p] = cols[np.arange(b), first]


def argmax_reduce(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    b, n_parts = grid[0], a["P"]
    vals = mem.view(a["part_val"], np.float32, b * n_parts).reshape(b, n_parts)
    idx = mem.view(a["part_idx"], np.int32, b * n_parts).reshape(b, n_parts)
    mem.view(a["out"], np.int32, b)[:] = idx[np.arange(b), ref.argmax(vals)]


EMULATORS = {"attn_decode_rope": attn_decode_rope, "argmax_part": argmax_part,
             "argmax_reduce": argmax_reduce}
