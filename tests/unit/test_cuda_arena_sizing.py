"""The CUDA arena sized from the model, n_ctx and n_slots, and the chunked prefill that lets a
full-context prompt fit it (`select.arena_bytes_for`, `select.activation_bytes`,
`Backend.max_prefill_rows`, `Model.forward`): a 4096-token prompt on a GPU of 32 MiB, the same
prompt in one pass exhausting that arena, chunked logits equal to one pass, and the guest
passing its ctx and slots to the chooser."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ukgpu.gpu.cuda import select
from ukgpu.gpu.cuda.arena import CudaArenaExhausted
from ukgpu.gpu.cuda.verify_checks import nmse
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model

from fakes.cuda_driver import FakeDevice, FakeDriver
from fakes.tiny_models import SHAPES, write_model

N_CTX = 4096  # the tiny models' context length


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_gguf(write_model(tmp_path_factory.mktemp("arena") / "t.gguf", SHAPES["tiny-llama"]))


@pytest.fixture(scope="module")
def full_prompt():
    return np.random.default_rng(7).integers(0, SHAPES["tiny-llama"].vocab, N_CTX)


def _cuda(gguf, total_bytes: int, **kw):
    return select.create_backend(gguf=gguf, driver=FakeDriver(devices=[FakeDevice(total_bytes=total_bytes)]),
                                 **kw)


def test_a_full_context_prompt_prefills_on_a_gpu_sized_for_it(tiny, full_prompt):
    """32 MiB of device memory holds the weights, a 4096-token cache and one 512-row chunk (the
    old sizing asked for a flat 1 GiB of activations on top: refused at load), and the logits
    of the last row equal the CPU's."""
    be = _cuda(tiny, 32 << 20, n_ctx=N_CTX, n_slots=1)
    assert be.arena.capacity <= 32 << 20 and be.max_prefill_rows == 512
    gpu = Model(tiny, be)
    got = gpu.forward(full_prompt, 0, gpu.new_kv(N_CTX), all_logits=False)
    cpu = Model(tiny, CpuBackend())
    want = cpu.forward(full_prompt, 0, cpu.new_kv(N_CTX), all_logits=False)
    assert got.shape == want.shape == (1, SHAPES["tiny-llama"].vocab)
    assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want))
    assert int(np.argmax(got)) == int(np.argmax(want))
    assert be.arena.tags["activations"] <= select.activation_bytes(tiny.config)


def test_one_pass_of_the_full_context_exhausts_that_arena(tiny, full_prompt):
    """Without chunking (the old prefill) the same arena runs out: the chunk is what makes it fit."""
    be = _cuda(tiny, 64 << 20, arena_bytes=select.arena_bytes_for(tiny, N_CTX, 1))
    be.max_prefill_rows = None
    gpu = Model(tiny, be)
    with pytest.raises(CudaArenaExhausted, match="activations"):
        gpu.forward(full_prompt, 0, gpu.new_kv(N_CTX), all_logits=False)


def test_the_activation_bound_holds_for_prompts_of_every_length(tiny):
    """Prompts of many lengths, all logits or the last row, then decode steps on two caches:
    the activation pool's high-water mark stays under `activation_bytes` (what the arena
    reserves), and is not far below it (the bound is not a blind over-reservation)."""
    be = _cuda(tiny, 64 << 20, n_ctx=1024, n_slots=2)
    gpu, rng = Model(tiny, be), np.random.default_rng(3)
    kvs = [gpu.new_kv(1024) for _ in range(2)]
    for n, all_logits in ((1000, True), (700, False), (300, True), (130, True), (40, False), (9, True)):
        gpu.forward(rng.integers(0, 512, n), 0, kvs[0], all_logits=all_logits)
    for kv in kvs:
        gpu.forward(rng.integers(0, 512, 20), 0, kv, all_logits=False)
        for pos in range(20, 23):
            be.decode(gpu, int(rng.integers(0, 512)), pos, kv)
    bound, used = select.activation_bytes(tiny.config, n_slots=2), be.arena.tags["activations"]
    assert used <= bound and used >= bound / 8, (used, bound)


@pytest.mark.parametrize("all_logits", [True, False])
def test_chunked_prefill_on_the_cpu_gives_the_logits_of_one_pass(tiny, all_logits):
    prompt = np.random.default_rng(1).integers(0, 512, 50)
    one, chunked = Model(tiny, CpuBackend()), Model(tiny, CpuBackend())
    chunked.backend.max_prefill_rows = 7  # 8 passes, the last of 1 row
    kv_one, kv_chunked = one.new_kv(64), chunked.new_kv(64)
    want = one.forward(prompt, 3, kv_one, all_logits=all_logits)
    got = chunked.forward(prompt, 3, kv_chunked, all_logits=all_logits)
    assert got.shape == want.shape == ((50 if all_logits else 1), 512)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(kv_chunked.k)[:, :, :53], np.asarray(kv_one.k)[:, :, :53],
                               rtol=1e-4, atol=1e-5)


def test_chunked_prefill_on_the_cuda_stand_in_gives_the_logits_of_one_pass(tiny):
    prompt = np.random.default_rng(2).integers(0, 512, 64)
    be = _cuda(tiny, 64 << 20, n_ctx=128)
    gpu = Model(tiny, be)
    be.max_prefill_rows = None
    want = gpu.forward(prompt, 0, gpu.new_kv(128))
    be.max_prefill_rows = 16
    got = gpu.forward(prompt, 0, gpu.new_kv(128))
    assert got.shape == want.shape == (64, 512)
    # the GEMM's f16 operands round per tile, so 16-row passes differ from one 64-row pass in
    # the last bits: compare as `ukgpu verify` does, and every row's greedy token
    assert nmse(got, want) < 1e-6
    assert np.array_equal(np.argmax(got, axis=1), np.argmax(want, axis=1))


def test_an_overflowing_prompt_is_refused_before_any_chunk_runs(tiny):
    from ukgpu.llama_core.model import ContextOverflowError

    model = Model(tiny, CpuBackend())
    model.backend.max_prefill_rows = 4
    kv = model.new_kv(16)
    with pytest.raises(ContextOverflowError):
        model.forward(np.arange(20), 0, kv)
    assert not np.any(np.asarray(kv.k))  # no chunk wrote its keys


def test_the_guest_sizes_the_gpu_for_its_ctx_and_slots(tiny, monkeypatch):
    """kernel/guest/engine_setup passes ukgpu.ctx (capped at the model's) and ukgpu.slots."""
    from ukgpu.kernel.guest import engine_setup
    from ukgpu.llama_core import backend_choice

    seen = {}

    def chooser(kind, gguf, **kw):
        seen.update(kw)
        return backend_choice.cpu_backend(kw["alloc"]), "backend: cpu (test)"

    monkeypatch.setattr(backend_choice, "open_backend", chooser)
    cfg = SimpleNamespace(ctx=3000, slots=3, backend="auto", gpu_selftest="on", cpu_activations="f32")
    engine_setup.load(str(tiny.path), cfg, lambda *a: 256 << 20)
    assert seen["n_ctx"] == 3000 and seen["n_slots"] == 3
    cfg = SimpleNamespace(ctx=9000, slots=2, backend="auto", gpu_selftest="on", cpu_activations="f32")
    engine_setup.load(str(tiny.path), cfg, lambda *a: 256 << 20)
    assert seen["n_ctx"] == N_CTX and seen["n_slots"] == 2  # the model's context caps ukgpu.ctx
