"""Backend choice (`llama_core.backend_choice.open_backend`): the CUDA probe, forced cuda errors,
the auto fallback to the CPU with a reason, the guest's PCI check, the run-time CPU fallback
rule, and the one-way imports of the CUDA backend's modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from ukgpu.gpu.cuda.backend import CudaBackend, CudaUnsupported
from ukgpu.gpu.cuda.driver import CudaError
from ukgpu.gpu.cuda.select import probe
from ukgpu.llama_core.backend_choice import BackendChoiceError, cpu_fallback, open_backend
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model

from fakes.cuda_driver import FakeDevice, FakeDriver
from fakes.tiny_models import SHAPES, write_model

sys.path.insert(0, str(Path(__file__).parents[1] / "data" / "sysfs"))
import sysfs_tree  # noqa: E402


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
    be, line = open_backend("auto", tiny, driver=FakeDriver(library_missing=True))
    assert isinstance(be, CpuBackend)
    assert line.startswith("backend: cpu (CUDA unavailable:") and "\n" not in line


def test_auto_falls_back_when_a_ptx_module_fails_to_load(tiny):
    fake = FakeDriver(devices=[FakeDevice(cc=(8, 6))], fail={"cuModuleLoadDataEx": "CUDA_ERROR_INVALID_PTX"})
    be, line = open_backend("auto", tiny, driver=fake, arena_bytes=32 << 20)
    assert isinstance(be, CpuBackend) and "CUDA_ERROR_INVALID_PTX" in line and "JIT log" in line


def test_forced_cuda_raises_instead(tiny):
    with pytest.raises(CudaError, match="CUDA_ERROR_NO_DEVICE"):
        open_backend("cuda", tiny, driver=FakeDriver(devices=[]))
    fake = FakeDriver(fail={"cuModuleLoadData": "CUDA_ERROR_INVALID_IMAGE",
                            "cuModuleLoadDataEx": "CUDA_ERROR_INVALID_PTX"})
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_PTX.*refused before it: sm_90a cubin: "
                                        "CUDA_ERROR_INVALID_IMAGE.*ptx build"):
        open_backend("cuda", tiny, driver=fake, arena_bytes=32 << 20)


def test_a_refused_cubin_falls_through_to_its_ptx(tiny, capsys):
    fake = FakeDriver(fail={"cuModuleLoadData": "CUDA_ERROR_NO_BINARY_FOR_GPU"})
    be, line = open_backend("cuda", tiny, driver=fake, arena_bytes=32 << 20)
    assert line.startswith("backend: cuda")
    kinds = {(k["target"], k["kind"]) for k in be.kernels.describe()}
    assert kinds == {("sm_90a", "ptx")}  # the arch-specific PTX comes before the portable one
    err = capsys.readouterr().err
    assert err.count("the driver refused sm_90a cubin (CUDA_ERROR_NO_BINARY_FOR_GPU)") == 1
    be.close()


def test_auto_picks_cuda_when_everything_loads_and_preloads_the_model_kernels(tiny):
    fake = FakeDriver()
    be, line = open_backend("auto", tiny, driver=fake, arena_bytes=32 << 20)
    assert isinstance(be, CudaBackend) and line.startswith("backend: cuda (GPU 0:")
    loaded = {name for name, _, _ in fake.loaded}
    assert {"attn_decode_d64", "attn_combine_d64", "rope_norm_d64", "embedding_q8_0",
            "gemm_f16", "matvec_q5_0_b1"} <= loaded
    before = len(fake.loaded)
    model = Model(tiny, be)
    model.forward(np.array([1, 2, 3]), 0, model.new_kv(8))
    assert len(fake.loaded) == before  # nothing left to load at run time


def test_cpu_requested(tiny):
    be, line = open_backend("cpu", tiny, driver=FakeDriver())
    assert isinstance(be, CpuBackend) and line == "backend: cpu (requested)"


def test_an_unsupported_model_falls_back(tiny, monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(tiny, "config", replace(tiny.config, head_dim=80))
    be, line = open_backend("auto", tiny, driver=FakeDriver(), arena_bytes=32 << 20)
    assert isinstance(be, CpuBackend) and "head_dim 80" in line
    with pytest.raises(CudaUnsupported):
        open_backend("cuda", tiny, driver=FakeDriver(), arena_bytes=32 << 20)


def test_model_too_big_for_the_device(tiny):
    fake = FakeDriver(devices=[FakeDevice(total_bytes=16 << 20)])  # the arena wants ~25 MB
    with pytest.raises(CudaError, match="GiB is free"):
        open_backend("cuda", tiny, driver=fake)


def test_an_unknown_kind_is_refused():
    with pytest.raises(BackendChoiceError, match="'cpu', 'auto' or 'cuda'"):
        open_backend("tpu", None)


def test_the_cpu_backend_takes_its_kv_cache_from_alloc(tiny):
    """The guest's arena: the CPU backend, requested or fallen back to, allocates through it."""
    made = []

    def alloc(shape, dtype):
        made.append(shape)
        return np.zeros(shape, dtype)

    for kind, driver in (("cpu", FakeDriver()), ("auto", FakeDriver(library_missing=True))):
        be, _ = open_backend(kind, tiny, alloc=alloc, driver=driver)
        Model(tiny, be).new_kv(8)
    assert len(made) == 4  # keys and values, twice


@pytest.fixture
def sysfs(tmp_path):
    def machine(*names):
        root = tmp_path / "sys"
        for name in names:
            sysfs_tree.materialize(name, root)
        return str(root)
    return machine


def test_no_nvidia_gpu_on_the_pci_bus_means_the_driver_is_never_tried(tiny, sysfs):
    root = sysfs("dev-vm")
    fake = FakeDriver()
    be, line = open_backend("auto", tiny, pci_root=root, driver=fake, arena_bytes=32 << 20)
    assert isinstance(be, CpuBackend) and line == "backend: cpu (no NVIDIA GPU on the PCI bus)"
    assert fake.loaded == []
    with pytest.raises(BackendChoiceError, match="^no NVIDIA GPU on the PCI bus"):
        open_backend("cuda", tiny, pci_root=root, driver=fake)


def test_an_unreadable_pci_bus_is_a_reason_too(tiny, tmp_path):
    be, line = open_backend("auto", tiny, pci_root=str(tmp_path / "nothing"), driver=FakeDriver())
    assert isinstance(be, CpuBackend) and line.startswith("backend: cpu (PCI scan failed: PciError:")


def test_a_gpu_on_the_pci_bus_is_named_when_cuda_cannot_use_it(tiny, sysfs):
    root = sysfs("dev-vm", "h100-guest")
    be, line = open_backend("auto", tiny, pci_root=root, driver=FakeDriver(library_missing=True))
    assert isinstance(be, CpuBackend)
    assert line.startswith("backend: cpu (GPU 0000:00:06.0 found but CUDA is unusable: ")
    assert "libcuda" in line and "\n" not in line
    be, line = open_backend("auto", tiny, pci_root=root, driver=FakeDriver(), arena_bytes=32 << 20)
    assert isinstance(be, CudaBackend) and line.startswith("backend: cuda (GPU 0:")
    be.close()


def test_only_auto_on_a_device_falls_back_to_the_cpu_while_running(tiny):
    gpu, _ = open_backend("cuda", tiny, driver=FakeDriver(), arena_bytes=32 << 20)
    cpu = CpuBackend()
    assert cpu_fallback("cuda", gpu) is None and cpu_fallback("auto", cpu) is None
    made = []
    fallback = cpu_fallback("auto", gpu, alloc=lambda shape, dtype: made.append(shape) or
                            np.zeros(shape, dtype))
    replacement = fallback()
    assert isinstance(replacement, CpuBackend) and replacement is not fallback()
    Model(tiny, replacement).new_kv(8)
    assert len(made) == 2
    gpu.close()


def _cuda_imports(name: str) -> set[str]:
    """The ukgpu.gpu.cuda modules `gpu/cuda/<name>.py` imports, at any level."""
    path = Path(__file__).resolve().parents[2] / "gpu" / "cuda" / f"{name}.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m.rsplit(".", 1)[1] for m in found if m.startswith("ukgpu.gpu.cuda.")}


def test_the_cuda_backend_modules_import_one_way():
    """select -> backend -> graph, never back (not even inside a function): the creator knows
    the backend, the backend knows its graphs, the graphs know neither."""
    assert "backend" in _cuda_imports("select") and "graph" in _cuda_imports("backend")
    assert "select" not in _cuda_imports("backend")
    assert not {"backend", "select"} & _cuda_imports("graph")
