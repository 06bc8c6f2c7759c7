"""One device allocation, carved once, holding weights, KV caches and activations.

`DeviceArena` takes a single `cuMemAlloc` at startup and hands out aligned sub-ranges from it
(bump allocation: the model's buffers live as long as the model).  Activations are recycled by
`BufferPool`: a buffer whose last `DeviceBuffer` reference goes away returns to a free list of
its size class and is handed out again, so a forward pass reuses the same few blocks and the
arena stops growing after the first one.  Nothing is allocated from the driver after startup,
which is what a captured CUDA graph needs (its pointers stay valid) and what keeps device memory
use known in advance.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ukgpu.llama_core.errors import UkgpuError

ALIGN = 256  # bytes: every sub-allocation starts on this boundary (TMA/vector loads want >= 16)


class CudaArenaExhausted(UkgpuError):
    """The device arena has no room for a request."""


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


class DeviceArena:
    """A bump allocator over one device allocation of `capacity` bytes."""

    def __init__(self, cu: Any, capacity: int, align: int = ALIGN):
        self.cu = cu
        self.capacity = _round_up(int(capacity), align)
        self.align = align
        self.base = int(cu.cuMemAlloc(self.capacity))
        self.used = 0
        self.peak = 0
        self.tags: dict[str, int] = defaultdict(int)  # bytes per purpose, for the usage line

    def alloc(self, nbytes: int, tag: str = "other") -> int:
        """A device address of `nbytes` (aligned), valid until the arena is freed."""
        size = _round_up(max(int(nbytes), 1), self.align)
        if self.used + size > self.capacity:
            raise CudaArenaExhausted(
                f"device arena full: {tag} needs {size / 2**20:.1f} MiB, "
                f"{(self.capacity - self.used) / 2**20:.1f} of {self.capacity / 2**20:.0f} MiB left "
                f"({self.usage()}); raise arena_bytes, lower n_ctx / n_slots, or use a smaller model")
        ptr = self.base + self.used
        self.used += size
        self.peak = max(self.peak, self.used)
        self.tags[tag] += size
        return ptr

    def usage(self) -> str:
        parts = ", ".join(f"{t} {b / 2**20:.1f} MiB" for t, b in sorted(self.tags.items()))
        return f"{self.used / 2**20:.1f}/{self.capacity / 2**20:.0f} MiB used: {parts or 'empty'}"

    def free(self) -> None:
        if self.base:
            self.cu.cuMemFree(self.base)
            self.base = 0


@dataclass(eq=False)
class Block:
    """An arena range owned by the pool; returned to it when the last reference goes."""

    ptr: int
    nbytes: int
    pool: BufferPool

    def __del__(self) -> None:
        self.pool._release(self)


class BufferPool:
    """Recycled activation buffers from a `DeviceArena`, in power-of-two size classes."""

    def __init__(self, arena: DeviceArena, tag: str = "activations"):
        self.arena = arena
        self.tag = tag
        self.free_lists: dict[int, list[int]] = defaultdict(list)
        self.live = 0  # blocks handed out and not yet returned

    @staticmethod
    def size_class(nbytes: int) -> int:
        return max(ALIGN, 1 << (max(int(nbytes), 1) - 1).bit_length())

    def take(self, nbytes: int) -> Block:
        size = self.size_class(nbytes)
        free = self.free_lists[size]
        ptr = free.pop() if free else self.arena.alloc(size, self.tag)
        self.live += 1
        return Block(ptr, size, self)

    def _release(self, block: Block) -> None:
        self.free_lists[block.nbytes].append(block.ptr)
        self.live -= 1


@dataclass(eq=False)
class DeviceBuffer:
    """A typed device array: `shape` elements of `dtype` at `ptr` (row-major, contiguous).

    `owner` keeps the underlying pool block alive (views made by `rows` share it)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: Any = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def rows(self, start: int, stop: int) -> DeviceBuffer:
        """Rows start..stop-1 of a 2-D buffer, as a view."""
        n, width = self.shape
        start, stop, _ = slice(start, stop).indices(n)
        item = np.dtype(self.dtype).itemsize
        return DeviceBuffer(self.ptr + start * width * item, (stop - start, width), self.dtype,
                            self.owner if self.owner is not None else self)
