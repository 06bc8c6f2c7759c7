"""A fixed-size host memory arena: one anonymous mapping carved once, then handed out.

In the guest all large working buffers (the KV cache, scratch activations) come
from one arena sized at boot (`ukgpu.arena=` on the kernel command line, or
derived from the model), so running out is one clear error at a known point
instead of the kernel's OOM killer later.

    arena = Arena(parse_size("512M"))
    k = arena.alloc((n_layer, n_ctx, n_kv, head_dim), np.float32)   # an ndarray view
    arena.free(k)
    arena.used, arena.peak, arena.largest_free()

`Arena.alloc(shape, dtype) -> np.ndarray` is the allocator callable the CPU
backend takes for its KV cache (`llama_core.backend.Allocator`: a zeroed
array).  Only bytes that were handed out before are cleared: the mapping's
never-touched pages already read as zero, so a big first allocation commits no
memory until it is written.  `empty()` skips the clearing.
Every block starts on a 64-byte boundary (a cache line, and enough for any
SIMD load).  Placement is first fit over an offset-ordered free list; freeing
merges with free neighbours, so alloc/free in any order cannot leak space.
"""

from __future__ import annotations

import bisect
import mmap
import re
import threading
from dataclasses import dataclass

import numpy as np

from ukgpu.llama_core.errors import UkgpuError

ALIGN = 64
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ArenaExhausted(UkgpuError):
    """An allocation does not fit in the arena."""


class ArenaError(UkgpuError):
    """An arena was misused: bad size, or freeing something it did not hand out."""


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5g', '4096', '64KiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
    if not match:
        raise ArenaError(f"cannot read the size {text!r}: write e.g. 512M, 2G or 1073741824")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f}{unit}iB".replace(".0", "")
    return f"{n} B"


def _round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass
class _Block:
    offset: int
    size: int


class Arena:
    def __init__(self, size: int):
        if size <= 0:
            raise ArenaError(f"arena size must be positive, not {size}")
        self.size = _round_up(size, mmap.PAGESIZE)
        self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)  # (size,)
        self._base = self._bytes.ctypes.data
        self._free: list[_Block] = [_Block(0, self.size)]  # sorted by offset, never adjacent
        self._live: dict[int, int] = {}  # offset -> size
        self._lock = threading.Lock()
        self.used = 0
        self.peak = 0
        self._touched = 0  # bytes past this were never handed out: still zero

    def alloc(self, shape: tuple[int, ...] | int, dtype=np.float32) -> np.ndarray:
        """A zeroed C-contiguous array of `shape`/`dtype` inside the arena.

        Only the part below the high-water mark of earlier blocks is cleared: the pages past it
        were never handed out and are still the kernel's zero pages (clearing them would fault
        every page in: ~4 s for a 180 MiB KV cache under TCG)."""
        out, clean_from = self._take_array(shape, dtype)
        offset = out.ctypes.data - self._base
        self._bytes[offset:min(offset + out.nbytes, clean_from)] = 0
        return out

    def empty(self, shape: tuple[int, ...] | int, dtype=np.float32) -> np.ndarray:
        """Like `alloc`, but the contents are whatever the block held before."""
        return self._take_array(shape, dtype)[0]

    def _take_array(self, shape: tuple[int, ...] | int, dtype) -> tuple[np.ndarray, int]:
        """A block as an array, and the high-water mark before it was taken (bytes at or past
        that offset were never handed out: still zero)."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        need = _round_up(max(nbytes, 1))
        with self._lock:
            offset = self._take(need)
            if offset is None:
                raise ArenaExhausted(self._exhausted_message(need, shape, dtype))
            self._live[offset] = need
            clean_from = self._touched
            self._touched = max(self._touched, offset + need)
            self.used += need
            self.peak = max(self.peak, self.used)
        return self._bytes[offset:offset + nbytes].view(dtype).reshape(shape), clean_from

    def free(self, array: np.ndarray) -> None:
        """Return a block obtained from `alloc` (the array itself, not a slice of it)."""
        offset = array.__array_interface__["data"][0] - self._base
        with self._lock:
            size = self._live.pop(offset, None)
            if size is None:
                raise ArenaError("free() got an array that is not the start of a live arena "
                                 "block: pass the array alloc() returned, once")
            self.used -= size
            self._give_back(_Block(offset, size))

    def largest_free(self) -> int:
        with self._lock:
            return max((b.size for b in self._free), default=0)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"size": self.size, "used": self.used, "peak": self.peak,
                    "blocks": len(self._live), "free_blocks": len(self._free),
                    "largest_free": max((b.size for b in self._free), default=0)}

    def _take(self, need: int) -> int | None:
        for i, block in enumerate(self._free):
            if block.size >= need:
                offset = block.offset
                if block.size == need:
                    del self._free[i]
                else:
                    block.offset += need
                    block.size -= need
                return offset
        return None

    def _give_back(self, block: _Block) -> None:
        i = bisect.bisect_left([b.offset for b in self._free], block.offset)
        if i < len(self._free) and block.offset + block.size == self._free[i].offset:
            block.size += self._free[i].size
            del self._free[i]
        if i > 0 and self._free[i - 1].offset + self._free[i - 1].size == block.offset:
            self._free[i - 1].size += block.size
        else:
            self._free.insert(i, block)

    def _exhausted_message(self, need: int, shape: tuple[int, ...], dtype: np.dtype) -> str:
        largest = max((b.size for b in self._free), default=0)
        why = ("fragmented: enough bytes are free but not in one piece"
               if self.size - self.used >= need else "not enough free space")
        return (f"the {format_size(self.size)} arena cannot fit {format_size(need)} "
                f"({dtype.name} array of shape {shape}): {format_size(self.used)} in use, "
                f"largest free block {format_size(largest)} ({why}); raise the arena with "
                f"ukgpu.arena=<size> on the kernel command line (`ukgpu boot --arena 2G`) "
                f"or lower the context length / slot count")
