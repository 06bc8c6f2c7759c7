import random
import threading

import numpy as np
import pytest

from ukgpu.kernel.guest.arena import (
    ALIGN,
    Arena,
    ArenaError,
    ArenaExhausted,
    format_size,
    parse_size,
)
from ukgpu.llama_core.errors import UkgpuError


def test_parse_size():
    assert parse_size("512M") == 512 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("64KiB") == 64 << 10
    assert parse_size("4096") == 4096
    with pytest.raises(ArenaError, match="512M"):
        parse_size("lots")


def test_format_size():
    assert format_size(512 << 20) == "512MiB"
    assert format_size(3 << 29) == "1.5GiB"
    assert format_size(100) == "100 B"


def test_alloc_returns_aligned_writable_views_of_the_arena():
    arena = Arena(1 << 20)
    a = arena.alloc((3, 5), np.float32)
    b = arena.alloc(7, np.int8)
    c = arena.alloc((2, 2), np.float64)
    assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    for arr in (a, b, c):
        assert arr.ctypes.data % ALIGN == 0
        assert arr.flags.writeable
    a[:] = 1.5
    b[:] = -1
    c[:] = 2.0
    assert a.sum() == 22.5 and b.sum() == -7 and c.sum() == 8.0  # no overlap
    assert arena.used == 3 * 64  # 60, 7 and 32 bytes, each rounded up to 64


def test_alloc_clears_reused_memory_and_empty_does_not():
    arena = Arena(4096)
    a = arena.alloc(16, np.float32)
    a[:] = 7
    arena.free(a)
    z = arena.alloc(16, np.float32)
    assert z.ctypes.data == a.ctypes.data
    assert not z.any()
    z[:] = 5
    arena.free(z)
    e = arena.empty(16, np.float32)
    assert (e == 5).all()
    fresh = arena.alloc(64, np.float32)  # never handed out before: zero without clearing
    assert not fresh.any()


def test_usage_and_peak():
    arena = Arena(1 << 16)
    blocks = [arena.alloc(1000, np.uint8) for _ in range(4)]  # 1024 each after alignment
    assert arena.used == 4096 and arena.peak == 4096
    for blk in blocks[:3]:
        arena.free(blk)
    assert arena.used == 1024 and arena.peak == 4096
    assert arena.stats()["blocks"] == 1


def test_exhaustion_message_says_sizes_and_how_to_raise():
    arena = Arena(1 << 20)
    arena.alloc((1 << 19,), np.uint8)
    with pytest.raises(ArenaExhausted) as err:
        arena.alloc((1024, 1024), np.float32)
    msg = str(err.value)
    assert isinstance(err.value, UkgpuError)
    assert "1MiB arena" in msg and "4MiB" in msg and "(1024, 1024)" in msg
    assert "ukgpu.arena=" in msg and "--arena" in msg
    assert "not enough free space" in msg


def test_fragmentation_is_reported_and_healed_by_coalescing():
    arena = Arena(8 * 4096)
    blocks = [arena.alloc(4096, np.uint8) for _ in range(8)]
    for blk in blocks[::2]:
        arena.free(blk)
    assert arena.size - arena.used == 4 * 4096
    with pytest.raises(ArenaExhausted, match="fragmented"):
        arena.alloc(2 * 4096, np.uint8)
    for blk in blocks[1::2]:
        arena.free(blk)
    assert arena.stats()["free_blocks"] == 1
    assert arena.largest_free() == arena.size
    whole = arena.alloc(arena.size, np.uint8)
    assert whole.nbytes == arena.size


def test_free_rejects_foreign_arrays_and_double_free():
    arena = Arena(4096)
    a = arena.alloc(64, np.uint8)
    with pytest.raises(ArenaError):
        arena.free(np.zeros(64, np.uint8))
    with pytest.raises(ArenaError):
        arena.free(a[1:])
    arena.free(a)
    with pytest.raises(ArenaError):
        arena.free(a)


def test_random_alloc_free_never_overlaps_or_leaks():
    rng = random.Random(0)
    arena = Arena(1 << 20)
    live: list[np.ndarray] = []
    for step in range(2000):
        if live and (rng.random() < 0.45 or arena.largest_free() < 20000):
            arena.free(live.pop(rng.randrange(len(live))))
        else:
            arr = arena.alloc(rng.randrange(1, 20000), np.uint8)
            arr[:] = step % 251
            live.append(arr)
        spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in live)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    assert all((a == a[0]).all() for a in live)  # nobody overwrote anybody
    for arr in live:
        arena.free(arr)
    assert arena.used == 0 and arena.largest_free() == arena.size


def test_fits_an_alloc_shape_dtype_callable():
    arena = Arena(1 << 20)
    alloc = arena.alloc  # the KV-cache allocator signature: alloc(shape, dtype)
    k = alloc((2, 16, 4, 8), np.float32)
    v = alloc(shape=(2, 16, 4, 8), dtype=np.float16)
    assert k.nbytes == 4096 and v.dtype == np.float16


def test_concurrent_allocations_are_disjoint():
    arena = Arena(1 << 20)
    got: list[np.ndarray] = []

    def worker():
        for _ in range(50):
            got.append(arena.alloc(256, np.uint8))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({a.ctypes.data for a in got}) == 200
    assert arena.used == 200 * 256


def test_alloc_of_fresh_pages_does_not_touch_them():
    """A first alloc (the KV cache at boot) must not write the never-used pages: they are zero
    already, and faulting them in costs seconds under TCG."""
    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    arena = Arena(128 << 20)
    small = arena.alloc(4096, np.uint8)
    small[:] = 1
    arena.free(small)
    before = resident()
    kv = arena.alloc((64 << 20) // 4, np.float32)
    assert resident() - before < (16 << 20)
    assert not kv[:1024].any() and not kv[-1024:].any()
