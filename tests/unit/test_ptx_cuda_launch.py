"""The cuda-python launch path (ptx_kernels/cuda_launch.py) against a recording stand-in driver:
artifact choice per compute capability, NUL-terminated PTX, the shared-memory opt-in, and the
exact cuLaunchKernel arguments taken from the manifest."""

import ctypes
import types

import pytest

from ukgpu.ptx_kernels.cuda_launch import CudaLaunchError, CudaRunner


class FakeDriver:
    """Records calls; every call succeeds (CUresult 0) unless told to fail."""

    CUdevice_attribute = types.SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="major",
                                               CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="minor")
    CUfunction_attribute = types.SimpleNamespace(
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="maxshared")

    def __init__(self, cc, fail=()):
        self.cc, self.fail, self.calls, self.images = cc, set(fail), [], []

    def _ret(self, name, *values):
        self.calls.append(name)
        return (1 if name in self.fail else 0, *values)

    def cuInit(self, flags):
        return self._ret("cuInit")

    def cuDeviceGet(self, i):
        return self._ret("cuDeviceGet", i)

    def cuDevicePrimaryCtxRetain(self, dev):
        return self._ret("cuDevicePrimaryCtxRetain", "ctx")

    def cuCtxSetCurrent(self, ctx):
        return self._ret("cuCtxSetCurrent")

    def cuDeviceGetAttribute(self, attr, dev):
        return self._ret("cuDeviceGetAttribute", self.cc[0 if attr == "major" else 1])

    def cuGetErrorName(self, err):
        return (0, b"CUDA_ERROR_FAKE")

    def cuModuleLoadData(self, address):
        # read the image back from the address, as the driver would: up to the first NUL for PTX
        head = ctypes.string_at(address, 16)
        self.images.append(head)
        return self._ret("cuModuleLoadData", "module")

    def cuModuleGetFunction(self, module, name):
        self.function_name = name
        return self._ret("cuModuleGetFunction", "fn")

    def cuFuncSetAttribute(self, fn, attr, value):
        self.shared_opt_in = (attr, value)
        return self._ret("cuFuncSetAttribute")

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        self.launch = dict(grid=(gx, gy, gz), block=(bx, by, bz), shared=shared, params=params)
        return self._ret("cuLaunchKernel")


def test_h100_gets_the_cubin_and_the_manifest_launch():
    drv = FakeDriver((9, 0))
    run = CudaRunner(driver=drv)
    vals = {"w_q": 0x1000, "w_s": 0x2000, "w_m": 0x3000, "x": 0x4000, "y": 0x5000,
            "N": 4096, "K": 4096, "B": 1}
    run.launch("matvec_q4_k_b1", vals)
    assert run.loaded_kinds["matvec_q4_k_b1"] == "sm_90a/cubin"
    assert drv.images[0].startswith(b"\x7fELF")
    assert drv.function_name == b"matvec_kernel"
    entry = run.manifests.entry("matvec_q4_k_b1", "sm_90a")
    assert drv.launch["grid"] == (4096 // entry.constexprs["BLOCK_N"], 1, 1)
    assert drv.launch["block"] == (entry.data["threads_per_block"], 1, 1)
    assert drv.launch["shared"] == entry.shared_bytes
    values, ctypes_types = drv.launch["params"]
    assert values == (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 4096, 4096, 1, 0, 0)
    assert ctypes_types[0] is ctypes.c_void_p and ctypes_types[5] is ctypes.c_int32


def test_other_gpus_get_nul_terminated_sm80_ptx_and_big_shared_is_opted_in():
    drv = FakeDriver((8, 6))
    run = CudaRunner(driver=drv)
    run.function("attn_prefill_d128")
    assert run.loaded_kinds["attn_prefill_d128"] == "sm_80/ptx"
    assert drv.images[0].startswith(b"//")
    entry = run.manifests.entry("attn_prefill_d128", "sm_80")
    assert entry.shared_bytes > 48 * 1024
    assert drv.shared_opt_in == ("maxshared", entry.shared_bytes)


def test_forced_ptx_target_and_driver_errors_are_typed():
    run = CudaRunner(driver=FakeDriver((9, 0)), ptx_target="sm_80")
    run.function("add_f32")
    assert run.loaded_kinds["add_f32"] == "sm_80/ptx"
    with pytest.raises(CudaLaunchError, match="cuModuleLoadData.*CUDA_ERROR_FAKE"):
        CudaRunner(driver=FakeDriver((9, 0), fail={"cuModuleLoadData"})).function("add_f32")
    with pytest.raises(CudaLaunchError, match="cuInit"):
        CudaRunner(driver=FakeDriver((9, 0), fail={"cuInit"}))


def test_the_loaded_image_is_the_selected_artifact():
    drv = FakeDriver((9, 0))
    run = CudaRunner(driver=drv)
    run.function("rmsnorm_f32")
    assert drv.images[0] == run.manifests.select("rmsnorm_f32", (9, 0)).path.read_bytes()[:16]
