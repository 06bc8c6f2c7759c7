"""gpu.cuda.modules against the committed kernel manifests and the fake driver: artifact choice,
the image handed to the driver (the selected artifact's bytes, PTX NUL-terminated), dynamic
shared memory opt-in, the exact cuLaunchKernel arguments, JIT failures and their logs, launch
limits."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from ukgpu.gpu.cuda.arena import DeviceArena
from ukgpu.gpu.cuda.driver import CudaError, open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.ptx_kernels.loader import STATIC_SHARED_LIMIT, KernelManifestError, Manifests

from fakes.cuda_driver import CUresult, FakeDevice, FakeDriver, read_param_array

MANIFESTS = Manifests.load()


def kernel_set(**device) -> tuple[KernelSet, FakeDriver]:
    fake = FakeDriver(devices=[FakeDevice(**device)])
    return KernelSet(open_device(0, fake), MANIFESTS), fake


def record(fake: FakeDriver, monkeypatch, call: str, answer: tuple | None = None) -> list[tuple]:
    """The arguments of every `call` the fake receives from now on; with `answer`, the call
    is not carried out and returns that instead."""
    seen, real = [], getattr(fake, call)

    def spy(*args):
        seen.append(args)
        return answer if answer is not None else real(*args)

    monkeypatch.setattr(fake, call, spy)
    return seen


def test_h100_gets_the_sm90a_cubin_and_others_the_sm80_ptx():
    ks, fake = kernel_set(cc=(9, 0))
    ks.kernel("matvec_q4_k_b1")
    assert fake.loaded == [("matvec_q4_k_b1", "sm_90a", "cubin")]
    ks, fake = kernel_set(cc=(8, 9))
    ks.kernel("matvec_q4_k_b1")
    assert fake.loaded == [("matvec_q4_k_b1", "sm_80", "ptx")]
    assert ks.describe() == [{"entry": "matvec_q4_k_b1", "target": "sm_80", "kind": "ptx", "pdl": False}]


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
    types = tuple(p.ctype for p in e.params)
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
    ks.ctx.sync()  # the copy below is on the legacy stream: it does not wait for ours
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


def test_a_faulting_launch_fails_at_the_next_sync():
    ks, fake = kernel_set()
    ks.launch("add_f32", {"a": 0x10, "b": 0x10, "out": 0x10, "n": 16})  # unmapped addresses
    with pytest.raises(CudaError, match="CUDA_ERROR_ILLEGAL_ADDRESS"):
        ks.ctx.sync()  # as on hardware: the fault surfaces at the sync, without a kernel name
    assert fake.last_fault.startswith("add_f32:")


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
    ks.kernel("add_f32")
    assert fake.loaded == [("gemm_q4_k", "sm_80", "ptx"), ("add_f32", "sm_80", "ptx")]
    assert {k["target"] + "/" + k["kind"] for k in ks.describe()} == {"sm_80/ptx"}


def test_h100_launch_is_the_cubin_with_the_manifest_arguments(monkeypatch):
    ks, fake = kernel_set(cc=(9, 0))
    names = record(fake, monkeypatch, "cuModuleGetFunction")
    launches = record(fake, monkeypatch, "cuLaunchKernel", answer=(CUresult.CUDA_SUCCESS,))
    vals = {"w_q": 0x1000, "w_s": 0x2000, "w_m": 0x3000, "x": 0x4000, "y": 0x5000,
            "N": 4096, "K": 4096, "B": 1}
    ks.launch("matvec_q4_k_b1", vals)
    assert ks.describe() == [{"entry": "matvec_q4_k_b1", "target": "sm_90a", "kind": "cubin", "pdl": True}]
    assert names[0][1] == b"matvec_kernel"
    entry = MANIFESTS.entry("matvec_q4_k_b1", "sm_90a")
    fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra = launches[0]
    assert (gx, gy, gz) == (4096 // entry.constexprs["BLOCK_N"], 1, 1)
    assert (bx, by, bz) == (entry.data["threads_per_block"], 1, 1)
    assert shared == entry.shared_bytes and stream is ks.ctx.stream and extra == 0
    assert isinstance(params, int)  # a packed void** array, as the driver reads it
    values, ctypes_types = read_param_array(params, entry.data["params"])
    assert values == (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 4096, 4096, 1, 0, 0)
    assert ctypes_types[0] is ctypes.c_void_p and ctypes_types[5] is ctypes.c_int32
    assert fake.pdl_launches == 1  # through cuLaunchKernelEx with the PDL attribute (test_cuda_pdl.py)


def test_a_value_its_parameter_cannot_hold_is_a_clear_error():
    ks, _ = kernel_set(cc=(9, 0))
    vals = {"w_q": 0x1000, "w_s": 0x2000, "w_m": 0x3000, "x": 0x4000, "y": 0x5000, "K": 4096, "B": 1}
    with pytest.raises(KernelManifestError, match="do not fit"):
        ks.launch("matvec_q4_k_b1", vals | {"N": 2**31})


def test_each_thread_packs_into_its_own_parameter_array():
    ks, _ = kernel_set(cc=(9, 0))
    k = ks.kernel("add_f32")
    mine = ks._packer(k)
    theirs = []
    worker = threading.Thread(target=lambda: theirs.append(ks._packer(k)))
    worker.start()
    worker.join()
    assert ks._packer(k) is mine and theirs[0] is not mine and theirs[0].address != mine.address


def test_the_loaded_image_is_the_selected_artifact(monkeypatch):
    ks, fake = kernel_set(cc=(9, 0))
    images = record(fake, monkeypatch, "cuModuleLoadData")
    ks.kernel("rmsnorm_f32")
    assert bytes(images[0][0]) == MANIFESTS.select("rmsnorm_f32", (9, 0)).path.read_bytes()
    assert bytes(images[0][0]).startswith(b"\x7fELF")


def test_other_gpus_get_nul_terminated_sm80_ptx_and_big_shared_is_opted_in(monkeypatch):
    ks, fake = kernel_set(cc=(8, 6))
    images = record(fake, monkeypatch, "cuModuleLoadDataEx")
    opt_in = record(fake, monkeypatch, "cuFuncSetAttribute")
    ks.kernel("attn_prefill_d128")
    assert ks.describe() == [{"entry": "attn_prefill_d128", "target": "sm_80", "kind": "ptx", "pdl": False}]
    art = MANIFESTS.select("attn_prefill_d128", (8, 6))
    assert bytes(images[0][0]) == art.path.read_bytes() + b"\0" and art.path.read_bytes()[:2] == b"//"
    entry = MANIFESTS.entry("attn_prefill_d128", "sm_80")
    assert entry.shared_bytes > STATIC_SHARED_LIMIT
    attr = fake.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert [(a, v) for _, a, v in opt_in] == [(attr, entry.shared_bytes)]


def test_a_failing_module_load_is_a_typed_error_naming_the_call():
    """(a failing cuInit: test_cuda_driver.py)"""
    fake = FakeDriver(fail={"cuModuleLoadData": "CUDA_ERROR_INVALID_VALUE"})
    with pytest.raises(CudaError, match="cuModuleLoadData failed: CUDA_ERROR_INVALID_VALUE"):
        KernelSet(open_device(0, fake), MANIFESTS).kernel("add_f32")
