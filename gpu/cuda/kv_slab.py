"""KV caches on the device: slabs of slots, so one kernel reaches every sequence of a batch.

A `KvSlab` holds the keys (then the values) of up to `n_slots` sequences of one shape in one
arena range, laid out per layer as float16 [slot][n_ctx][Hkv][hd]:

    keys of (layer l, slot s, position p, head h) at  k_base + l*layer_stride + s*slot_bytes
                                                       + ((p * Hkv) + h) * hd * 2

So a sequence's cache is still a contiguous (n_ctx, Hkv, hd) block per layer (what the prefill
attention, the row stores and `copy_kv` address, through `DeviceKV.layer`), and a batched decode
step reaches row b's cache from the layer's slot-0 address plus `slot[b] * slot_bytes`: the
attention kernels' `slots` argument.  A recorded batched step therefore bakes in only the slab,
never a sequence: the same graph serves any sequences whose caches share the slab.

`KvPool` hands out slots: a slab per cache shape, `slots_per_slab` slots each (the engine's slot
count, given at backend creation), another slab when one is full.  A slot returns to its slab
when the `KVCache` holding it is dropped (`SlotLease`), and is zeroed again when handed out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ukgpu.gpu.cuda.arena import DeviceArena


@dataclass
class DeviceKV:
    """Keys or values of one sequence: per layer a float16 (n_ctx, Hkv, hd) block at base + i*stride."""

    base: int
    layer_stride: int  # bytes
    n_kv_heads: int
    head_dim: int
    n_layers: int
    owner: Any = None  # the slot lease: back to the slab when the KVCache is dropped
    slab: KvSlab | None = None
    slot: int = 0

    def layer(self, i: int) -> int:
        return self.base + i * self.layer_stride


class KvSlab:
    """Keys and values of up to n_slots sequences of one (n_layers, n_ctx, Hkv, hd) shape."""

    def __init__(self, arena: DeviceArena, n_slots: int, shape: tuple[int, int, int, int]):
        self.shape, self.n_slots = shape, n_slots
        n_layers, n_ctx, hkv, hd = shape
        self.n_ctx = n_ctx
        self.slot_bytes = n_ctx * hkv * hd * 2
        self.layer_stride = n_slots * self.slot_bytes
        half = n_layers * self.layer_stride
        self.k_base = arena.alloc(2 * half, "kv cache")
        self.v_base = self.k_base + half
        self.free = list(range(n_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def k_layer(self, i: int) -> int:
        """Slot 0's keys of layer i: the base a batched kernel adds `slot * slot_bytes` to."""
        return self.k_base + i * self.layer_stride

    def v_layer(self, i: int) -> int:
        return self.v_base + i * self.layer_stride

    def halves(self, slot: int, lease: Any) -> tuple[DeviceKV, DeviceKV]:
        n_layers, _, hkv, hd = self.shape
        off = slot * self.slot_bytes
        return tuple(DeviceKV(base + off, self.layer_stride, hkv, hd, n_layers, lease, self, slot)
                     for base in (self.k_base, self.v_base))  # type: ignore[return-value]


@dataclass(eq=False)
class SlotLease:
    """One slot of a slab, returned to it when the last reference goes."""

    slab: KvSlab
    slot: int
    pool: KvPool

    def __del__(self) -> None:
        self.slab.free.append(self.slot)
        self.pool.live -= 1


class KvPool:
    """Slabs of KV slots per cache shape, `slots_per_slab` slots each."""

    def __init__(self, arena: DeviceArena, slots_per_slab: int = 1):
        self.arena, self.slots_per_slab = arena, max(1, int(slots_per_slab))
        self.slabs: list[KvSlab] = []
        self.live = 0  # slots handed out and not yet returned

    def take(self, shape: tuple[int, int, int, int]) -> tuple[DeviceKV, DeviceKV]:
        """The key and value halves of a free slot of a slab of `shape` (a new slab if none)."""
        slab = next((s for s in self.slabs if s.shape == shape and s.free), None)
        if slab is None:
            slab = KvSlab(self.arena, self.slots_per_slab, shape)
            self.slabs.append(slab)
        slot = slab.free.pop()
        self.live += 1
        return slab.halves(slot, SlotLease(slab, slot, self))
