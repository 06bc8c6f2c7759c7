"""The CUDA backend's attention: the per-sequence and batched decode/prefill attention, the
rope, and the fused `rope_kv` step (per-head norms, rope of q and k, the KV-cache store in one
launch; `ptx_kernels/rope_kv.py`) that `attend` / `attend_batch` use where the manifest ships
it, so a decode step's attention is three graph nodes (rope_kv, split-K partials, combine).

A mixin of `CudaBackend`: it uses the backend's `launch`, `new`, `_pos_lens`, `_upload_act`,
`_live`, `_forward_id`, `step`, `capturing`, `_manifest_names` and `_rope_tables`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ukgpu.gpu.cuda.graph import StepBuffers
from ukgpu.llama_core.backend import Backend, KVCache, LayerAttention, RopeConfig
from ukgpu.llama_core.errors import UkgpuError
from ukgpu.ptx_kernels.loader import attention_entries, fused_decode_entry, rope_entry, rope_kv_entry

MAX_DECODE_SPLITS = 32  # attn_combine's compiled maximum
DeviceBuffer = Any  # gpu.cuda.arena.DeviceBuffer


def decode_splits(n_ctx: int) -> tuple[int, int]:
    """(S, chunk) of the split-K decode attention for a cache of n_ctx rows: about
    $UKGPU_DECODE_SPLIT_KEYS (default 64: one key tile of the d128 kernel; on an H200 decode after a
    1024-token prompt went 368 -> 473 t/s on Qwen2.5-1.5B and 693 -> 1,072 on SmolLM2 against 256,
    no slower from position 0) keys per split, at most MAX_DECODE_SPLITS splits, chunk
    a multiple of 64 with S * chunk >= n_ctx."""
    keys = max(64, int(os.environ.get("UKGPU_DECODE_SPLIT_KEYS") or 64))
    splits = max(1, min(MAX_DECODE_SPLITS, -(-n_ctx // keys)))
    per_split = -(-n_ctx // splits)  # ceil division
    chunk = -(-per_split // 64) * 64
    return -(-n_ctx // chunk), chunk  # rounding chunk up can leave trailing splits empty: drop them


class CudaUnsupported(UkgpuError):
    """The model uses something the CUDA kernels do not implement (use the CPU backend)."""


class AttentionOps(Backend):
    _manifest_names: set[str]
    _rope_tables: dict[RopeConfig, int]

    def rope(self, x: DeviceBuffer, start_pos: int, n_heads: int, rope: RopeConfig) -> DeviceBuffer:
        n, width = x.shape
        if rope.n_rot > width // n_heads:
            raise CudaUnsupported(f"rope over {rope.n_rot} dims of {width // n_heads}-dim heads: the "
                                  "model file is inconsistent")
        pos, _ = self._pos_lens(start_pos, n)
        return self._rope_at(x, pos, n_heads, rope)

    def _rope_at(self, x: DeviceBuffer, pos: int, n_heads: int, rope: RopeConfig) -> DeviceBuffer:
        """Rotate row t of x [n, n_heads*hd] in place by the device int32 position pos[t]."""
        n, width = x.shape
        self.launch(rope_entry(rope.neox, rope.n_rot), x=x.ptr, y=x.ptr, pos=pos,
                    freqs=self._rope_table(rope), stride_x=width, stride_y=width,
                    head_dim=width // n_heads, n_rot=rope.n_rot, mscale=rope.mscale, T=n, H=n_heads)
        return x

    def _rope_table(self, rope: RopeConfig) -> int:
        """Device float64[n_rot/2] of the config's effective frequencies (made on first use)."""
        if rope not in self._rope_tables:
            if self.capturing:
                raise CudaUnsupported("a rope config first seen while recording a decode step "
                                      "(the eager step must use every config the forward uses)")
            table = np.ascontiguousarray(rope.inv_freq(), dtype=np.float64)
            self._rope_tables[rope] = self.upload(table, "rope")
        return self._rope_tables[rope]

    def attention(self, q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer, kv: KVCache,
                  layer: int, start_pos: int, window: int = 0,
                  scale: float | None = None) -> DeviceBuffer:
        keys, values = kv.k, kv.v
        hkv, hd, n = keys.n_kv_heads, keys.head_dim, q.shape[0]
        pos, _ = self._pos_lens(start_pos, n)
        for src, dst in ((k, keys.layer(layer)), (v, values.layer(layer))):
            self.launch("store_rows_f16", src=src.ptr, dst=dst, rows=pos, W=hkv * hd,
                        src_stride=hkv * hd, T=n)
        return self._attend_cached(q, kv, layer, start_pos, window, scale)

    def _attend_cached(self, q: DeviceBuffer, kv: KVCache, layer: int, start_pos: int, window: int,
                       scale: float | None) -> DeviceBuffer:
        """Attention of q's n rows over the keys and values already in `kv` (this step's too)."""
        n, keys, values = q.shape[0], kv.k, kv.v
        hkv, hd = keys.n_kv_heads, keys.head_dim
        hq = q.shape[1] // hd
        _, lens = self._pos_lens(start_pos, n)
        out = self.new((n, hq * hd))
        common = dict(q=q.ptr, k_cache=keys.layer(layer), v_cache=values.layer(layer), out=out.ptr,
                      Hq=hq, Hkv=hkv, scale=1.0 / math.sqrt(hd) if scale is None else float(scale),
                      window=int(window))
        if n == 1:
            slot = self.step.slot if self.capturing else lens + 16  # slot 0 of its own cache
            self._attn_decode(common, hd, lens, slot, kv.n_ctx, 1)
        else:
            self.launch(attention_entries(hd)["prefill"], **common, T=n, start=start_pos)
        return out

    def attend(self, q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer, kv: KVCache, layer: int,
               start_pos: int, spec: LayerAttention) -> DeviceBuffer:
        """`rope_kv` (norms, rope, cache store in one launch) then the attention kernels."""
        if q.shape[0] == 1 and self._fused_decode_name(spec, kv.k.head_dim):
            pos, lens = self._pos_lens(start_pos, 1)
            slot = self.step.slot if self.capturing else lens + 16  # slot 0 of its own cache
            return self._fused_decode(q, k, v, spec, pos, lens, slot, kv.k.layer(layer),
                                      kv.v.layer(layer), kv.n_ctx)
        name = self._rope_kv_name(spec, kv.k.head_dim)
        if name is None:
            return super().attend(q, k, v, kv, layer, start_pos, spec)
        pos, _ = self._pos_lens(start_pos, q.shape[0])
        self._rope_kv(name, q, k, v, spec, pos, pos, kv.k.layer(layer), kv.v.layer(layer))
        return self._attend_cached(q, kv, layer, start_pos, spec.window, spec.scale)

    def _rope_kv_name(self, spec: LayerAttention, hd: int) -> str | None:
        if spec.rope.n_rot > hd:
            raise CudaUnsupported(f"rope over {spec.rope.n_rot} dims of {hd}-dim heads: the model "
                                  "file is inconsistent")
        name = rope_kv_entry(spec.rope.neox, hd)
        return name if name in self._manifest_names else None

    def _fused_decode_name(self, spec: LayerAttention, hd: int) -> str | None:
        if spec.rope.n_rot > hd:
            return None  # _rope_kv_name says why
        name = fused_decode_entry(spec.rope.neox, hd)
        return name if name in self._manifest_names else None

    def _fused_decode(self, q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer, spec: LayerAttention,
                      pos: int, lens: int, slots: int, k_base: int, v_base: int, n_ctx: int
                      ) -> DeviceBuffer:
        """One decode row per sequence (B = q's rows): `attn_decode_rope` (norms, rope, KV
        store, split-K partials) then `attn_combine`: two nodes."""
        b, hd = q.shape[0], q.shape[1] // spec.n_heads
        splits, chunk = decode_splits(n_ctx)
        part, ml = self.new((b, spec.n_heads, splits, hd)), self.new((b, spec.n_heads, splits, 2))
        out = self.new((b, spec.n_heads * hd))
        norm = spec.q_norm is not None
        self.launch(fused_decode_entry(spec.rope.neox, hd), q=q.ptr, k=k.ptr, v=v.ptr,
                    q_norm=spec.q_norm.vec if norm else 0, k_norm=spec.k_norm.vec if norm else 0,
                    freqs=self._rope_table(spec.rope), pos=pos, slots=slots, lens=lens,
                    k_cache=k_base, v_cache=v_base, part_out=part.ptr, part_ml=ml.ptr, n_ctx=n_ctx,
                    chunk=chunk, Hq=spec.n_heads, Hkv=spec.n_kv_heads, n_rot=spec.rope.n_rot,
                    mscale=spec.rope.mscale, eps=spec.eps, has_norm=int(norm),
                    scale=1.0 / math.sqrt(hd) if spec.scale is None else float(spec.scale),
                    window=int(spec.window), B=b, S=splits)
        self.launch(attention_entries(hd)["combine"], part_out=part.ptr, part_ml=ml.ptr, out=out.ptr,
                    S=splits, B=b, Hq=spec.n_heads)
        return out

    def _rope_kv(self, name: str, q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer,
                 spec: LayerAttention, pos: int, rows: int, k_base: int, v_base: int) -> None:
        """q rotated in place; k rotated and v stored at cache rows `rows` (device int32[n])."""
        norm = spec.q_norm is not None
        self.launch(name, q=q.ptr, k=k.ptr, v=v.ptr, q_norm=spec.q_norm.vec if norm else 0,
                    k_norm=spec.k_norm.vec if norm else 0, pos=pos, rows=rows,
                    freqs=self._rope_table(spec.rope), k_cache=k_base, v_cache=v_base,
                    Hq=spec.n_heads, Hkv=spec.n_kv_heads, head_dim=q.shape[1] // spec.n_heads,
                    n_rot=spec.rope.n_rot, mscale=spec.rope.mscale, eps=spec.eps,
                    has_norm=int(norm), T=q.shape[0])

    def _attn_decode(self, common: dict, hd: int, lens: int, slots: int, n_ctx: int, b: int) -> None:
        """Split-K decode of b rows (row r: the cache slot slots[r], lens[r] keys): S partials
        over chunks of the keys, then one combine."""
        splits, chunk = decode_splits(n_ctx)
        hq, out = common["Hq"], common.pop("out")
        part, ml = self.new((b, hq, splits, hd)), self.new((b, hq, splits, 2))
        names = attention_entries(hd)
        self.launch(names["decode"], **common, part_out=part.ptr, part_ml=ml.ptr, slots=slots,
                    lens=lens, n_ctx=n_ctx, chunk=chunk, B=b, S=splits)
        self.launch(names["combine"], part_out=part.ptr, part_ml=ml.ptr, out=out, S=splits,
                    B=b, Hq=hq)

    def attend_batch(self, q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer, kvs: Sequence[KVCache],
                     layer: int, positions: Sequence[int], spec: LayerAttention) -> DeviceBuffer:
        """B sequences whose caches share one slab (`kv_slab`): every kernel runs once for all
        B rows, each row reading its position, key count and slot from device words (a recorded
        step reads them from the step buffers).  Caches of different slabs: one row at a time."""
        slab = kvs[0].k.slab
        if slab is None or any(kv.k.slab is not slab for kv in kvs):
            if self.capturing:
                raise CudaUnsupported("a batched decode step over caches of different slabs")
            return super().attend_batch(q, k, v, kvs, layer, positions, spec)
        b, hkv, hd = len(kvs), slab.shape[2], slab.shape[3]
        pos, lens, slots, rows = self._batch_words(positions, [kv.k.slot for kv in kvs], slab.n_ctx)
        k_base, v_base = slab.k_layer(layer), slab.v_layer(layer)
        if self._fused_decode_name(spec, hd):
            return self._fused_decode(q, k, v, spec, pos, lens, slots, k_base, v_base, slab.n_ctx)
        name = self._rope_kv_name(spec, hd)
        if name is not None:
            self._rope_kv(name, q, k, v, spec, pos, rows, k_base, v_base)
        else:
            if spec.q_norm is not None:
                q = self.rmsnorm_heads(q, spec.q_norm, spec.n_heads, spec.eps)
                k = self.rmsnorm_heads(k, spec.k_norm, spec.n_kv_heads, spec.eps)
            q = self._rope_at(q, pos, spec.n_heads, spec.rope)
            k = self._rope_at(k, pos, spec.n_kv_heads, spec.rope)
            for src, dst in ((k, k_base), (v, v_base)):
                self.launch("store_rows_f16", src=src.ptr, dst=dst, rows=rows, W=hkv * hd,
                            src_stride=hkv * hd, T=b)
        out = self.new((b, spec.n_heads * hd))
        common = dict(q=q.ptr, k_cache=k_base, v_cache=v_base, out=out.ptr, Hq=spec.n_heads, Hkv=hkv,
                      scale=1.0 / math.sqrt(hd) if spec.scale is None else float(spec.scale),
                      window=int(spec.window))
        self._attn_decode(common, hd, lens, slots, slab.n_ctx, b)
        return out

    def _batch_words(self, positions: Sequence[int], slots: Sequence[int], n_ctx: int
                     ) -> tuple[int, int, int, int]:
        """Device int32[B] positions, key counts, slots and slab rows (slot*n_ctx + position) of
        a batched step: the step buffers while recording, else uploaded for this forward."""
        if self.capturing:
            st = self.step
            return st.pos, st.lens, st.slot, st.rows
        key = (self._forward_id, -2, 0)
        if key not in self._live:
            self._live[key] = self._upload_act(StepBuffers.batch_words([0] * len(slots), positions,
                                                                       slots, n_ctx))
        base = self._live[key].ptr
        return base + StepBuffers.POS, base + StepBuffers.LENS, base + StepBuffers.SLOT, base + StepBuffers.ROWS

