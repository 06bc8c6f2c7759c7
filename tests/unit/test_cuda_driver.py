"""gpu.cuda: the checking helper, its hints, and device opening, against the fake driver."""

from __future__ import annotations

import pytest

from ukgpu.gpu.cuda import CudaError, Driver, check, open_device
from ukgpu.gpu.fake_driver import CUresult, FakeDevice, FakeDriver
from ukgpu.llama_core.errors import UkgpuError


def test_check_returns_nothing_one_value_or_a_tuple():
    fake = FakeDriver()
    assert check(fake, "cuInit", (CUresult.CUDA_SUCCESS,)) is None
    assert check(fake, "cuMemAlloc", (CUresult.CUDA_SUCCESS, 1234)) == 1234
    assert check(fake, "cuMemGetInfo", (CUresult.CUDA_SUCCESS, 1, 2)) == (1, 2)


@pytest.mark.parametrize("err, words", [
    (CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION, "driver too old for this PTX ISA"),
    (CUresult.CUDA_ERROR_OUT_OF_MEMORY, "lower n_ctx"),
    (CUresult.CUDA_ERROR_NO_DEVICE, "pass the GPU through"),
    (CUresult.CUDA_ERROR_INVALID_PTX, "JIT"),
])
def test_errors_name_the_call_the_error_and_what_to_do(err, words):
    with pytest.raises(CudaError) as info:
        check(FakeDriver(), "cuSomething", (err,))
    exc = info.value
    assert isinstance(exc, UkgpuError)
    assert exc.call == "cuSomething" and exc.name == err.name
    assert words in str(exc) and err.name in str(exc)


def test_unknown_error_still_has_its_name():
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_HANDLE"):
        check(FakeDriver(), "cuX", (CUresult.CUDA_ERROR_INVALID_HANDLE,))


def test_missing_driver_library_is_a_clear_cuda_error():
    cu = Driver(FakeDriver(library_missing=True))
    with pytest.raises(CudaError) as info:
        cu.cuInit(0)
    assert info.value.name == "DRIVER_NOT_FOUND"
    assert "libcuda" in str(info.value) and "CPU backend" in str(info.value)


def test_open_device_reports_the_gpu():
    ctx = open_device(0, FakeDriver(devices=[FakeDevice(cc=(9, 0), pci_bus_id="0000:00:06.0")]))
    assert ctx.info.cc == (9, 0)
    line = ctx.info.line()
    assert "sm_90" in line and "0000:00:06.0" in line and "CUDA 13.0" in line
    assert ctx.stream is not None and ctx.free_bytes() > 0


def test_open_device_without_devices_or_with_a_bad_ordinal():
    with pytest.raises(CudaError, match="CUDA_ERROR_NO_DEVICE"):
        open_device(0, FakeDriver(devices=[]))
    with pytest.raises(CudaError, match="ordinal below 1"):
        open_device(3, FakeDriver())


def test_cuinit_failure_propagates():
    with pytest.raises(CudaError, match="cuInit failed: CUDA_ERROR_NOT_INITIALIZED"):
        open_device(0, FakeDriver(fail={"cuInit": "CUDA_ERROR_NOT_INITIALIZED"}))
