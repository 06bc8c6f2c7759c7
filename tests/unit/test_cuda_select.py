"""Backend selection: probe, forced cuda errors, and the auto fallback to the CPU with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.driver import CudaError
from ukgpu.gpu.cuda.backend import CudaBackend, CudaUnsupported, probe, select_backend
from fakes.tiny_models import SHAPES, write_model
from fakes.cuda_driver import FakeDevice, FakeDriver
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_gguf(write_model(tmp_path_factory.mktemp("sel") / "t.gguf", SHAPES["tiny-llama"]))


def test_probe_ok_names_the_gpu_and_the_kernel_artifacts():
    ok, reason = probe(driver=FakeDriver())
    assert ok
    assert "H100" in reason and "sm_90" in reason and "cubin sm_90a" in reason


def test_probe_on_an_ada_gpu_uses_the_sm80_ptx():
    ok, reason = probe(driver=FakeDriver(devices=[FakeDevice(name="L4", cc=(8, 9))]))
    assert ok and "ptx sm_80" in reason


@pytest.mark.parametrize("fake, words", [
    (FakeDriver(library_missing=True), "libcuda"),
    (FakeDriver(devices=[]), "CUDA_ERROR_NO_DEVICE"),
    (FakeDriver(devices=[FakeDevice(name="T4", cc=(7, 5))]), "sm_80 or newer"),
])
def test_probe_says_why_not(fake, words):
    ok, reason = probe(driver=fake)
    assert not ok and words in reason


def test_probe_on_the_real_bindings_here_is_an_answer_not_a_crash():
    ok, reason = probe()
    assert isinstance(ok, bool) and reason  # no GPU on CI: False with the driver's reason


def test_auto_falls_back_to_cpu_with_one_line(tiny):
    be, line = select_backend("auto", tiny, driver=FakeDriver(library_missing=True))
    assert isinstance(be, CpuBackend)
    assert line.startswith("backend: cpu (CUDA unavailable:") and "\n" not in line


def test_auto_falls_back_when_a_ptx_module_fails_to_load(tiny):
    fake = FakeDriver(devices=[FakeDevice(cc=(8, 6))], fail={"cuModuleLoadDataEx": "CUDA_ERROR_INVALID_PTX"})
    be, line = select_backend("auto", tiny, driver=fake, arena_bytes=32 << 20)
    assert isinstance(be, CpuBackend) and "CUDA_ERROR_INVALID_PTX" in line and "JIT log" in line


def test_forced_cuda_raises_instead(tiny):
    with pytest.raises(CudaError, match="CUDA_ERROR_NO_DEVICE"):
        select_backend("cuda", tiny, driver=FakeDriver(devices=[]))
    fake = FakeDriver(fail={"cuModuleLoadData": "CUDA_ERROR_INVALID_IMAGE",
                            "cuModuleLoadDataEx": "CUDA_ERROR_INVALID_PTX"})
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_PTX.*refused before it: sm_90a cubin: "
                                        "CUDA_ERROR_INVALID_IMAGE.*ptx build"):
        select_backend("cuda", tiny, driver=fake, arena_bytes=32 << 20)


def test_a_refused_cubin_falls_through_to_its_ptx(tiny, capsys):
    fake = FakeDriver(fail={"cuModuleLoadData": "CUDA_ERROR_NO_BINARY_FOR_GPU"})
    be, line = select_backend("cuda", tiny, driver=fake, arena_bytes=32 << 20)
    assert line.startswith("backend: cuda")
    kinds = {(k["target"], k["kind"]) for k in be.kernels.describe()}
    assert kinds == {("sm_90a", "ptx")}  # the arch-specific PTX comes before the portable one
    err = capsys.readouterr().err
    assert err.count("the driver refused sm_90a cubin (CUDA_ERROR_NO_BINARY_FOR_GPU)") == 1
    be.close()


def test_auto_picks_cuda_when_everything_loads_and_preloads_the_model_kernels(tiny):
    fake = FakeDriver()
    be, line = select_backend("auto", tiny, driver=fake, arena_bytes=32 << 20)
    assert isinstance(be, CudaBackend) and line.startswith("backend: cuda (GPU 0:")
    loaded = {name for name, _, _ in fake.loaded}
    assert {"attn_decode_d64", "attn_combine_d64", "rope_norm_d64", "embedding_q8_0",
            "gemm_f16", "matvec_q5_0_b1"} <= loaded
    before = len(fake.loaded)
    model = Model(tiny, be)
    model.forward(np.array([1, 2, 3]), 0, model.new_kv(8))
    assert len(fake.loaded) == before  # nothing left to load at run time


def test_cpu_requested(tiny):
    be, line = select_backend("cpu", tiny, driver=FakeDriver())
    assert isinstance(be, CpuBackend) and line == "backend: cpu (requested)"


def test_an_unsupported_model_falls_back(tiny, monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(tiny, "config", replace(tiny.config, head_dim=80))
    be, line = select_backend("auto", tiny, driver=FakeDriver(), arena_bytes=32 << 20)
    assert isinstance(be, CpuBackend) and "head_dim 80" in line
    with pytest.raises(CudaUnsupported):
        select_backend("cuda", tiny, driver=FakeDriver(), arena_bytes=32 << 20)


def test_model_too_big_for_the_device(tiny):
    fake = FakeDriver(devices=[FakeDevice(total_bytes=64 << 20)])
    with pytest.raises(CudaError, match="GiB is free"):
        select_backend("cuda", tiny, driver=fake)
