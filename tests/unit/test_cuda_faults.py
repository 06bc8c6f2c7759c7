"""Faults and refusals on the CUDA backend, under the stand-in that behaves like a GPU (work runs
at the next sync; a kernel fault is reported there, with no kernel name, and is sticky; a call
refused inside a capture invalidates it): which errors lose the context, UKGPU_CUDA_SYNC=1
naming the kernel, a refused capture leaving decode eager on the GPU with its graph destroyed,
and which failures move an "auto" engine to the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.backend import CudaUnsupported
from ukgpu.gpu.cuda.driver import STICKY, CudaError, check, open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.gpu.cuda.select import create_backend
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.errors import DeviceError
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.sampling import SamplingParams
from ukgpu.llama_core.text.tokenizer import Tokenizer

from fakes import cuda_kernels
from fakes.cuda_driver import CUresult, FakeDriver
from fakes.tiny_models import SHAPES, write_model

PROMPT = np.array([3, 17, 99, 250, 4, 511, 0, 42, 77, 300, 12, 13], dtype=np.int64)
GREEDY = SamplingParams(temperature=0)
TEXT = "hello world, the quick brown fox"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "tiny-llama.gguf"
    return open_gguf(write_model(path, SHAPES["tiny-llama"]))


@pytest.fixture(autouse=True)
def no_sync_env(monkeypatch):
    monkeypatch.delenv("UKGPU_CUDA_SYNC", raising=False)


def gpu_model(gguf, fake=None):
    fake = fake or FakeDriver()
    be = create_backend(gguf=gguf, driver=fake, arena_bytes=64 << 20, n_ctx=64)
    return Model(gguf, be), be, fake


def faulting(name: str, after: int = 0):
    """An emulator for kernel family `name` that faults from its after-th call on."""
    real, calls = cuda_kernels.EMULATORS[name], []

    def run(mem, e, a, grid):
        calls.append(1)
        if len(calls) > after:
            raise cuda_kernels.EmulationError("planted out-of-bounds access")
        real(mem, e, a, grid)
    return run


def add_on_unmapped_memory(ks: KernelSet) -> None:
    ks.launch("add_f32", {"a": 0x10, "b": 0x10, "out": 0x10, "n": 16})


def tokens(engine: Engine, prompt: list[int], n: int = 8) -> list[int]:
    return [e.token_id for e in engine.generate(prompt, GREEDY, n) if e.token_id is not None]


@pytest.mark.parametrize("name, sticky", [
    ("CUDA_ERROR_ILLEGAL_ADDRESS", True), ("CUDA_ERROR_MISALIGNED_ADDRESS", True),
    ("CUDA_ERROR_LAUNCH_FAILED", True), ("CUDA_ERROR_OUT_OF_MEMORY", False),
    ("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", False), ("CUDA_ERROR_INVALID_VALUE", False),
])
def test_errors_that_lose_the_context_are_sticky_and_say_what_to_do(name, sticky):
    with pytest.raises(CudaError) as info:
        check(FakeDriver(), "cuStreamSynchronize", (CUresult[name],))
    exc = info.value
    assert isinstance(exc, DeviceError) and exc.sticky is sticky
    assert ("UKGPU_CUDA_SYNC=1" in str(exc) and "ukgpu verify --kernels" in str(exc)) is sticky
    assert {"CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_ILLEGAL_INSTRUCTION",
            "CUDA_ERROR_INVALID_ADDRESS_SPACE", "CUDA_ERROR_INVALID_PC",
            "CUDA_ERROR_ECC_UNCORRECTABLE", "CUDA_ERROR_ASSERT"} <= STICKY


def test_a_fault_surfaces_at_the_next_sync_and_says_how_to_name_the_kernel():
    ctx = open_device(0, FakeDriver())
    ks = KernelSet(ctx)
    assert not ks.sync
    add_on_unmapped_memory(ks)  # queued: the launch itself is accepted
    with pytest.raises(CudaError) as info:
        ctx.sync()
    assert info.value.sticky and info.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert "add_f32" not in str(info.value) and "UKGPU_CUDA_SYNC=1" in str(info.value)
    with pytest.raises(CudaError, match="reported at the launch of add_f32; the fault is in work "
                                        "queued before it") as info:
        add_on_unmapped_memory(ks)  # the context stays lost: every later call reports it
    assert info.value.sticky


def test_a_launch_that_reports_a_lost_context_does_not_blame_its_own_kernel():
    ks = KernelSet(open_device(0, FakeDriver(fail={"cuLaunchKernel": "CUDA_ERROR_ILLEGAL_ADDRESS"})))
    with pytest.raises(CudaError, match="reported at the launch of add_f32; the fault is in work "
                                        "queued before it") as info:
        ks.launch("add_f32", {"a": 0x10, "b": 0x10, "out": 0x10, "n": 16})
    assert info.value.sticky and "UKGPU_CUDA_SYNC=1" in str(info.value)


def test_sync_mode_names_the_kernel_that_faulted(monkeypatch):
    monkeypatch.setenv("UKGPU_CUDA_SYNC", "1")
    ks = KernelSet(open_device(0, FakeDriver()))  # the environment is read here
    monkeypatch.delenv("UKGPU_CUDA_SYNC")
    with pytest.raises(CudaError, match=r"CUDA_ERROR_ILLEGAL_ADDRESS \(kernel add_f32, grid "
                                        r"\(1, 1, 1\), waited for") as info:
        add_on_unmapped_memory(ks)
    assert info.value.sticky and "ukgpu verify --kernels" in str(info.value)


@pytest.mark.parametrize("sync", ["0", "1"])
def test_a_kernel_fault_in_a_forward_pass_is_named_only_in_sync_mode(tiny, monkeypatch, sync):
    monkeypatch.setenv("UKGPU_CUDA_SYNC", sync)
    model, be, _ = gpu_model(tiny)
    monkeypatch.setitem(cuda_kernels.EMULATORS, "swiglu", faulting("swiglu"))
    with pytest.raises(CudaError) as info:
        model.forward(PROMPT, 0, model.new_kv(64))
    assert info.value.sticky and info.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert ("kernel swiglu_f32" in str(info.value)) is (sync == "1")


def test_a_capture_the_backend_abandons_destroys_its_graph_and_decode_goes_on_eagerly(tiny, capsys):
    model, be, fake = gpu_model(tiny)
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    real = be.argmax

    def argmax(logits):
        if be.capturing:
            raise CudaUnsupported("planted: argmax cannot be recorded")
        return real(logits)

    be.argmax = argmax
    kv, ckv = model.new_kv(64), cpu.new_kv(64)
    model.forward(PROMPT, 0, kv)
    token = int(cpu.forward(PROMPT, 0, ckv)[-1].argmax())
    with pytest.raises(CudaUnsupported):  # the capture alone: ended, its graph destroyed
        be.graphs.capture(model, kv)
    assert not be.capturing and not fake.live_graphs and not fake.live_execs
    for pos in range(len(PROMPT), len(PROMPT) + 4):
        want = int(cpu.forward(np.array([token]), pos, ckv, all_logits=False)[0].argmax())
        assert be.decode_greedy(model, token, pos, kv) == want
        token = want
    assert be.graphs.captures == 0 and fake.graph_launches == 0 and not fake.live_graphs
    assert be.graphs.eager_reason.startswith("decode graph capture refused (CudaUnsupported: "
                                             "planted")
    assert capsys.readouterr().err.count("decode graph capture refused") == 1


class RefusesArgmaxInCapture(FakeDriver):
    """A driver that will not record the argmax kernel into a graph (a non-sticky refusal that
    invalidates the capture, as a driver refuses what it cannot capture)."""

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        if fn.entry["name"].startswith("argmax") and stream is not None and stream.capture is not None:
            stream.capture_invalid = True
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        return super().cuLaunchKernel(fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra)


def test_an_auto_engine_keeps_the_gpu_when_a_capture_is_refused(tiny, capsys):
    _, be, fake = gpu_model(tiny, RefusesArgmaxInCapture())
    engine = Engine(Model(tiny, be), Tokenizer.from_gguf(tiny), 64, 1, "backend: cuda (fake)",
                    CpuBackend)
    cpu = Engine.load(tiny, backend="cpu", n_ctx=64)
    prompt = cpu.tokenizer.encode(TEXT)
    want = tokens(cpu, prompt)
    for _ in range(2):  # the second request on the slot decodes eagerly too, with no new line
        assert tokens(engine, prompt) == want
    assert engine.model.backend is be and engine.fallback is not None
    assert fake.graph_launches == 0 and not fake.live_graphs and not fake.live_execs
    assert engine.backend_note.startswith("backend: cuda (fake); decode graph capture refused")
    err = capsys.readouterr().err
    assert err.count("ukgpu:") == 1 and "decode graph capture refused" in err
    assert "STREAM_CAPTURE_UNSUPPORTED" in err and "continuing on the CPU" not in err


def test_a_kernel_fault_moves_an_auto_engine_to_the_cpu(tiny, monkeypatch, capsys):
    """The context is lost (sticky): the engine continues on the CPU with the same tokens."""
    _, be, fake = gpu_model(tiny)
    engine = Engine(Model(tiny, be), Tokenizer.from_gguf(tiny), 64, 1, "backend: cuda (fake)",
                    CpuBackend)
    cpu = Engine.load(tiny, backend="cpu", n_ctx=64)
    prompt = cpu.tokenizer.encode(TEXT)
    layers = SHAPES["tiny-llama"].n_layers  # swiglu runs once per layer and forward pass
    monkeypatch.setitem(cuda_kernels.EMULATORS, "swiglu", faulting("swiglu", after=3 * layers))
    assert tokens(engine, prompt) == tokens(cpu, prompt)
    assert engine.model.backend.name == "cpu" and fake.sticky is not None
    assert "cuda failed while running" in capsys.readouterr().err
    assert engine.backend_note.startswith("backend: cpu (cuda failed while running")


class RefusesOnce(CpuBackend):
    """Computes like the CPU until told to refuse one matmul, like a device out of memory for one
    request (a CudaError that is not sticky)."""

    name = "fakegpu"

    def __init__(self):
        super().__init__()
        self.max_batch, self.refuse = 1, False

    def matmul(self, x, weight, bias=None):
        if self.refuse:
            self.refuse = False
            raise CudaError("cuMemAlloc", "CUDA_ERROR_OUT_OF_MEMORY", "planted")
        return super().matmul(x, weight, bias)


def test_a_device_error_that_is_not_sticky_fails_the_request_and_keeps_the_device(tiny):
    device = RefusesOnce()
    engine = Engine(Model(tiny, device), Tokenizer.from_gguf(tiny), 64, 1, "fakegpu", CpuBackend)
    prompt = engine.tokenizer.encode(TEXT)
    want = tokens(Engine.load(tiny, backend="cpu", n_ctx=64), prompt)
    device.refuse = True
    with pytest.raises(CudaError, match="CUDA_ERROR_OUT_OF_MEMORY"):
        tokens(engine, prompt)
    assert engine.model.backend is device and engine.fallback is not None
    assert tokens(engine, prompt) == want  # the next request runs on the same device
