"""gpu.cuda: the checking helper, its hints, and device opening, against the fake driver."""

from __future__ import annotations

import pytest

from ukgpu.gpu.cuda.driver import CudaError, Driver, check, open_device
from ukgpu.llama_core.errors import UkgpuError

from fakes.cuda_driver import CUresult, FakeDevice, FakeDriver


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


def _driver_calls() -> set[str]:
    """Every cu* driver function the gpu package calls through `Driver`."""
    import re
    from pathlib import Path

    import ukgpu.gpu.cuda as pkg

    calls = set()
    for path in Path(pkg.__path__[0]).glob("*.py"):
        calls |= set(re.findall(r"\bcu\.(cu[A-Z]\w+)\(", path.read_text()))
    return calls


def test_the_fake_matches_the_real_bindings_surface():
    """Each driver call ukgpu makes exists in cuda-python with the same number of parameters as
    in the fake, and the enum values the fake hands out are the real ones."""
    import inspect
    import re

    real = pytest.importorskip("cuda.bindings.driver")
    calls = _driver_calls()
    assert {"cuLaunchKernel", "cuStreamBeginCapture", "cuGraphLaunch", "cuModuleLoadDataEx"} <= calls
    fake = FakeDriver()
    for name in sorted(calls):
        doc = getattr(real, name).__doc__.strip().splitlines()[0]
        params = re.match(rf"{name}\((.*)\)", doc)[1]
        n_real = len([p for p in params.split(",") if p.strip()])
        n_fake = len(inspect.signature(getattr(fake, name)).parameters)
        assert n_real == n_fake, f"{name}: real {n_real} params, fake {n_fake}"
    assert int(real.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) == \
        fake.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    assert int(real.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) == \
        fake.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert int(real.CUjit_option.CU_JIT_ERROR_LOG_BUFFER) == fake.CUjit_option.CU_JIT_ERROR_LOG_BUFFER
    assert int(real.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) == \
        fake.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    for code in CUresult:
        assert int(getattr(real.CUresult, code.name)) == int(code)
