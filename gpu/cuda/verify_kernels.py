"""Kernel-level checks of `ukgpu verify`: every manifest kernel on fresh random inputs.

Each case uploads random inputs, poisons the output (NaN for floats, -1 for ints) so an
unwritten element can never pass, launches the kernel through `KernelSet` exactly as the backend
does, and compares with the float64 numpy reference of `ptx_kernels.reference` by normalized mean
squared error, NMSE = sum((out - ref)^2) / sum(ref^2), against a per-op bound (`verify_checks.BOUNDS`,
derived there).  Every launch waits for its kernel (`KernelSet.launch(sync=True)`), so a kernel that
faults is named; after a fault that loses the context (`CudaError.sticky`) the remaining cases
are reported as not run, not as copies of the same error (`Guard`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ukgpu.gpu.cuda.arena import DeviceArena
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.gpu.cuda.verify_checks import (
    BOUNDS,
    F16_OPERANDS,
    Check,
    Device,
    Guard,
    bound,
    nmse_check,
    weight_args,
)
from ukgpu.gpu.cuda.verify_gemm import check_fused_gemm
from ukgpu.ptx_kernels import reference as ref
from ukgpu.ptx_kernels.loader import argmax_split, fused_decode_entry, split_add_entry
from ukgpu.ptx_kernels.repack import FORMATS
from ukgpu.ptx_kernels.spec import ATTN_HEAD_DIMS


def check_weight_kernels(dev: Device, qtype: str, rng: np.random.Generator) -> list[Check]:
    n, k, tag = 200, 512, qtype.lower()
    w = ref.random_repacked(qtype, n, k, rng)
    wa = weight_args(dev, w)
    checks = []
    for name, rows in ((f"matvec_{tag}_b1", 1), (f"matvec_{tag}_b8", 5), (f"gemm_{tag}", 70)):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        y = dev.poisoned(rows * n)
        sizes = {"B": rows} if name.startswith("matvec") else {"M": rows}
        dev.run(name, **wa, x=dev.put(x), y=y, N=n, K=k, **sizes)
        checks.append(nmse_check("kernel", name, dev.get(y, (rows, n), np.float32),
                                 ref.matvec(w, x), bound(name)))
    ids = rng.integers(0, n, 7).astype(np.int32)
    out = dev.poisoned(7 * k)
    dev.run(f"embedding_{tag}", **wa, ids=dev.put(ids), out=out, K=k, T=7)
    checks.append(nmse_check("kernel", f"embedding_{tag}", dev.get(out, (7, k), np.float32),
                             ref.embedding(w, ids), bound("embedding")))
    # inputs of their own (the other checks' draws stay as they were)
    return checks + check_fused_matvec(dev, qtype, w, wa, np.random.default_rng([7, *tag.encode()]))


def check_fused_matvec(dev: Device, qtype: str, w: Any, wa: dict, rng: np.random.Generator
                       ) -> list[Check]:
    """The fused decode mat-vecs (norm + bias, SiLU GLU of two weights, residual add) at batch 1
    and 5, where the manifest ships them."""
    n, k, tag, eps = w.n_rows, w.n_cols, qtype.lower(), 1e-6
    shipped = set(dev.kernels.manifests.names())
    up = ref.random_repacked(qtype, n, k, rng)
    ua = {f"u_{p[2:]}": ptr for p, ptr in weight_args(dev, up).items()}
    g, bias = rng.uniform(0.5, 1.5, k).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    gp, bp = dev.put(g), dev.put(bias)
    checks = []
    for version, rows in (("b1", 1), ("b8", 5)):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        resid = rng.standard_normal((rows, n)).astype(np.float32)
        va = {f"v_{p[2:]}": ptr for p, ptr in wa.items()}  # a third weight: w again
        ys = [dev.poisoned(rows * n) for _ in range(3)]
        qkv = f"matvec_qkv_{tag}_{version}"
        if qkv in shipped:
            dev.run(qkv, **wa, **ua, **va, x=dev.put(x), g=gp, bias0=bp, bias1=bp, bias2=bp, y0=ys[0],
                    y1=ys[1], y2=ys[2], N0=n, N1=n, N2=n, K=k, B=rows, eps=eps, has_bias=1)
            got = np.concatenate([dev.get(y, (rows, n), np.float32) for y in ys])
            want = np.concatenate(ref.matvec_qkv([w, up, w], x, g, eps, [bias] * 3))
            checks.append(nmse_check("kernel", qkv, got, want, bound(qkv)))
        cases = (("norm", dict(g=gp, bias=bp, flag=1), ref.matvec_norm(w, x, g, eps, bias)),
                 ("glu", dict(**ua, g=gp, flag=0), ref.matvec_glu(w, up, x, g, eps, 0)),
                 ("add", dict(flag=0), ref.matvec_add(w, x, resid)))
        for kind, extra, want in cases:
            name = f"matvec_{kind}_{tag}_{version}"
            if name not in shipped:
                continue
            y = dev.put(resid) if kind == "add" else dev.poisoned(rows * n)
            dev.run(name, **wa, **extra, x=dev.put(x), y=y, N=n, K=k, B=rows, eps=eps)
            checks.append(nmse_check("kernel", name, dev.get(y, (rows, n), np.float32), want,
                                     bound(name)))
    return checks


def check_rmsnorm(dev: Device, rng: np.random.Generator) -> list[Check]:
    checks = []
    for name, m, d in (("rmsnorm_f32", 5, 576), ("rmsnorm_f32 per head (hd 256)", 12, 256)):
        x, w = rng.standard_normal((m, d)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
        y = dev.poisoned(m * d)
        dev.run("rmsnorm_f32", x=dev.put(x), weight=dev.put(w), y=y, D=d, eps=1e-5, M=m)
        checks.append(nmse_check("kernel", name, dev.get(y, (m, d), np.float32),
                                 ref.rmsnorm(x, w, 1e-5), bound("rmsnorm")))
    return checks


ROPE_CASES = ((64, 64, 64), (128, 128, 128), (256, 256, 256), (128, 96, 96), (64, 128, 64))


def check_rope(dev: Device, rng: np.random.Generator) -> list[Check]:
    """Every rope entry: llama3-style scaled tables, partial rotation, mscale, large positions."""
    checks = []
    for mode in ("norm", "neox"):
        for d, hd, n_rot in ROPE_CASES:
            t, h = 9, 4
            x = rng.standard_normal((t, h, hd)).astype(np.float32)
            pos = rng.integers(0, 1 << 17, t).astype(np.int32)
            freqs = 5e5 ** (-np.arange(0, n_rot, 2) / n_rot) / rng.uniform(1, 8, n_rot // 2)
            y = dev.poisoned(x.size)
            name = f"rope_{mode}_d{d}"
            dev.run(name, x=dev.put(x), y=y, pos=dev.put(pos), freqs=dev.put(freqs),
                    stride_x=h * hd, stride_y=h * hd, head_dim=hd, n_rot=n_rot, mscale=1.25,
                    T=t, H=h)
            want = ref.rope(x, pos, 0.0, mode == "neox", freqs=freqs, n_rot=n_rot, mscale=1.25)
            label = name if d == hd == n_rot else f"{name} (head_dim {hd}, n_rot {n_rot})"
            checks.append(nmse_check("kernel", label,
                                     dev.get(y, x.shape, np.float32), want, bound(name)))
    return checks


def check_rope_kv(dev: Device, rng: np.random.Generator) -> list[Check]:
    """Every rope_kv entry: per-head norms, rope of q (in place) and k, k and v stored f16 at
    cache rows of a slab (the rows compared with a float64 reference at the f16 bound)."""
    checks = []
    for mode in ("norm", "neox"):
        for d, hd, n_rot in (c for c in ROPE_CASES if c[1] <= c[0]):  # rope_kv: whole heads
            t, hq, hkv, n_rows = 3, 6, 2, 24
            q, k, v = (rng.standard_normal((t, h, hd)).astype(np.float32) for h in (hq, hkv, hkv))
            pos, rows = np.array([3, 70000, 9], np.int32), np.array([3, 20, 17], np.int32)
            freqs = 5e5 ** (-np.arange(0, n_rot, 2) / n_rot)
            qn, kn = (rng.uniform(0.5, 1.5, hd).astype(np.float32) for _ in range(2))
            qp = dev.put(q)
            kc, vc = (dev.poisoned(n_rows * hkv * hd // 2) for _ in range(2))
            name = f"rope_kv_{mode}_d{d}"
            if name not in set(dev.kernels.manifests.names()):
                continue
            dev.run(name, q=qp, k=dev.put(k), v=dev.put(v), q_norm=dev.put(qn), k_norm=dev.put(kn),
                    pos=dev.put(pos), rows=dev.put(rows), freqs=dev.put(freqs), k_cache=kc, v_cache=vc,
                    Hq=hq, Hkv=hkv, head_dim=hd, n_rot=n_rot, mscale=1.25, eps=1e-6, has_norm=1, T=t)
            wq, wk, wv = ref.rope_kv(q, k, v, pos, freqs, mode == "neox", n_rot, 1.25, qn, kn)
            cache = np.concatenate([dev.get(c, (n_rows, hkv, hd), np.float16)[rows] for c in (kc, vc)])
            label = name if d == hd == n_rot else f"{name} (head_dim {hd}, n_rot {n_rot})"
            checks.append(nmse_check("kernel", label, dev.get(qp, q.shape, np.float32), wq, bound("rope")))
            checks.append(nmse_check("kernel", f"{label} cache rows", cache.astype(np.float32),
                                     np.concatenate([wk, wv]), F16_OPERANDS))
    return checks


def check_attention(dev: Device, rng: np.random.Generator) -> list[Check]:
    checks = []
    hq, hkv = 8, 2
    for hd in ATTN_HEAD_DIMS:
        for window in (0, 40):
            t, start = 70, 30
            s = start + t
            q = rng.standard_normal((t, hq, hd)).astype(np.float32)
            k = rng.standard_normal((s, hkv, hd)).astype(np.float16)
            v = rng.standard_normal((s, hkv, hd)).astype(np.float16)
            out = dev.poisoned(q.size)
            scale = 1.0 / math.sqrt(hd)
            name = f"attn_prefill_d{hd}" + (f" window {window}" if window else "")
            dev.run(f"attn_prefill_d{hd}", q=dev.put(q), k_cache=dev.put(k), v_cache=dev.put(v),
                    out=out, T=t, start=start, Hq=hq, Hkv=hkv, scale=scale, window=window)
            expected = ref.attention(q, k, v, start + np.arange(t), scale, window)
            checks.append(nmse_check("kernel", name, dev.get(out, q.shape, np.float32), expected,
                                     bound(name)))
            checks.append(_check_decode(dev, rng, hd, hq, hkv, window))
    return checks


def _check_decode(dev: Device, rng: np.random.Generator, hd: int, hq: int, hkv: int,
                  window: int) -> Check:
    n_slots, n_ctx = 3, 128
    slots, lens = np.array([2, 0, 1], np.int32), np.array([17, 1, 100], np.int32)
    k = rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16)
    v = rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16)
    q = rng.standard_normal((3, hq, hd)).astype(np.float32)
    out = dev.poisoned(q.size)
    scale = 1.0 / math.sqrt(hd)
    splits, chunk = 2, 64  # row 2 spans both splits; rows 0 and 1 leave the second one empty
    part, ml = dev.poisoned(3 * hq * splits * hd), dev.poisoned(3 * hq * splits * 2)
    name = f"attn_decode_d{hd} + attn_combine_d{hd}" + (f" window {window}" if window else "")
    dev.run(f"attn_decode_d{hd}", q=dev.put(q), k_cache=dev.put(k), v_cache=dev.put(v),
            part_out=part, part_ml=ml, slots=dev.put(slots), lens=dev.put(lens), n_ctx=n_ctx,
            chunk=chunk, Hq=hq, Hkv=hkv, scale=scale, window=window, B=3, S=splits)
    dev.run(f"attn_combine_d{hd}", part_out=part, part_ml=ml, out=out, S=splits, B=3, Hq=hq)
    expected = np.stack([
        ref.attention(q[b:b + 1], k[slots[b], :lens[b]], v[slots[b], :lens[b]],
                      np.array([lens[b] - 1]), scale, window)[0] for b in range(3)])
    return nmse_check("kernel", name, dev.get(out, q.shape, np.float32), expected, bound(name))


def check_elementwise(dev: Device, rng: np.random.Generator) -> list[Check]:
    n = 5000
    a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    checks = []
    for name, fn, args in (("swiglu_f32", ref.swiglu, ("gate", "up")),
                           ("geglu_f32", ref.geglu, ("gate", "up")), ("add_f32", ref.add, ("a", "b"))):
        out = dev.poisoned(n)
        dev.run(name, **{args[0]: dev.put(a), args[1]: dev.put(b)}, out=out, n=n)
        checks.append(nmse_check("kernel", name, dev.get(out, (n,), np.float32), fn(a, b),
                                 bound(name)))
    out = dev.poisoned(n)
    dev.run("scale_f32", x=dev.put(a), out=out, n=n, s=25.3)
    checks.append(nmse_check("kernel", "scale_f32", dev.get(out, (n,), np.float32),
                             ref.scale(a, 25.3), bound("scale")))
    logits = rng.standard_normal((4, n)).astype(np.float32)
    out = dev.poisoned(4, word=0xFFFFFFFF)
    dev.run("argmax_f32", logits=dev.put(logits), out=out, V=n, B=4)
    got = dev.get(out, (4,), np.int32)
    wrong = int(np.sum(got != ref.argmax(logits)))
    checks.append(Check("kernel", "argmax_f32", "exact", wrong, 0, wrong == 0, f"{wrong}/4 rows differ"))
    x, bias = rng.standard_normal((7, 96)).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    out = dev.poisoned(x.size)
    dev.run("add_bias_f32", x=dev.put(x), bias=dev.put(bias), out=out, n=x.size, N=96)
    checks.append(nmse_check("kernel", "add_bias_f32", dev.get(out, x.shape, np.float32),
                             ref.add_bias(x, bias), bound("add_bias")))
    dst = rng.standard_normal((16, 256)).astype(np.float16)
    src = rng.standard_normal((5, 320)).astype(np.float32)  # rows 320 apart, first 256 stored
    rows = rng.permutation(16)[:5].astype(np.int32)
    dptr = dev.put(dst)
    dev.run("store_rows_f16", src=dev.put(src), dst=dptr, rows=dev.put(rows), W=256,
            src_stride=320, T=5)
    got = dev.get(dptr, dst.shape, np.float16)
    wrong = int(np.sum(got != ref.store_rows(dst, src[:, :256], rows)))
    checks.append(Check("kernel", "store_rows_f16", "exact", wrong, 0, wrong == 0,
                        f"{wrong} elements differ"))
    return checks


def check_fused_decode(dev: Device, rng: np.random.Generator) -> list[Check]:
    """Two sequences (slots 1 and 0 of a slab, positions 40 and 3), q/k norms, partial rope:
    the combined output against norms -> rope -> f16 cache row -> attention in float64, and the
    stored cache rows."""
    shipped, checks = set(dev.kernels.manifests.names()), []
    n_slots, n_ctx, hq, hkv, eps, scale = 2, 128, 6, 2, 1e-6, 0.125
    for mode in ("norm", "neox"):
        for hd in ATTN_HEAD_DIMS:
            name = fused_decode_entry(mode == "neox", hd)
            if name not in shipped:
                continue
            n_rot = hd if hd != 96 else 64
            q, k, v = (rng.standard_normal((2, h, hd)).astype(np.float32) for h in (hq, hkv, hkv))
            qn, kn = (rng.uniform(0.5, 1.5, hd).astype(np.float32) for _ in range(2))
            kc, vc = (rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16) for _ in range(2))
            pos, slots = np.array([40, 3], np.int32), np.array([1, 0], np.int32)
            freqs = 1e4 ** (-np.arange(0, n_rot, 2) / n_rot)
            splits, chunk = 2, 64
            kp, vp = dev.put(kc), dev.put(vc)
            part, ml = dev.poisoned(2 * hq * splits * hd), dev.poisoned(2 * hq * splits * 2)
            out = dev.poisoned(q.size)
            dev.run(name, q=dev.put(q), k=dev.put(k), v=dev.put(v), q_norm=dev.put(qn), k_norm=dev.put(kn),
                    freqs=dev.put(freqs), pos=dev.put(pos), slots=dev.put(slots), lens=dev.put(pos + 1),
                    k_cache=kp, v_cache=vp, part_out=part, part_ml=ml, n_ctx=n_ctx, chunk=chunk, Hq=hq,
                    Hkv=hkv, n_rot=n_rot, mscale=1.0, eps=eps, has_norm=1, scale=scale, window=0, B=2,
                    S=splits)
            dev.run(f"attn_combine_d{hd}", part_out=part, part_ml=ml, out=out, S=splits, B=2, Hq=hq)
            rq, rk, _ = ref.rope_kv(q, k, v, pos, freqs, mode == "neox", n_rot, 1.0, qn, kn, eps)
            kc[slots, pos], vc[slots, pos] = rk.astype(np.float16), v.astype(np.float16)
            want = np.stack([ref.attention(rq[b:b + 1], kc[slots[b], :pos[b] + 1], vc[slots[b], :pos[b] + 1],
                                           np.array([pos[b]]), scale, 0)[0] for b in range(2)])
            label = f"{name} + attn_combine_d{hd}"
            checks.append(nmse_check("kernel", label, dev.get(out, q.shape, np.float32), want,
                                        BOUNDS["attn_decode"]))
            rows = np.concatenate([dev.get(c, kc.shape, np.float16)[slots, pos] for c in (kp, vp)])
            checks.append(nmse_check("kernel", f"{name} cache rows", rows.astype(np.float32),
                                        np.concatenate([rk, v]), F16_OPERANDS))
    return checks


def check_split_argmax(dev: Device, rng: np.random.Generator) -> list[Check]:
    """Rows of 151,936 logits (a tie across parts in one row) against numpy's first-index argmax."""
    if not {"argmax_part_f32", "argmax_reduce_f32"} <= set(dev.kernels.manifests.names()):
        return []
    b, vocab = 3, 151_936
    logits = rng.standard_normal((b, vocab)).astype(np.float32)
    logits[1, [5000, 90000]] = 50.0  # a tie in two parts: the first index wins
    span, parts = argmax_split(vocab)
    val, idx, out = dev.poisoned(b * parts), dev.poisoned(b * parts), dev.poisoned(b)
    dev.run("argmax_part_f32", logits=dev.put(logits), part_val=val, part_idx=idx, V=vocab, span=span, B=b)
    dev.run("argmax_reduce_f32", part_val=val, part_idx=idx, out=out, P=parts, B=b)
    wrong = int(np.sum(dev.get(out, (b,), np.int32) != ref.argmax(logits)))
    return [Check("kernel", "argmax_part_f32 + argmax_reduce_f32", "exact", wrong, 0, wrong == 0,
                     f"{wrong}/{b} rows differ")]


def check_split_add(dev: Device, rng: np.random.Generator) -> list[Check]:
    """`matvec_split_add`, every shipped type: 4 splits of 2,304 columns (the last one empty) vs
    the reference, then twice more: the same bits (the partials are added in split order,
    whichever program is last) and the ticket words back at zero."""
    n, k, splits, checks = 200, 2304, 4, []
    for qtype in [q for q in FORMATS if split_add_entry(q) in dev.kernels.manifests.names()]:
        name, w = split_add_entry(qtype), ref.random_repacked(qtype, n, k, rng)
        x, resid = rng.standard_normal((1, k)).astype(np.float32), rng.standard_normal((1, n)).astype(np.float32)
        args = dict(weight_args(dev, w), x=dev.put(x), part=dev.poisoned(splits * n), N=n, K=k,
                    count=dev.put(np.zeros(n // 4, np.int32)), splits=splits)
        outs = []
        for _ in range(3):
            dev.run(name, **args, y=(y := dev.put(resid)))
            outs.append(dev.get(y, (1, n), np.float32))
        checks.append(nmse_check("kernel", name, outs[0], ref.matvec_add(w, x, resid), bound(name)))
        bad = sum(int(np.sum(o != outs[0])) for o in outs[1:]) + int(np.count_nonzero(
            dev.get(args["count"], (n // 4,), np.int32)))
        checks.append(Check("kernel", f"{name} repeated", "exact", bad, 0, bad == 0,
                            f"{bad} values differing between runs or ticket words not zero"))
    return checks


Case = Callable[[Device, np.random.Generator], list[Check]]
CASES: list[tuple[str, Case]] = [
    ("rmsnorm kernels", check_rmsnorm), ("rope kernels", check_rope),
    ("attention kernels", check_attention), ("elementwise kernels", check_elementwise),
]
CASES += [(f"{q} weight kernels", lambda dev, rng, q=q: check_weight_kernels(dev, q, rng)) for q in FORMATS]
# last: the earlier cases' random draws stay as they were
CASES += [("rope_kv kernels", check_rope_kv), ("fused decode attention", check_fused_decode),
          ("split argmax", check_split_argmax), ("split-K mat-vecs", check_split_add),
          ("fused prefill GEMMs", check_fused_gemm)]


def kernel_checks(kernels: KernelSet, arena: DeviceArena, seed: int = 0,
                  guard: Guard | None = None) -> list[Check]:
    """Every case's checks; a case that raises is one error check (see `Guard`)."""
    dev, rng, guard = Device(kernels, arena), np.random.default_rng(seed), guard or Guard()
    return [c for label, case in CASES for c in guard.run("kernel", label, case, dev, rng)]
