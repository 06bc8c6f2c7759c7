"""numpy emulation of every manifest kernel, for `cuda_driver.FakeDriver`.

Numerics follow the PTX sources: the prefill GEMM (ptx_kernels/gemm.py) rounds x (each row's
K tile scaled by a power of two first when it reaches 2^15) and the dequantized W tile to
float16 and accumulates in float32 (tensor cores); prefill attention
(ptx_kernels/attention.py) rounds q*scale and the softmax weights p to float16, reads the f16 KV
cache and runs the same block-wise online softmax (BLOCK_N keys a step, float32 running max, sum
and accumulator); the decode mat-vec, decode attention and the elementwise kernels compute in
float32 as their sources do.  So an operand past float16's 65504 becomes inf (then NaN) here as
on hardware: q*scale in prefill attention, x in a GEMM built without the scaling.  Summation
order inside a dot differs from the tensor cores (float32 rounding level only).

Each emulator reads its arguments (by manifest parameter name) and the launch grid, computes the
kernel's result with the references of `ptx_kernels.reference` in host memory that stands for
device memory, and writes it where the real kernel would.  It checks the layout contracts a real
kernel silently assumes (sizes, positions inside the cache), so a backend that packs arguments
wrongly fails here rather than producing plausible numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ukgpu.ptx_kernels import reference as ref
from ukgpu.ptx_kernels.repack import FORMATS, Repacked, dequantize_repacked

Mem = Any  # FakeDriver: .view(ptr, dtype, count) -> writable numpy view


class EmulationError(Exception):
    """A launch whose arguments a real kernel would misread (becomes CUDA_ERROR_ILLEGAL_ADDRESS)."""


class MisalignedAccess(EmulationError):
    """An access off its alignment (becomes CUDA_ERROR_MISALIGNED_ADDRESS)."""


def _planes(mem: Mem, a: dict, qtype: str, rows: int, k: int) -> Repacked:
    """The device planes of a launch's (rows, k) weight, as repack.LAYOUTS lays them out."""
    views = {p: mem.view(a[f"w_{p}"], spec.dtype, rows * spec.per_row(k)).reshape(rows, -1)
             for p, spec in FORMATS[qtype].planes.items()}
    return Repacked(qtype, rows, k, views["q"], views.get("s"), views.get("m"))


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 (cvt.rn.f16.f32: past 65504 is inf) and back to float32."""
    return x.astype(np.float16).astype(np.float32)


def _weight(mem: Mem, a: dict, qtype: str, n: int, k: int, f16: bool = False) -> np.ndarray:
    """float32 (N, K) (`f16`: each element rounded to float16 first), cached until a copy writes
    into the planes' address range."""
    planes = [a[p] for p in ("w_q", "w_s", "w_m") if a.get(p)]
    key = (min(planes), max(planes) + 1, qtype, n, k)  # (start, end) first: see FakeDriver._written
    if key not in mem.weight_cache:
        mem.weight_cache[key] = dequantize_repacked(_planes(mem, a, qtype, n, k))
    if not f16:
        return mem.weight_cache[key]
    key16 = key + ("f16",)
    if key16 not in mem.weight_cache:
        mem.weight_cache[key16] = _f16(mem.weight_cache[key])
    return mem.weight_cache[key16]


def _gemm_f16(x: np.ndarray, w16: np.ndarray, shift: int | None, block_k: int) -> np.ndarray:
    """gemm_kernel's K loop: x (M, K) f32 and w16 (N, K) (f16 values) -> (M, N) f32.  Each row's
    BLOCK_K tile of x whose max |x| has biased f32 exponent E > shift is scaled by 2^-(E-shift)
    before the f16 cast, the accumulator alongside (acc = dot(x 2^-e, W, acc 2^-e) 2^e).  An
    entry without X_EXP_SHIFT (a build before the scaling) casts x to f16 as it is."""
    if shift is None or np.abs(x).max(initial=0) < np.float32(2.0 ** (shift - 126)):
        return _f16(x) @ w16.T  # no tile reaches 2^15: every scale is 1
    acc = np.zeros((x.shape[0], w16.shape[0]), np.float32)
    for k0 in range(0, x.shape[1], block_k):
        xt = x[:, k0:k0 + block_k]
        amax = np.abs(xt).max(axis=1).astype(np.float32).view(np.int32)
        e = np.maximum(((amax >> 23) & 255) - shift, 0)
        down = ((127 - e) << 23).astype(np.int32).view(np.float32)[:, None]  # 2^-e
        up = ((127 + e) << 23).astype(np.int32).view(np.float32)[:, None]  # 2^e
        acc = (acc * down + _f16(xt * down) @ w16[:, k0:k0 + block_k].T) * up
    return acc


def matmul(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    """matvec: fp32 products and sums.  gemm: x (scaled per tile, see `_gemm_f16`) and the
    dequantized W tile rounded to f16, fp32 accumulation (`tl.dot(x.to(f16), w.to(f16), acc)`)."""
    rows = a["B"] if "B" in a else a["M"]
    if e["family"] == "matvec" and not 1 <= rows <= 8:
        raise EmulationError(f"{e['name']}: B={rows} outside 1..8")
    n, k = a["N"], a["K"]
    x = mem.view(a["x"], np.float32, rows * k).reshape(rows, k)
    if e["family"] == "gemm":
        c = e["constexprs"]
        y = _gemm_f16(x, _weight(mem, a, e["qtype"], n, k, f16=True), c.get("X_EXP_SHIFT"), c["BLOCK_K"])
    else:
        y = x @ _weight(mem, a, e["qtype"], n, k).T
    mem.view(a["y"], np.float32, rows * n)[:] = y.reshape(-1)


def embedding(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    t, k = grid[0], a["K"]
    ids = mem.view(a["ids"], np.int32, t).astype(np.int64)
    table = _planes(mem, a, e["qtype"], int(ids.max()) + 1, k)
    sub = Repacked(table.qtype, t, k, table.q[ids],
                   None if table.s is None else table.s[ids], None if table.m is None else table.m[ids])
    mem.view(a["out"], np.float32, t * k)[:] = dequantize_repacked(sub).reshape(-1)


def rmsnorm(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    m, d = grid[0], a["D"]
    x = mem.view(a["x"], np.float32, m * d).reshape(m, d)
    w = mem.view(a["weight"], np.float32, d)
    mem.view(a["y"], np.float32, m * d)[:] = ref.rmsnorm(x, w, a["eps"]).reshape(-1)


def rope(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    t, h = grid[0], grid[1]
    hd, n_rot = a["head_dim"], a["n_rot"]
    if not 2 <= n_rot <= min(hd, 2 * e["constexprs"]["HALF"]):
        raise EmulationError(f"{e['name']}: n_rot={n_rot} outside 2..min(head_dim, entry size)")
    sx, sy = a["stride_x"], a["stride_y"]
    x = mem.view(a["x"], np.float32, (t - 1) * sx + h * hd)
    rows = np.stack([x[i * sx:i * sx + h * hd] for i in range(t)]).reshape(t, h, hd)
    pos = mem.view(a["pos"], np.int32, t).copy()
    freqs = mem.view(a["freqs"], np.float64, n_rot // 2).copy()
    out = ref.rope(rows, pos, 0.0, bool(e["constexprs"]["NEOX"]), freqs=freqs, n_rot=n_rot,
                   mscale=a["mscale"])
    y = mem.view(a["y"], np.float32, (t - 1) * sy + h * hd)
    for i in range(t):
        y[i * sy:i * sy + h * hd] = out[i].reshape(-1)


def attn_prefill(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    """attn_prefill_kernel step by step: per (BLOCK_M queries, head) program, key blocks of
    BLOCK_N from the window's first block to its last query; q*scale and p rounded to f16."""
    c = e["constexprs"]
    d, bm, bn = c["HEAD_DIM"], c["BLOCK_M"], c["BLOCK_N"]
    t, start, hq, hkv, window = a["T"], a["start"], a["Hq"], a["Hkv"], a["window"]
    s = start + t
    q = mem.view(a["q"], np.float32, t * hq * d).reshape(t, hq, d)
    k = mem.view(a["k_cache"], np.float16, s * hkv * d).reshape(s, hkv, d).astype(np.float32)
    v = mem.view(a["v_cache"], np.float16, s * hkv * d).reshape(s, hkv, d).astype(np.float32)
    kh = np.repeat(k, hq // hkv, axis=1).transpose(1, 0, 2)  # (Hq, S, D)
    vh = np.repeat(v, hq // hkv, axis=1).transpose(1, 0, 2)
    qs = _f16(q * np.float32(a["scale"])).transpose(1, 0, 2)  # (Hq, T, D)
    out = mem.view(a["out"], np.float32, t * hq * d).reshape(t, hq, d)
    for m0 in range(0, t, bm):
        rows = np.arange(m0, min(t, m0 + bm))
        q_pos = start + rows
        n_keys = start + min(t, m0 + bm)
        lo = max(start + m0 - window + 1, 0) if window > 0 else 0
        lo_q = q_pos - window if window > 0 else np.full_like(q_pos, -1)
        m_i = np.full((hq, len(rows)), -np.inf, np.float32)
        l_i = np.zeros((hq, len(rows)), np.float32)
        acc = np.zeros((hq, len(rows), d), np.float32)
        for n0 in range(lo // bn * bn, n_keys, bn):
            rn = np.arange(n0, min(n0 + bn, n_keys))
            sc = np.einsum("hmd,hnd->hmn", qs[:, rows], kh[:, rn])  # f16 x f16 -> f32
            seen = (rn[None, :] <= q_pos[:, None]) & (rn[None, :] > lo_q[:, None])
            sc = np.where(seen[None], sc, np.float32(-np.inf))
            m_new = np.maximum(m_i, sc.max(-1))
            m_ref = np.where(m_new == -np.inf, np.float32(0), m_new)
            p = np.exp(sc - m_ref[..., None])
            alpha = np.exp(m_i - m_ref)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + np.einsum("hmn,hnd->hmd", _f16(p), vh[:, rn])
            m_i = m_new
        out[rows] = (acc / l_i[..., None]).transpose(1, 0, 2)


def attn_decode(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    """Split sp of row b: unnormalized (acc, max, sum) over keys [sp*chunk, min(lens, (sp+1)*chunk))."""
    d = e["constexprs"]["HEAD_DIM"]
    b, hq, n_split = grid[0], a["Hq"], grid[2]
    hkv, n_ctx, chunk, window = a["Hkv"], a["n_ctx"], a["chunk"], a["window"]
    slots, lens = mem.view(a["slots"], np.int32, b), mem.view(a["lens"], np.int32, b)
    q = mem.view(a["q"], np.float32, b * hq * d).reshape(b, hq, d).astype(np.float64) * a["scale"]
    part = mem.view(a["part_out"], np.float32, b * hq * n_split * d).reshape(b, hq, n_split, d)
    ml = mem.view(a["part_ml"], np.float32, b * hq * n_split * 2).reshape(b, hq, n_split, 2)
    group = hq // hkv
    for i in range(b):
        n = int(lens[i])
        if not 1 <= n <= n_ctx or int(slots[i]) < 0:
            raise EmulationError(f"{e['name']}: lens[{i}]={n} outside 1..n_ctx={n_ctx}")
        rows = n_ctx * hkv * d * 2 * int(slots[i])
        k = mem.view(a["k_cache"] + rows, np.float16, n * hkv * d).reshape(n, hkv, d)
        v = mem.view(a["v_cache"] + rows, np.float16, n * hkv * d).reshape(n, hkv, d)
        first = max(0, n - window) if window > 0 else 0  # the sliding window's first key
        for sp in range(n_split):
            lo, hi = max(first, sp * chunk), min(n, (sp + 1) * chunk)
            if lo >= hi:
                part[i, :, sp], ml[i, :, sp, 0], ml[i, :, sp, 1] = 0, -np.inf, 0
                continue
            kh = np.repeat(k[lo:hi].astype(np.float64), group, axis=1)  # (n_keys, Hq, D)
            vh = np.repeat(v[lo:hi].astype(np.float64), group, axis=1)
            s = np.einsum("hd,thd->ht", q[i], kh)  # (Hq, n_keys)
            m = s.max(-1)
            p = np.exp(s - m[:, None])
            part[i, :, sp] = np.einsum("ht,thd->hd", p, vh)
            ml[i, :, sp, 0], ml[i, :, sp, 1] = m, p.sum(-1)


def attn_combine(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    d = e["constexprs"]["HEAD_DIM"]
    rows, n_split = grid[0] * grid[1], a["S"]
    part = mem.view(a["part_out"], np.float32, rows * n_split * d).reshape(rows, n_split, d)
    ml = mem.view(a["part_ml"], np.float32, rows * n_split * 2).reshape(rows, n_split, 2)
    m, l = ml[..., 0].astype(np.float64), ml[..., 1].astype(np.float64)
    w = np.exp(m - m.max(-1, keepdims=True))  # (rows, S); empty splits weigh 0
    out = np.einsum("rs,rsd->rd", w, part) / (w * l).sum(-1, keepdims=True)
    mem.view(a["out"], np.float32, rows * d)[:] = out.reshape(-1)


def swiglu(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    n = a["n"]
    g, u = mem.view(a["gate"], np.float32, n), mem.view(a["up"], np.float32, n)
    mem.view(a["out"], np.float32, n)[:] = ref.swiglu(g, u)


def geglu(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    n = a["n"]
    g, u = mem.view(a["gate"], np.float32, n), mem.view(a["up"], np.float32, n)
    mem.view(a["out"], np.float32, n)[:] = ref.geglu(g, u)


def scale(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    n = a["n"]
    mem.view(a["out"], np.float32, n)[:] = ref.scale(mem.view(a["x"], np.float32, n), a["s"])


def add(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    n = a["n"]
    x, y = mem.view(a["a"], np.float32, n), mem.view(a["b"], np.float32, n)
    mem.view(a["out"], np.float32, n)[:] = ref.add(x, y)


def add_bias(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    n, width = a["n"], a["N"]
    x = mem.view(a["x"], np.float32, n).reshape(-1, width)
    bias = mem.view(a["bias"], np.float32, width)
    mem.view(a["out"], np.float32, n)[:] = ref.add_bias(x, bias).reshape(-1)


def argmax(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    b, v = grid[0], a["V"]
    logits = mem.view(a["logits"], np.float32, b * v).reshape(b, v)
    mem.view(a["out"], np.int32, b)[:] = ref.argmax(logits)


def store_rows(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    t, w = grid[0], a["W"]
    stride = a.get("src_stride", w)
    src = mem.view(a["src"], np.float32, (t - 1) * stride + w)
    rows = mem.view(a["rows"], np.int32, t)
    for i in range(t):
        row = src[i * stride:i * stride + w]
        mem.view(a["dst"] + int(rows[i]) * w * 2, np.float16, w)[:] = row.astype(np.float16)


EMULATORS: dict[str, Callable[[Mem, dict, dict, tuple], None]] = {
    "matvec": matmul, "gemm": matmul, "embedding": embedding, "rmsnorm": rmsnorm, "rope": rope,
    "attn_prefill": attn_prefill, "attn_decode": attn_decode, "attn_combine": attn_combine,
    "swiglu": swiglu, "geglu": geglu, "scale": scale, "add": add, "add_bias": add_bias,
    "argmax": argmax, "store_rows": store_rows,
}

from .cuda_kernels_matvec_fused import EMULATORS as _MATVEC_FUSED  # noqa: E402 - it uses this module
from .cuda_kernels_rope_kv import EMULATORS as _ROPE_KV  # noqa: E402

EMULATORS.update(_MATVEC_FUSED)
EMULATORS.update(_ROPE_KV)
from .cuda_kernels_fused import EMULATORS as _FUSED  # noqa: E402

EMULATORS.update(_FUSED)
from .cuda_kernels_gemm_fused import EMULATORS as _GEMM_FUSED  # noqa: E402

EMULATORS.update(_GEMM_FUSED)


def emulator(entry: dict) -> Callable[[Mem, dict, dict, tuple], None]:
    name = entry["name"]
    for prefix in sorted(EMULATORS, key=len, reverse=True):
        if name.startswith(prefix):
            return EMULATORS[prefix]
    raise EmulationError(f"no emulation for kernel entry {name!r}")
