"""`ukgpu verify`'s checks of the fused decode kernels that replace several plain ones in a
decode step: `attn_decode_rope_*` (+ `attn_combine`) and the split argmax (`argmax_part_f32`,
`argmax_reduce_f32`), each against numpy (`ptx_kernels.reference`), where the manifest ships
them.  Part of `verify_kernels.CASES`."""

from __future__ import annotations

import numpy as np

from ukgpu.gpu.cuda import verify_kernels as vk
from ukgpu.ptx_kernels import reference as ref
from ukgpu.ptx_kernels.loader import argmax_split, fused_decode_entry
from ukgpu.ptx_kernels.spec import ATTN_HEAD_DIMS


def check_fused_decode(dev: vk.Device, rng: np.random.Generator) -> list[vk.Check]:
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
            checks.append(vk.nmse_check("kernel", label, dev.get(out, q.shape, np.float32), want,
                                        vk.BOUNDS["attn_decode"]))
            rows = np.concatenate([dev.get(c, kc.shape, np.float16)[slots, pos] for c in (kp, vp)])
            checks.append(vk.nmse_check("kernel", f"{name} cache rows", rows.astype(np.float32),
                                        np.concatenate([rk, v]), vk.F16_OPERANDS))
    return checks


def check_split_argmax(dev: vk.Device, rng: np.random.Generator) -> list[vk.Check]:
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
    return [vk.Check("kernel", "argmax_part_f32 + argmax_reduce_f32", "exact", wrong, 0, wrong == 0,
                     f"{wrong}/{b} rows differ")]
