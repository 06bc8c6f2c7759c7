"""Causal attention with GQA over a float16 KV cache (online softmax, float32 accumulation).

KV cache of one layer: k/v (n_slots, n_ctx, Hkv, D) float16, rows written by `store_rows_f16`.

- prefill: queries q (T, Hq, D) f32 at positions start..start+T-1 of one sequence, keys 0..start+T-1
  of that sequence (k/v point at its slot).  Grid (cdiv(T, BLOCK_M), Hq); each program walks key
  blocks up to its last query's position; QK^T and PV on f16 tensor cores.  Out (T, Hq, D) f32.
- decode (flash-decoding): one query per batch row b, q (B, Hq, D) f32; slot `slots[b]` and key
  count `lens[b]` (current token included) are read on the device, so the launches can live in a
  CUDA graph.  `attn_decode` grid (B, Hkv, S): split sp covers keys [sp*chunk, (sp+1)*chunk) for
  all query heads sharing a kv head (K/V read once per group) and writes unnormalized partials;
  `attn_combine` grid (B, Hq) merges the S partials into out (B, Hq, D) f32.
  Pick S and chunk (multiple of 64, S*chunk >= n_ctx) once per n_ctx;
  splits past lens[b] cost one early exit.
- window (both): 0 is full causal attention; window > 0 is sliding-window attention, a query at
  position i sees keys j with i - window < j <= i (gemma3's local layers, llama.cpp's standard
  SWA).  Key blocks wholly before a program's first visible key are skipped (prefill: from the
  block's first query; decode: splits before lens - window exit at once).  A block where a row
  sees no key yet leaves that row's running max at -inf, so the exponentials are taken against 0
  there (no -inf - -inf).
- scale: the score scale, 1/sqrt(head_dim) for most models, the model's own where it says so.
- head_dim: a constexpr (32, 64, 96, 128 or 256); 96 (Phi-3 mini) is padded to 128 in registers
  (D_PAD) with masked loads and stores, the cache and q/out rows stay 96 wide.
Limits: Hq % Hkv == 0, Hq / Hkv <= 16 (decode);
lens[b] >= 1; window >= 0.  Reference: `reference.attention`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import grid_dependency
from .spec import ATTN_HEAD_DIMS, KernelSpec


@triton.jit
def attn_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, T, start, Hq, Hkv, scale, window,
                        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr,
                        PDL: tl.constexpr = False):
    grid_dependency(PDL)  # pdl.py: before any global access
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // (Hq // Hkv)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) query rows
    d = tl.arange(0, D_PAD)
    d_ok = d[None, :] < HEAD_DIM  # (1, D_PAD): all true unless the head size is padded
    q_ok = (rm[:, None] < T) & d_ok
    q = tl.load(q_ptr + (rm[:, None] * Hq + h) * HEAD_DIM + d[None, :], mask=q_ok, other=0)
    q = (q * scale).to(tl.float16)  # (BM, D)
    q_pos = start + rm
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    n_keys = start + tl.minimum(T, (pid_m + 1) * BLOCK_M)
    lo = tl.where(window > 0, tl.maximum(start + pid_m * BLOCK_M - window + 1, 0), 0)
    lo_q = tl.where(window > 0, q_pos - window, -1)  # (BM,) last hidden key of each query
    for n0 in range(lo // BLOCK_N * BLOCK_N, n_keys, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)  # (BN,) key positions
        kv_off = (rn[:, None] * Hkv + kvh) * HEAD_DIM + d[None, :]
        kv_ok = (rn[:, None] < n_keys) & d_ok
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0)  # (BN, D) f16
        s = tl.dot(q, tl.trans(k))  # (BM, BN)
        seen = (rn[None, :] <= q_pos[:, None]) & (rn[None, :] > lo_q[:, None])
        s = tl.where(seen, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.exp(s - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + (rm[:, None] * Hq + h) * HEAD_DIM + d[None, :], out, mask=q_ok)


@triton.jit
def decode_keys(q, k_ptr, v_ptr, base, first, n_keys, lo, skip, Hkv, HEAD_DIM: tl.constexpr,
                D_PAD: tl.constexpr, BLOCK_S: tl.constexpr, GROUP_PAD: tl.constexpr,
                SKIP: tl.constexpr):
    """Online softmax of the q rows (GP, D) over the cached keys [max(first, lo), n_keys) of the
    kv head whose row 0 starts at element base (rows Hkv * HEAD_DIM apart), BLOCK_S keys a step,
    float32 ieee dots; with SKIP, row `skip` is masked out.  Returns (max, sum of exp, acc)."""
    d = tl.arange(0, D_PAD)
    d_ok = d[None, :] < HEAD_DIM
    m_i = tl.full((GROUP_PAD,), -float("inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, D_PAD), tl.float32)
    for s0 in range(tl.maximum(first, lo // BLOCK_S * BLOCK_S), n_keys, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)  # (BS,)
        s_ok = (rs < n_keys) & (rs >= lo)
        if SKIP:
            s_ok = s_ok & (rs != skip)
        kv_off = base + rs[:, None] * (Hkv * HEAD_DIM) + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=s_ok[:, None] & d_ok, other=0).to(tl.float32)  # (BS, D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (GP, BS)
        s = tl.where(s_ok[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.exp(s - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=s_ok[:, None] & d_ok, other=0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def attn_decode_kernel(q_ptr, k_ptr, v_ptr, po_ptr, pml_ptr, slots_ptr, lens_ptr, n_ctx, chunk,
                       Hq, Hkv, scale, window, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                       BLOCK_S: tl.constexpr, GROUP_PAD: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Split `sp` of row b for all query heads of kv head `kvh` (K/V read once per group):
    keys [max(sp*chunk, lens[b]-window), min((sp+1)*chunk, lens[b])) (no lower bound when
    window is 0).  float32 math (ieee dots, no tensor cores)."""
    grid_dependency(PDL)  # pdl.py: before any global access
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    grp = Hq // Hkv
    gi = tl.arange(0, GROUP_PAD)  # (GP,) query head within the group
    g_ok = gi < grp
    h = kvh * grp + gi
    d = tl.arange(0, D_PAD)
    d_ok = d[None, :] < HEAD_DIM
    gd_ok = g_ok[:, None] & d_ok
    q = tl.load(q_ptr + (b * Hq + h)[:, None] * HEAD_DIM + d[None, :], mask=gd_ok, other=0)
    q = q * scale  # (GP, D)
    n_len = tl.load(lens_ptr + b)
    n_keys = tl.minimum(n_len, (sp + 1) * chunk)
    lo = tl.where(window > 0, tl.maximum(n_len - window, 0), 0)  # first visible key
    base = tl.load(slots_ptr + b).to(tl.int64) * n_ctx * Hkv * HEAD_DIM + kvh * HEAD_DIM
    m_i, l_i, acc = decode_keys(q, k_ptr, v_ptr, base, sp * chunk, n_keys, lo, -1, Hkv, HEAD_DIM,
                                D_PAD, BLOCK_S, GROUP_PAD, False)
    part = (b * Hq + h) * tl.num_programs(2) + sp  # (GP,)
    tl.store(po_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=gd_ok)
    tl.store(pml_ptr + part * 2, m_i, mask=g_ok)
    tl.store(pml_ptr + part * 2 + 1, l_i, mask=g_ok)


@triton.jit
def attn_combine_kernel(po_ptr, pml_ptr, o_ptr, S, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                        MAX_SPLITS: tl.constexpr,
                        PDL: tl.constexpr = False):
    """out[b, h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the S splits."""
    grid_dependency(PDL)  # pdl.py: before any global access
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)  # b * Hq + h
    sp = tl.arange(0, MAX_SPLITS)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    ok = sp < S
    m = tl.load(pml_ptr + (row * S + sp) * 2, mask=ok, other=-float("inf"))  # (MS,)
    l = tl.load(pml_ptr + (row * S + sp) * 2 + 1, mask=ok, other=0)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits: m = -inf -> 0
    acc = tl.load(po_ptr + (row * S + sp)[:, None] * HEAD_DIM + d[None, :],
                  mask=ok[:, None] & d_ok[None, :], other=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(o_ptr + row * HEAD_DIM + d, out, mask=d_ok)


MAX_SPLITS = 32
GROUP_PAD = 16  # query heads per kv head, padded (tl.dot needs 16 rows)
# head_dim -> (keys per step, warps) of decode: no spills; warps of the combine
DECODE_TILE = {32: (32, 4), 64: (32, 4), 96: (64, 8), 128: (64, 8), 256: (32, 8)}
COMBINE_WARPS = {32: 1, 64: 1, 96: 1, 128: 1, 256: 4}
# head_dim -> (BLOCK_M, BLOCK_N, warps, stages) of prefill; d256 halves the key tile to keep the
# f16 K/V tiles (32 KiB per stage) and the (64, 256) f32 accumulator in bounds
PREFILL_TILE = {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 96: (64, 64, 4, 2), 128: (64, 64, 4, 2),
                256: (64, 32, 8, 2)}


def _pad(hd: int) -> int:
    """The power of two the head is padded to in registers (Triton's block sizes)."""
    return 1 << (hd - 1).bit_length()


def _prefill(hd: int) -> KernelSpec:
    bm, bn, warps, stages = PREFILL_TILE[hd]
    return KernelSpec(
        name=f"attn_prefill_d{hd}", family="attention", fn="attn_prefill_kernel",
        params=(("q", "*fp32"), ("k_cache", "*fp16"), ("v_cache", "*fp16"), ("out", "*fp32"),
                ("T", "i32"), ("start", "i32"), ("Hq", "i32"), ("Hkv", "i32"), ("scale", "fp32"),
                ("window", "i32")),
        constexprs={"HEAD_DIM": hd, "D_PAD": _pad(hd), "BLOCK_M": bm, "BLOCK_N": bn},
        grid=(f"cdiv(T, {bm})", "Hq", "1"), sizes={},
        limits=("T >= 1", "start >= 0", "Hkv >= 1", "Hq % Hkv == 0", "window >= 0"),
        reference="reference.attention", num_warps=warps, num_stages=stages,
        aligned=("q", "k_cache", "v_cache", "out"),
        doc=f"causal GQA prefill, head_dim {hd}: q (T, Hq, {hd}) over the slot's cache rows "
            "(window > 0: sliding window)",
        deps=("spec",),
    )


def _decode(hd: int) -> KernelSpec:
    return KernelSpec(
        name=f"attn_decode_d{hd}", family="attention", fn="attn_decode_kernel",
        params=(("q", "*fp32"), ("k_cache", "*fp16"), ("v_cache", "*fp16"),
                ("part_out", "*fp32"), ("part_ml", "*fp32"), ("slots", "*i32"), ("lens", "*i32"),
                ("n_ctx", "i32"), ("chunk", "i32"), ("Hq", "i32"), ("Hkv", "i32"), ("scale", "fp32"),
                ("window", "i32")),
        constexprs={"HEAD_DIM": hd, "D_PAD": _pad(hd), "BLOCK_S": DECODE_TILE[hd][0],
                    "GROUP_PAD": GROUP_PAD},
        grid=("B", "Hkv", "S"),
        sizes={"B": "batch rows (sequences)", "S": f"key splits (1..{MAX_SPLITS})"},
        limits=("B >= 1", "Hkv >= 1", "Hq % Hkv == 0", f"Hq // Hkv <= {GROUP_PAD}", "n_ctx >= 1",
                f"1 <= S <= {MAX_SPLITS}", "chunk % 64 == 0", "S * chunk >= n_ctx", "window >= 0"),
        reference="reference.attention", num_warps=DECODE_TILE[hd][1], num_stages=1,
        aligned=("q", "k_cache", "v_cache", "part_out", "part_ml"),
        doc=f"GQA decode, head_dim {hd}, split S ways over the keys (window > 0: sliding window): "
            f"part_out (B, Hq, S, {hd}) and part_ml (B, Hq, S, 2) = (max score, sum of exp) per "
            "split; then attn_combine",
        deps=("spec",),
    )


def _combine(hd: int) -> KernelSpec:
    return KernelSpec(
        name=f"attn_combine_d{hd}", family="attention", fn="attn_combine_kernel",
        params=(("part_out", "*fp32"), ("part_ml", "*fp32"), ("out", "*fp32"), ("S", "i32")),
        constexprs={"HEAD_DIM": hd, "D_PAD": _pad(hd), "MAX_SPLITS": MAX_SPLITS},
        grid=("B", "Hq", "1"), sizes={"B": "batch rows", "Hq": "query heads"},
        limits=("B >= 1", "Hq >= 1", f"1 <= S <= {MAX_SPLITS}"),
        reference="reference.attention", num_warps=COMBINE_WARPS[hd], num_stages=1,
        aligned=("part_out", "part_ml", "out"),
        doc=f"merges the S splits of attn_decode_d{hd} into out (B, Hq, {hd}) f32",
        deps=("spec",),
    )


def specs() -> list[KernelSpec]:
    return [make(hd) for hd in ATTN_HEAD_DIMS for make in (_prefill, _decode, _combine)]
