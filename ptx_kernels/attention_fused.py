"""Decode attention fused with everything after the q/k/v projections: per-head RMSNorm of q and k
(qwen3, gemma3; `has_norm`), rope of q and k at the new row's position, the float16 store of the
new k and v into the KV cache, and split-K attention (flash-decoding) of the rotated q over the
cache.  Writes the same partials as `attn_decode` (attention.py), so `attn_combine` finishes it:
one decode step's attention is two launches instead of six to eight.

Inputs: q (B, Hq*hd), k, v (B, Hkv*hd) float32, this step's raw projections (biases added);
q_norm, k_norm (hd,) float32 when has_norm != 0 (else never read: pass 0); freqs (n_rot/2,)
float64 per-pair angles (`RopeConfig.inv_freq()`); per row b: pos[b] (the new row's position),
slots[b], lens[b] = pos[b] + 1.  Cache row (slot, position) of kv head j starts at element
((slot * n_ctx + position) * Hkv + j) * hd of k_cache / v_cache (the layer's base).

Grid (B, Hkv * cdiv(Hq // Hkv, GROUP_PAD), S): program (b, kvh * G + g, sp) handles query heads
g*GROUP_PAD.. of kv head kvh's group (GROUP_PAD = 8: a group of 6 pads to 8, a group of 16 takes
two programs) over keys [max(sp*chunk, first), min((sp+1)*chunk, lens[b])), first = lens - window
when window > 0, else 0.  Every program norms and rotates its q heads; the program whose split
holds pos also norms and rotates the new k, rounds k and v to float16 and attends to them from
registers; the g = 0 one of those stores them at (slot, pos).  Race rule: no program reads row
pos from the cache (its loads mask it out), so the order of programs never matters.  Loads in
flight together: q, and the new row's raw k and v (in the program whose split holds pos) before
the key loop; each step's K and V tiles (`decode_keys`).  At head_dim 256 the rotated q is
parked in the program's own part_out rows (barrier, load back) before the key loop: held in
registers as computed, the fp32 dot's operand layout spilled 300 bytes there.
Numerics as rope.py (float64 angle reduced to [-pi, pi), float32 cos/sin), rmsnorm.py (float32
per head) and attn_decode (float32 ieee dots).  Limits: as attn_decode, n_rot even, n_rot <= hd.
Reference: `reference.rope_kv`, `reference.store_rows` then `reference.attention`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention import DECODE_TILE, MAX_SPLITS, _pad, decode_keys
from .pdl import grid_dependency
from .rope_kv import rotation
from .spec import ATTN_HEAD_DIMS, KernelSpec

GROUP_PAD = 8  # query heads per program (tl.dot takes 8 float32 rows; 16 would pad a group of 6)


@triton.jit
def _load_heads(x_ptr, rows, row_ok, w_ptr, partner, rot, has_norm, HEAD_DIM: tl.constexpr,
                D_PAD: tl.constexpr):
    """Heads starting at elements rows (R,) of x_ptr, their rotation partners (loaded again: L1
    hits) and the norm weight at both (when has_norm): (R, D_PAD), (R, D_PAD), (D_PAD,),
    (D_PAD,) float32, zero past HEAD_DIM and on rows not row_ok (nothing loaded there)."""
    cols = tl.arange(0, D_PAD)
    d_ok = cols < HEAD_DIM
    x = tl.load(x_ptr + rows[:, None] + cols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0)
    o = tl.load(x_ptr + rows[:, None] + partner[None, :], mask=row_ok[:, None] & rot[None, :], other=0)
    w = tl.zeros((D_PAD,), tl.float32)
    w_o = tl.zeros((D_PAD,), tl.float32)
    if has_norm != 0:
        w = tl.load(w_ptr + cols, mask=d_ok, other=0)
        w_o = tl.load(w_ptr + partner, mask=rot, other=0)
    return x, o, w, w_o


@triton.jit
def _norm_rotate(x, o, w, w_o, c, s, rot, eps, has_norm, HEAD_DIM: tl.constexpr):
    """Heads x (R, D) with partners o, normed (has_norm: by w, w_o) and rotated."""
    if has_norm != 0:
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        x = x * inv[:, None] * w[None, :]
        o = o * inv[:, None] * w_o[None, :]
    return tl.where(rot[None, :], x * c[None, :] + o * s[None, :], x)


@triton.jit
def _raw_new_kv(k_ptr, v_ptr, k_norm, rows, ok, partner, rot, has_norm, HEAD_DIM: tl.constexpr,
                D_PAD: tl.constexpr):
    """The new row's raw k (with partners and norm weights, `_load_heads`) and v, rows (GP,)."""
    d = tl.arange(0, D_PAD)
    kx, ko, kw, kw_o = _load_heads(k_ptr, rows, ok, k_norm, partner, rot, has_norm, HEAD_DIM, D_PAD)
    vx = tl.load(v_ptr + rows[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < HEAD_DIM), other=0)
    return kx, ko, kw, kw_o, vx


@triton.jit
def _new_kv(kx, ko, kw, kw_o, vx, k_cache, v_cache, dst, c, s, rot, eps, has_norm, store,
            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP_PAD: tl.constexpr):
    """The new k (its loads kx, ko, kw, kw_o normed and rotated) and v (vx) of one kv head,
    rounded to f16, as float32 (GROUP_PAD, D_PAD) with the row repeated; stored at cache element
    dst if store."""
    d = tl.arange(0, D_PAD)
    d_ok = d[None, :] < HEAD_DIM
    kn = _norm_rotate(kx, ko, kw, kw_o, c, s, rot, eps, has_norm, HEAD_DIM).to(tl.float16)
    vn = vx.to(tl.float16)
    if store:
        one = (tl.arange(0, GROUP_PAD) == 0)[:, None] & d_ok  # one row of the repeated copies
        at = dst + tl.zeros((GROUP_PAD, 1), tl.int64) + d[None, :]
        tl.store(k_cache + at, kn, mask=one)
        tl.store(v_cache + at, vn, mask=one)
    return kn.to(tl.float32), vn.to(tl.float32)


@triton.jit
def _attend_one(q, kn, vn, m_i, l_i, acc):
    """The online-softmax step of one key (kn, vn: (GP, D) rows repeating it) for every q row."""
    sn = tl.sum(q * kn, axis=1)  # (GP,)
    m_new = tl.maximum(m_i, sn)
    p = tl.exp(sn - m_new)
    alpha = tl.exp(m_i - m_new)
    return m_new, l_i * alpha + p, acc * alpha[:, None] + p[:, None] * vn


@triton.jit
def attn_decode_rope_kernel(q_ptr, k_ptr, v_ptr, q_norm, k_norm, freq_ptr, pos_ptr, slots_ptr,
                            lens_ptr, k_cache, v_cache, po_ptr, pml_ptr, n_ctx, chunk, Hq, Hkv,
                            n_rot, mscale, eps, has_norm, scale, window,
                            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                            GROUP_PAD: tl.constexpr, NEOX: tl.constexpr,
                            PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    b = tl.program_id(0)
    sp = tl.program_id(2)
    grp = Hq // Hkv
    n_sub = tl.cdiv(grp, GROUP_PAD)
    kvh = tl.program_id(1) // n_sub
    g0 = tl.program_id(1) % n_sub * GROUP_PAD
    gi = g0 + tl.arange(0, GROUP_PAD)  # (GP,) query head within the group
    g_ok = gi < grp
    h = kvh * grp + gi
    d = tl.arange(0, D_PAD)
    d_ok = d[None, :] < HEAD_DIM
    pos = tl.load(pos_ptr + b)
    c, s, partner, first, rot = rotation(freq_ptr, pos.to(tl.float64), n_rot, mscale, D_PAD, NEOX)
    s = tl.where(first, -s, s)  # signed: a rotated head is x * c + x[partner] * s
    qx, qo, qw, qw_o = _load_heads(q_ptr, (b * Hq + h).to(tl.int64) * HEAD_DIM, g_ok, q_norm,
                                   partner, rot, has_norm, HEAD_DIM, D_PAD)
    # the new row's raw k and v, loaded now with q (only the split that holds pos loads them),
    # used after the key loop: their round trip overlaps q's instead of following the loop (up
    # to head_dim 128: held across the loop at 256 they spill, so there they are loaded after it)
    holds = (pos >= sp * chunk) & (pos < (sp + 1) * chunk)
    new_rows = tl.zeros((GROUP_PAD,), tl.int64) + (b * Hkv + kvh).to(tl.int64) * HEAD_DIM
    new_ok = tl.where(holds, gi >= 0, gi < 0)  # (GP,): every row, in that split only
    if HEAD_DIM <= 128:
        kx, ko, kw, kw_o, vx = _raw_new_kv(k_ptr, v_ptr, k_norm, new_rows, new_ok, partner, rot,
                                           has_norm, HEAD_DIM, D_PAD)
    q = _norm_rotate(qx, qo, qw, qw_o, c, s, rot, eps, has_norm, HEAD_DIM) * scale  # (GP, D)
    part = (b * Hq + h) * tl.num_programs(2) + sp  # (GP,) this program's partial rows
    gd_ok = g_ok[:, None] & d_ok
    out = po_ptr + part[:, None] * HEAD_DIM + d[None, :]
    if HEAD_DIM > 128:  # q parked in its own part_out rows and loaded back (all threads past the
        tl.store(out, q, mask=gd_ok)  # barrier): a computed q held across the loop spills at d256
        tl.debug_barrier()
        q = tl.load(out, mask=gd_ok, other=0)
    n_len = tl.load(lens_ptr + b)
    n_keys = tl.minimum(n_len, (sp + 1) * chunk)
    lo = tl.where(window > 0, tl.maximum(n_len - window, 0), 0)  # first visible key
    base = tl.load(slots_ptr + b).to(tl.int64) * n_ctx * Hkv * HEAD_DIM + kvh * HEAD_DIM
    m_i, l_i, acc = decode_keys(q, k_cache, v_cache, base, sp * chunk, n_keys, lo, pos, Hkv,
                                HEAD_DIM, D_PAD, BLOCK_S, GROUP_PAD, True)  # row pos: registers
    if holds:  # this split holds the new row
        if HEAD_DIM > 128:
            kx, ko, kw, kw_o, vx = _raw_new_kv(k_ptr, v_ptr, k_norm, new_rows, new_ok, partner,
                                               rot, has_norm, HEAD_DIM, D_PAD)
        kn, vn = _new_kv(kx, ko, kw, kw_o, vx, k_cache, v_cache,
                         base + pos.to(tl.int64) * (Hkv * HEAD_DIM), c, s, rot, eps, has_norm,
                         g0 == 0, HEAD_DIM, D_PAD, GROUP_PAD)
        if (pos < n_len) & (pos >= lo):
            m_i, l_i, acc = _attend_one(q, kn, vn, m_i, l_i, acc)
    if HEAD_DIM > 128:
        tl.debug_barrier()  # every thread has read the parked q before acc overwrites it
    tl.store(out, acc, mask=gd_ok)
    tl.store(pml_ptr + part * 2, m_i, mask=g_ok)
    tl.store(pml_ptr + part * 2 + 1, l_i, mask=g_ok)


def _fused(hd: int, mode: str) -> KernelSpec:
    block_s, warps = DECODE_TILE[hd]
    return KernelSpec(
        name=f"attn_decode_rope_{mode}_d{hd}", family="attention_fused",
        fn="attn_decode_rope_kernel",
        params=(("q", "*fp32"), ("k", "*fp32"), ("v", "*fp32"), ("q_norm", "*fp32"),
                ("k_norm", "*fp32"), ("freqs", "*fp64"), ("pos", "*i32"), ("slots", "*i32"),
                ("lens", "*i32"), ("k_cache", "*fp16"), ("v_cache", "*fp16"), ("part_out", "*fp32"),
                ("part_ml", "*fp32"), ("n_ctx", "i32"), ("chunk", "i32"), ("Hq", "i32"),
                ("Hkv", "i32"), ("n_rot", "i32"), ("mscale", "fp32"), ("eps", "fp32"),
                ("has_norm", "i32"), ("scale", "fp32"), ("window", "i32")),
        constexprs={"HEAD_DIM": hd, "D_PAD": _pad(hd), "BLOCK_S": block_s, "GROUP_PAD": GROUP_PAD,
                    "NEOX": mode == "neox"},
        grid=("B", f"Hkv * cdiv(Hq // Hkv, {GROUP_PAD})", "S"),
        sizes={"B": "batch rows (sequences)", "S": f"key splits (1..{MAX_SPLITS})"},
        limits=("B >= 1", "Hkv >= 1", "Hq % Hkv == 0", "n_ctx >= 1", f"1 <= S <= {MAX_SPLITS}",
                "chunk % 64 == 0", "S * chunk >= n_ctx", "window >= 0", "n_rot % 2 == 0",
                f"2 <= n_rot <= {hd}"),
        reference="reference.attention", num_warps=warps, num_stages=1,
        aligned=("q", "k", "v", "k_cache", "v_cache", "part_out", "part_ml"),
        doc=f"decode step, head_dim {hd}: per-head norm (has_norm), {mode.upper()} rope of q and k "
            "at pos, k and v stored f16 at (slot, pos), split-K GQA attention of q over the slot's "
            f"lens keys: part_out (B, Hq, S, {hd}), part_ml (B, Hq, S, 2) for attn_combine_d{hd}",
        deps=("spec", "attention", "rope_kv"),
    )


def specs() -> list[KernelSpec]:
    return [_fused(hd, mode) for mode in ("norm", "neox") for hd in ATTN_HEAD_DIMS]
