"""gpu.cuda_modules against the committed kernel manifests and the fake driver: artifact choice,
dynamic shared memory opt-in, argument packing, JIT failures and their logs, launch limits."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ukgpu.gpu.cuda.driver import CudaError, open_device
from ukgpu.gpu.cuda.arena import DeviceArena
from ukgpu.gpu.cuda.modules import STATIC_SHARED_LIMIT, KernelSet
from fakes.cuda_driver import FakeDevice, FakeDriver
from ukgpu.ptx_kernels.loader import KernelManifestError, Manifests

MANIFESTS = Manifests.load()


def kernel_set(**device) -> tuple[KernelSet, FakeDriver]:
    fake = FakeDriver(devices=[FakeDevice(**device)])
    return KernelSet(open_device(0, fake), MANIFESTS), fake


def test_h100_gets_the_sm90a_cubin_and_others_the_sm80_ptx():
    ks, fake = kernel_set(cc=(9, 0))
    ks.kernel("matvec_q4_k_b1")
    assert fake.loaded == [("matvec_q4_k_b1", "sm_90a", "cubin")]
    ks, fake = kernel_set(cc=(8, 9))
    ks.kernel("matvec_q4_k_b1")
    assert fake.loaded == [("matvec_q4_k_b1", "sm_80", "ptx")]
    assert ks.describe() == [{"entry": "matvec_q4_k_b1", "target": "sm_80", "kind": "ptx"}]


def test_pre_ampere_has_no_artifact():
    ks, _ = kernel_set(cc=(7, 5))
    with pytest.raises(KernelManifestError, match="compute capability 7.5"):
        ks.kernel("add_f32")


def test_modules_load_once():
    ks, fake = kernel_set()
    for _ in range(3):
        ks.kernel("add_f32")
    assert len(fake.loaded) == 1


def test_large_dynamic_shared_memory_is_opted_in():
    big = [n for n in MANIFESTS.names() if MANIFESTS.entry(n).shared_bytes > STATIC_SHARED_LIMIT]
    small = [n for n in MANIFESTS.names() if MANIFESTS.entry(n).shared_bytes <= STATIC_SHARED_LIMIT]
    assert big and small  # the committed manifests have both kinds
    ks, _ = kernel_set()
    assert ks.kernel(big[0]).function.max_dynamic_shared == MANIFESTS.entry(big[0]).shared_bytes
    assert ks.kernel(small[0]).function.max_dynamic_shared == STATIC_SHARED_LIMIT


def test_fake_rejects_a_big_kernel_without_the_opt_in():
    ks, fake = kernel_set()
    name = next(n for n in MANIFESTS.names() if MANIFESTS.entry(n).shared_bytes > STATIC_SHARED_LIMIT)
    k = ks.kernel(name)
    k.function.max_dynamic_shared = STATIC_SHARED_LIMIT  # as if the attribute had not been set
    e = k.entry
    values = tuple(0 for _ in e.params)
    types = tuple(ctypes.c_void_p if p.is_pointer else ctypes.c_int32 if p.type == "i32"
                  else ctypes.c_float for p in e.params)
    res = fake.cuLaunchKernel(k.function, 1, 1, 1, *e.block, e.shared_bytes, ks.ctx.stream,
                              (values, types), 0)
    assert res[0].name == "CUDA_ERROR_INVALID_VALUE"


def test_launch_packs_arguments_in_manifest_order_with_hidden_zeros():
    ks, fake = kernel_set()
    arena = DeviceArena(ks.cu, 1 << 20)
    n = 3000
    a, b = np.arange(n, dtype=np.float32), np.full(n, 0.5, dtype=np.float32)
    pa, pb, out = (arena.alloc(4 * n) for _ in range(3))
    ks.cu.cuMemcpyHtoD(pa, a.ctypes.data, 4 * n)
    ks.cu.cuMemcpyHtoD(pb, b.ctypes.data, 4 * n)
    ks.launch("add_f32", {"out": out, "n": n, "b": pb, "a": pa})  # any dict order
    got = np.empty(n, np.float32)
    ks.cu.cuMemcpyDtoH(got.ctypes.data, out, 4 * n)
    np.testing.assert_array_equal(got, a + b)
    entry = MANIFESTS.entry("add_f32")
    launch = entry.launch({"out": out, "n": n, "b": pb, "a": pa})
    values, types = launch.ctypes_args()
    assert values[:4] == (pa, pb, out, n) and values[4:] == (0, 0)
    assert [p.hidden for p in entry.params][-2:] == [True, True]
    assert launch.grid == (-(-n // 1024), 1, 1) and fake.launches == ["add_f32"]


def test_launch_limits_are_enforced_before_the_driver_sees_them():
    ks, fake = kernel_set()
    with pytest.raises(KernelManifestError, match="K % 256 == 0"):
        ks.launch("gemm_q4_k", {"w_q": 0, "w_s": 0, "w_m": 0, "x": 0, "y": 0, "M": 4, "N": 8, "K": 100})
    assert fake.launches == []


def test_ptx_jit_failure_carries_the_jit_log():
    fake = FakeDriver(devices=[FakeDevice(cc=(8, 9))], fail={"cuModuleLoadDataEx": "CUDA_ERROR_INVALID_PTX"})
    ks = KernelSet(open_device(0, fake), MANIFESTS)
    with pytest.raises(CudaError) as info:
        ks.kernel("add_f32")
    msg = str(info.value)
    assert "CUDA_ERROR_INVALID_PTX" in msg and "add_f32.ptx" in msg
    assert "JIT log: ptxas fatal" in msg


def test_old_driver_rejects_the_ptx_isa_with_the_hint():
    ks, _ = kernel_set(cc=(8, 9), ptx_isa_max=(7, 8))
    with pytest.raises(CudaError, match="driver too old for this PTX ISA"):
        ks.kernel("add_f32")


def test_a_faulting_launch_names_the_kernel():
    ks, _ = kernel_set()
    with pytest.raises(CudaError, match="CUDA_ERROR_ILLEGAL_ADDRESS.*kernel add_f32"):
        ks.launch("add_f32", {"a": 0x10, "b": 0x10, "out": 0x10, "n": 16})  # unmapped addresses


def test_launch_geometry_is_planned_once_per_scalar_set_but_pointers_are_always_checked():
    ks, fake = kernel_set()
    arena = DeviceArena(ks.cu, 1 << 20)
    a, b, out = (arena.alloc(4096) for _ in range(3))
    ks.launch("add_f32", {"a": a, "b": b, "out": out, "n": 1000})
    ks.launch("add_f32", {"a": b, "b": a, "out": out, "n": 1000})  # same scalars: cached plan
    ks.launch("add_f32", {"a": a, "b": b, "out": out, "n": 8})
    assert len(ks.kernel("add_f32").plans) == 2 and fake.launches == ["add_f32"] * 3
    with pytest.raises(KernelManifestError, match="a % 16 == 0"):
        ks.launch("add_f32", {"a": a + 4, "b": b, "out": out, "n": 1000})
    with pytest.raises(KernelManifestError, match="missing launch value 'out'"):
        ks.launch("add_f32", {"a": a, "b": b, "n": 1000})
    assert len(fake.launches) == 3


def test_forcing_the_portable_ptx():
    fake = FakeDriver()
    ks = KernelSet(open_device(0, fake), MANIFESTS, force_ptx="sm_80")
    ks.kernel("gemm_q4_k")
    assert fake.loaded == [("gemm_q4_k", "sm_80", "ptx")]
