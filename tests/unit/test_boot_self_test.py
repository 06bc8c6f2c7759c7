"""The guest's boot self-test at its model-loading step (`kernel/guest/engine_setup.load`) on the
stand-in GPU: correct kernels serve from CUDA and say the test passed; a planted wrong kernel
(one emulation perturbed) makes the guest serve from the CPU, and the note, /health and the
READY line name the kernel; ukgpu.backend=cuda refuses to boot; ukgpu.gpu_selftest=off skips it."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from starlette.testclient import TestClient

from ukgpu.gpu.cuda.self_test import self_test
from ukgpu.kernel.guest import engine_setup
from ukgpu.kernel.guest.init import BootConfig, ready_line
from ukgpu.kernel.guest.syscalls import InitError
from ukgpu.kernel.image.qemu import parse_ready
from ukgpu.llama_core import backend_choice

from fakes import cuda_kernels
from fakes.cuda_driver import FakeDriver
from fakes.tiny_models import SHAPES, write_model

WRONG = "matvec_q4_k_b1"  # tiny-llama's attn_q is Q4_K: a kernel every decode step uses


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(write_model(tmp_path_factory.mktemp("selftest") / "t.gguf", SHAPES["tiny-llama"]))


@pytest.fixture
def fake_gpu(monkeypatch):
    """The guest's chooser, run for real against a stand-in GPU (not the host's PCI bus)."""
    real, drivers = backend_choice.open_backend, []

    def chooser(kind, gguf, **kw):
        assert kw.pop("pci_root") == "/sys"
        drivers.append(FakeDriver())
        return real(kind, gguf, driver=drivers[-1], **kw)

    monkeypatch.setattr(backend_choice, "open_backend", chooser)
    return drivers


@pytest.fixture
def wrong_kernel(monkeypatch):
    """matvec_q4_k_b1 returns 1.1x the right answer (NMSE 1e-2); every other kernel is right."""
    right = cuda_kernels.EMULATORS["matvec"]

    def off_by_ten_percent(mem, e, a, grid):
        right(mem, e, a, grid)
        if e["name"] == WRONG:
            mem.view(a["y"], np.float32, a["B"] * a["N"])[:] *= 1.1

    monkeypatch.setitem(cuda_kernels.EMULATORS, "matvec", off_by_ten_percent)


def _cfg(backend="auto", gpu_selftest="on"):
    return SimpleNamespace(ctx=256, slots=2, backend=backend, gpu_selftest=gpu_selftest,
                           cpu_activations="f32")


def _load(path, cfg):
    return engine_setup.load(path, cfg, lambda *a: 64 << 20)


def _health(engine):
    from ukgpu.kernel.api.app import create_app

    with TestClient(create_app(engine, model_id="tiny"), base_url="http://127.0.0.1:8080") as client:
        body = client.get("/health").json()
    assert body["status"] == "ready", body
    return body


def test_correct_kernels_serve_from_cuda_and_say_the_self_test_passed(tiny_path, fake_gpu):
    engine, _, note = _load(tiny_path, _cfg())
    assert engine.model.backend.name == "cuda"
    m = re.search(r"GPU self-test passed: (\d+) kernel checks in (\d+\.\d)s\)$", note)
    assert note.startswith("cuda (GPU 0: ") and m and int(m.group(1)) >= 20, note
    assert _health(engine)["backend_note"] == f"backend: {note}"
    assert [e.token_id for e in engine.generate([1, 2, 3], max_tokens=3)]


def test_a_wrong_kernel_makes_the_guest_serve_from_the_cpu_and_say_why(tiny_path, fake_gpu,
                                                                       wrong_kernel):
    engine, _, note = _load(tiny_path, _cfg())
    assert engine.model.backend.name == "cpu"
    assert re.fullmatch(rf"cpu \(GPU self-test failed: {WRONG} NMSE 1\.0e-02 > \S+\)", note), note
    assert not fake_gpu[-1].allocs  # the GPU's arena was freed when it was dropped
    health = _health(engine)
    assert health["backend"] == "cpu" and WRONG in health["backend_note"]
    line = ready_line(12.5, {"model_load": 3.25}, 8080, note)
    assert line.endswith(f"backend={note}") and WRONG in line
    assert parse_ready(line.removeprefix("READY")) == {"total": 12.5, "model_load": 3.25, "port": 8080}
    assert [e.token_id for e in engine.generate([1, 2, 3], max_tokens=3)]


def test_a_demanded_gpu_that_fails_its_self_test_is_a_boot_error(tiny_path, fake_gpu, wrong_kernel):
    with pytest.raises(InitError, match=rf"^ukgpu.backend=cuda but the GPU cannot be used: GPU "
                                        rf"self-test failed: {WRONG} NMSE"):
        _load(tiny_path, _cfg(backend="cuda"))


def test_a_kernel_that_faults_during_the_self_test_leaves_the_cpu_serving(tiny_path, fake_gpu,
                                                                         monkeypatch):
    """A fault (sticky, reported at the next sync as on hardware) fails the self-test with the
    driver's error; the lost GPU is dropped without raising and the CPU serves."""
    def out_of_bounds(mem, e, a, grid):
        raise cuda_kernels.EmulationError("planted out-of-bounds write")

    monkeypatch.setitem(cuda_kernels.EMULATORS, "rmsnorm", out_of_bounds)
    engine, _, note = _load(tiny_path, _cfg())
    assert engine.model.backend.name == "cpu"
    assert note.startswith("cpu (GPU self-test failed: rmsnorm: ") and "ILLEGAL_ADDRESS" in note, note
    assert [e.token_id for e in engine.generate([1, 2, 3], max_tokens=3)]


def test_gpu_selftest_off_skips_it(tiny_path, fake_gpu, wrong_kernel):
    engine, _, note = _load(tiny_path, _cfg(gpu_selftest="off"))
    assert engine.model.backend.name == "cuda" and "self-test" not in note


def test_the_self_test_reports_only_the_models_kernels(tiny_path, monkeypatch):
    """A wrong kernel of a weight type the model does not hold is neither run nor reported."""
    from ukgpu.gpu.cuda import select
    from ukgpu.llama_core.gguf.file import open_gguf

    right = cuda_kernels.EMULATORS["matvec"]

    def wrong_q5_k(mem, e, a, grid):
        right(mem, e, a, grid)
        if "q5_k" in e["name"]:
            mem.view(a["y"], np.float32, a["B"] * a["N"])[:] = 0

    monkeypatch.setitem(cuda_kernels.EMULATORS, "matvec", wrong_q5_k)
    gguf = open_gguf(tiny_path)
    assert not any("q5_k" in k for k in select.model_kernels(gguf))
    result = self_test(select.create_backend(gguf=gguf, driver=FakeDriver(), arena_bytes=64 << 20),
                       gguf)
    assert result.ok, result.failures


def test_the_boot_switch_parses():
    assert BootConfig.parse("ukgpu.gpu_selftest=off").gpu_selftest == "off"
    assert BootConfig.parse("").gpu_selftest == "on"
    with pytest.raises(InitError, match="gpu_selftest=maybe"):
        BootConfig.parse("ukgpu.gpu_selftest=maybe")


def test_a_gpu_without_room_for_the_checks_fails_the_self_test_instead_of_the_boot(tiny_path):
    from ukgpu.gpu.cuda import select
    from ukgpu.llama_core.gguf.file import open_gguf

    from fakes.cuda_driver import FakeDevice

    gguf = open_gguf(tiny_path)
    full = FakeDriver(devices=[FakeDevice(total_bytes=(32 << 20) + (1 << 20))])
    result = self_test(select.create_backend(gguf=gguf, driver=full, arena_bytes=32 << 20), gguf)
    assert not result.ok and result.checks == 0
    assert result.summary().startswith("GPU self-test failed: scratch memory: CudaError") \
        and "OUT_OF_MEMORY" in result.summary()
