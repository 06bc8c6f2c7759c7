"""gpu.cuda_arena: one device allocation, aligned carving, exhaustion, recycled activations."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from ukgpu.gpu.cuda.arena import ALIGN, BufferPool, CudaArenaExhausted, DeviceArena, DeviceBuffer
from ukgpu.gpu.cuda.driver import Driver, open_device

from fakes.cuda_driver import FakeDriver


@pytest.fixture
def arena():
    fake = FakeDriver()
    ctx = open_device(0, fake)
    a = DeviceArena(ctx.cu, 1 << 20)
    yield a
    a.free()
    assert not fake.allocs


def test_one_driver_allocation_and_aligned_sub_ranges(arena):
    fake = arena.cu.mod
    ptrs = [arena.alloc(n, "weights") for n in (1, 100, 257, 4096)]
    assert len(fake.allocs) == 1
    assert all(p % ALIGN == 0 for p in ptrs)
    assert ptrs == sorted(ptrs) and len(set(ptrs)) == 4
    assert all(arena.base <= p < arena.base + arena.capacity for p in ptrs)
    assert arena.used == ALIGN + ALIGN + 2 * ALIGN + 4096
    assert arena.peak == arena.used
    assert "weights" in arena.usage()


def test_exhaustion_is_a_clear_error(arena):
    arena.alloc(arena.capacity - 512, "weights")
    with pytest.raises(CudaArenaExhausted, match="raise arena_bytes") as info:
        arena.alloc(1024, "kv cache")
    assert "kv cache needs" in str(info.value)


def test_driver_out_of_memory_when_the_arena_is_too_big():
    ctx = open_device(0, FakeDriver())
    with pytest.raises(Exception, match="OUT_OF_MEMORY"):
        DeviceArena(ctx.cu, 1 << 40)


def test_pool_recycles_buffers_when_the_last_reference_goes(arena):
    pool = BufferPool(arena)
    a = pool.take(1000)
    ptr = a.ptr
    assert a.nbytes == 1024 and pool.live == 1
    used = arena.used
    del a
    gc.collect()
    assert pool.live == 0
    b = pool.take(900)  # same size class: the same block, no new arena space
    assert b.ptr == ptr and arena.used == used
    c = pool.take(5000)
    assert c.ptr != ptr and arena.used > used


def test_row_views_keep_their_block_alive(arena):
    pool = BufferPool(arena)
    block = pool.take(4 * 6 * 8)
    buf = DeviceBuffer(block.ptr, (6, 8), np.dtype(np.float32), block)
    del block
    view = buf.rows(4, 6)
    assert view.shape == (2, 8) and view.ptr == buf.ptr + 4 * 8 * 4
    del buf
    gc.collect()
    assert pool.live == 1  # the view still holds it
    del view
    gc.collect()
    assert pool.live == 0


def test_driver_wrapper_passes_enums_through():
    cu = Driver(FakeDriver())
    assert cu.CUresult.CUDA_SUCCESS == 0
