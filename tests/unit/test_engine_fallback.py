"""A device failing under a running model: with a fallback ("auto"), every live sequence moves to
the CPU and continues with the tokens it would have had; without one, the error reaches the
caller and the slot's cache is not trusted."""

from __future__ import annotations

import pytest

from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.errors import DeviceError
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.sampling import SamplingParams
from ukgpu.llama_core.text.tokenizer import Tokenizer

PROMPTS = [[1, 504, 3458, 314, 260], [1, 2000, 31, 42]]
GREEDY = SamplingParams(temperature=0.0)


class DyingDevice(CpuBackend):
    """Computes like the CPU backend until its `life`-th matmul, then fails like a lost GPU."""

    name = "fakegpu"

    def __init__(self, life: int):
        super().__init__()
        self.max_batch = 1  # steps one sequence at a time, like the CUDA backend
        self.life, self.closed = life, False

    def matmul(self, x, weight, bias=None):
        self.life -= 1
        if self.life < 0:
            raise DeviceError("fake launch failed: the context is lost")
        return super().matmul(x, weight, bias)

    def close(self):
        self.closed = True
        raise DeviceError("cannot free anything on a lost context")


def _engine(gguf, backend, n_slots, fallback):
    return Engine(Model(gguf, backend), Tokenizer.from_gguf(gguf), 64, n_slots, backend.name,
                  fallback)


def _run(engine, max_tokens=10):
    seqs = [engine.start(p, GREEDY, max_tokens) for p in PROMPTS[:engine.n_slots]]
    out = [[] for _ in seqs]
    while any(s.finish_reason is None for s in seqs):
        for i, res in enumerate(engine.step_all(seqs)):
            if isinstance(res, Exception):
                raise res
            out[i] += [e.token_id for e in res]
    for s in seqs:
        engine.release(s)
    return out


# SmolLM2: 7 matmuls x 30 blocks + the output = 211 per forward pass; the two prompts prefill
# first (matmuls 1-422), then each decode step costs 211 per sequence
@pytest.mark.parametrize("life", [3, 230, 840], ids=["first-prefill", "second-prefill", "decode"])
def test_live_sequences_continue_on_the_cpu(smollm2, life, capsys):
    want = _run(_engine(smollm2, CpuBackend(), 2, None))
    device = DyingDevice(life)
    engine = _engine(smollm2, device, 2, CpuBackend)
    assert _run(engine) == want
    assert engine.model.backend.name == "cpu" and device.closed and engine.fallback is None
    assert "fakegpu failed while running (fake launch failed" in capsys.readouterr().err
    assert engine.backend_note.startswith("backend: cpu (fakegpu failed while running")
    assert [e.token_id for e in engine.generate(PROMPTS[0], GREEDY, 10)] == want[0]  # CPU now


def test_without_a_fallback_the_failure_is_raised_and_the_slot_forgets(smollm2):
    engine = _engine(smollm2, DyingDevice(7 * 30 * 3), 1, None)
    seq = engine.start(PROMPTS[0], GREEDY, 10)
    with pytest.raises(DeviceError, match="context is lost"):
        while seq.finish_reason is None:
            engine.step(seq)
    assert seq.kv_suspect
    engine.release(seq)
    assert engine.start(PROMPTS[0], GREEDY, 2).n_cached == 0


def test_the_guest_init_gives_a_gpu_engine_under_auto_a_cpu_fallback(smollm2_path, monkeypatch):
    """kernel/init_model: ukgpu.backend=auto that got the GPU keeps the CPU (KV cache in the
    arena) to move to; ukgpu.backend=cuda does not."""
    from types import SimpleNamespace

    from ukgpu.kernel.guest import engine_setup as init_model
    from ukgpu.llama_core import backend_choice

    monkeypatch.setattr(backend_choice, "open_backend",
                        lambda kind, gguf, **kw: (DyingDevice(3), "backend: cuda (a GPU)"))
    for wanted, has_fallback in (("auto", True), ("cuda", False)):
        cfg = SimpleNamespace(ctx=64, slots=1, backend=wanted, cpu_activations="f32")
        engine, arena, note = init_model.load(str(smollm2_path), cfg, lambda *a: 64 << 20)
        assert note == "cuda (a GPU)" and (engine.fallback is not None) == has_fallback
    engine, arena, _ = init_model.load(str(smollm2_path), SimpleNamespace(ctx=64, slots=1, backend="auto", cpu_activations="f32"),
                                       lambda *a: 64 << 20)
    used = arena.used
    assert [e.token_id for e in engine.generate(PROMPTS[0], GREEDY, 4)]  # the device dies at once
    assert engine.model.backend.name == "cpu" and arena.used > used  # its KV cache: in the arena


def test_the_guest_refuses_to_boot_when_the_demanded_gpu_cannot_be_used(smollm2_path, monkeypatch):
    """ukgpu.backend=cuda: the chooser's reason becomes the guest's InitError; the chooser was
    told to check the PCI bus and to put a CPU cache in the arena."""
    from types import SimpleNamespace

    from ukgpu.kernel.guest import engine_setup as init_model
    from ukgpu.kernel.guest.syscalls import InitError
    from ukgpu.llama_core import backend_choice

    def no_gpu(kind, gguf, **kw):
        assert kind == "cuda" and kw["pci_root"] == "/sys" and kw["alloc"] is not None
        raise backend_choice.BackendChoiceError("no NVIDIA GPU on the PCI bus: pass one through")

    monkeypatch.setattr(backend_choice, "open_backend", no_gpu)
    cfg = SimpleNamespace(ctx=64, slots=1, backend="cuda", cpu_activations="f32")
    with pytest.raises(InitError, match="^ukgpu.backend=cuda but the GPU cannot be used: no NVIDIA "
                                        "GPU on the PCI bus"):
        init_model.load(str(smollm2_path), cfg, lambda *a: 64 << 20)


def test_the_guests_cpu_activations_reach_its_backend_and_its_fallback(smollm2_path, monkeypatch):
    """ukgpu.cpu_activations=q8 is handed to the CPU backend the guest opens, and to the one a lost
    device falls back to, as an argument: the guest's environment is left alone."""
    import os
    from types import SimpleNamespace

    from ukgpu.kernel.guest import engine_setup as init_model
    from ukgpu.llama_core import backend_choice

    monkeypatch.delenv("UKGPU_CPU_ACTIVATIONS", raising=False)
    cfg = SimpleNamespace(ctx=64, slots=1, backend="cpu", cpu_activations="q8")
    engine, _, note = init_model.load(str(smollm2_path), cfg, lambda *a: 64 << 20)
    assert note == "cpu (requested)" and engine.model.backend.activations == "q8"
    monkeypatch.setattr(backend_choice, "open_backend",
                        lambda kind, gguf, **kw: (DyingDevice(3), "backend: cuda (a GPU)"))
    cfg = SimpleNamespace(ctx=64, slots=1, backend="auto", cpu_activations="q8", gpu_selftest="off")
    engine, _, _ = init_model.load(str(smollm2_path), cfg, lambda *a: 64 << 20)
    assert [e.token_id for e in engine.generate(PROMPTS[0], GREEDY, 4)]  # the device dies at once
    assert engine.model.backend.name == "cpu" and engine.model.backend.activations == "q8"
    assert "UKGPU_CPU_ACTIVATIONS" not in os.environ
