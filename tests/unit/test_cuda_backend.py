"""CudaBackend on the fake driver: the unchanged llama/qwen2 forward pass matches the CPU
reference; decode runs from a captured CUDA graph with no per-kernel launches; the bookkeeping
around captures (one per KV cache, nothing synchronous or allocating inside, overflow checks)."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.backend import CudaBackend, CudaUnsupported
from ukgpu.gpu.cuda.select import create_backend, model_kernels
from ukgpu.gpu.cuda.verify_checks import nmse
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import ContextOverflowError, Model

from fakes.cuda_driver import FakeDriver
from fakes.tiny_models import SHAPES, write_model

PROMPT = np.array([3, 17, 99, 250, 4, 511, 0, 42, 77, 300, 12, 13], dtype=np.int64)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny(request, tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("cuda") / f"{request.param}.gguf", SHAPES[request.param])
    return open_gguf(path)


def gpu_model(gguf, n_ctx=64):
    fake = FakeDriver()
    be = create_backend(gguf=gguf, driver=fake, arena_bytes=64 << 20, n_ctx=n_ctx)
    return Model(gguf, be), be, fake


def test_prefill_logits_match_the_cpu_model(tiny):
    model, be, _ = gpu_model(tiny)
    assert isinstance(be, CudaBackend)
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    got = model.forward(PROMPT, 0, model.new_kv(64))
    want = cpu.forward(PROMPT, 0, cpu.new_kv(64))
    assert got.shape == want.shape == (len(PROMPT), 512)
    assert nmse(got, want) < 1e-5  # f16 KV cache; the fake's math is otherwise exact
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_chunked_prefill_and_eager_single_tokens_extend_the_cache(tiny):
    model, _, _ = gpu_model(tiny)
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    kv, ckv = model.new_kv(64), cpu.new_kv(64)
    model.forward(PROMPT[:9], 0, kv)  # prefill kernel (9 > 8 rows: GEMM)
    cpu.forward(PROMPT[:9], 0, ckv)
    got = model.forward(PROMPT[9:], 9, kv)  # 3 rows at start 9: mat-vec b8 + prefill attention
    want = cpu.forward(PROMPT[9:], 9, ckv)
    assert nmse(got, want) < 1e-5
    got = model.forward(np.array([5]), 12, kv, all_logits=False)  # decode kernels, eagerly
    want = cpu.forward(np.array([5]), 12, ckv, all_logits=False)
    assert got.shape == (1, 512) and nmse(got, want) < 1e-5


def test_decode_replays_one_graph_per_cache_without_kernel_launches(tiny):
    model, be, fake = gpu_model(tiny)
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    kv, ckv = model.new_kv(64), cpu.new_kv(64)
    model.forward(PROMPT, 0, kv)
    token = int(cpu.forward(PROMPT, 0, ckv)[-1].argmax())
    pos = len(PROMPT)
    eager_after_warmup = None
    for step in range(5):
        got = be.decode(model, token, pos, kv)
        want = cpu.forward(np.array([token]), pos, ckv, all_logits=False)
        assert got.shape == (1, 512) and nmse(got, want) < 1e-5
        if step == 0:
            eager_after_warmup = len(fake.launches)
            assert fake.graph_launches == 0 and be.graphs.captures == 1
        token, pos = int(want.argmax()), pos + 1
    assert len(fake.launches) == eager_after_warmup  # steps 1..4: graph replays only
    assert fake.graph_launches == 4 and be.graphs.captures == 1
    # every replay runs the whole step: at least five fused nodes a layer (qkv, rope_kv, the
    # decode attention and its combine, o + residual, ...)
    assert fake.graph_kernel_runs >= 4 * 5 * SHAPES["tiny-llama"].n_layers


def test_greedy_decode_on_the_device_follows_the_cpu(tiny):
    model, be, fake = gpu_model(tiny)
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    kv, ckv = model.new_kv(64), cpu.new_kv(64)
    model.forward(PROMPT, 0, kv)
    token = int(cpu.forward(PROMPT, 0, ckv)[-1].argmax())
    for pos in range(len(PROMPT), len(PROMPT) + 6):
        want = int(cpu.forward(np.array([token]), pos, ckv, all_logits=False)[0].argmax())
        assert be.decode_greedy(model, token, pos, kv) == want
        token = want
    assert fake.graph_launches == 5


def test_each_cache_gets_its_own_graph_and_overflow_is_refused(tiny):
    model, be, _ = gpu_model(tiny, n_ctx=16)
    kv_a, kv_b = model.new_kv(16), model.new_kv(16)
    for kv in (kv_a, kv_b):
        model.forward(PROMPT[:4], 0, kv)
        be.decode(model, 7, 4, kv)
        be.decode(model, 8, 5, kv)
    assert be.graphs.captures == 2 and len(be.graphs.graphs) == 2
    with pytest.raises(ContextOverflowError):
        be.decode(model, 1, 16, kv_a)


def test_an_op_that_synchronizes_while_recording_leaves_decode_eager(tiny, capsys):
    """The driver refuses the sync and invalidates the capture: no graph, one line saying so,
    and decode goes on eagerly with the CPU's numbers."""
    model, be, fake = gpu_model(tiny)
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    kv, ckv = model.new_kv(64), cpu.new_kv(64)
    model.forward(PROMPT[:3], 0, kv)
    cpu.forward(PROMPT[:3], 0, ckv)
    original = be.to_host
    be.to_host = lambda x: (be.ctx.sync(), original(x))[1]  # a sync inside the captured forward
    got = be.decode(model, 1, 3, kv)
    assert not be.capturing and be.graphs.graphs == {} and be.graphs.captures == 0
    assert "STREAM_CAPTURE_UNSUPPORTED" in be.graphs.eager_reason
    be.to_host = original
    for pos in (3, 4):
        want = cpu.forward(np.array([1]), pos, ckv, all_logits=False)
        got = got if pos == 3 else be.decode(model, 1, pos, kv)
        assert nmse(got, want) < 1e-5
    assert fake.graph_launches == 0 and not fake.live_graphs and not fake.live_execs
    assert capsys.readouterr().err.count("decode graph capture refused") == 1


def test_weights_are_uploaded_once_in_the_repacked_layout(tiny):
    model, be, _ = gpu_model(tiny)
    used = be.arena.tags["weights"]
    Model(tiny, be)  # a second model over the same file reuses the uploads
    assert be.arena.tags["weights"] == used
    raw = sum(v.data.nbytes for v in tiny.tensors.values())
    assert raw * 0.9 < used < raw * 2


def test_model_kernels_lists_what_the_model_needs(tiny):
    names = model_kernels(tiny)
    assert "attn_decode_d64" in names and "argmax_f32" in names
    rope = "rope_neox_d64" if tiny.metadata["general.architecture"] == "qwen2" else "rope_norm_d64"
    assert rope in names
    assert all(n in names for n in ("matvec_q4_k_b1", "matvec_q4_k_b8", "gemm_q4_k"))


def test_unsupported_weight_type_is_reported(tiny, monkeypatch):
    from dataclasses import replace

    from gguf import GGMLQuantizationType as T

    name = "blk.0.attn_q.weight"
    monkeypatch.setitem(tiny.tensors, name, replace(tiny.tensors[name], qtype=T.IQ4_NL))
    with pytest.raises(CudaUnsupported, match="IQ4_NL.*use the CPU backend"):
        model_kernels(tiny)


def test_a_dropped_cache_frees_its_graph_and_memory(tiny):
    import gc

    model, be, _ = gpu_model(tiny, n_ctx=16)
    kv = model.new_kv(16)
    model.forward(PROMPT[:4], 0, kv)
    be.decode(model, 7, 4, kv)
    be.decode(model, 8, 5, kv)
    assert len(be.graphs.graphs) == 1
    used = be.arena.used
    del kv
    gc.collect()
    assert be.graphs.graphs == {} and be.kv_pool.live == 0
    kv2 = model.new_kv(16)  # same size: the freed blocks, zeroed again
    assert be.arena.used == used
    got = model.forward(PROMPT[:4], 0, kv2)
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    assert nmse(got, cpu.forward(PROMPT[:4], 0, cpu.new_kv(16))) < 1e-5


def test_a_server_thread_can_run_the_model(tiny):
    """The context is made current in whichever thread calls (the fake refuses otherwise)."""
    import threading

    model, be, fake = gpu_model(tiny)
    kv = model.new_kv(64)
    results = {}

    def work():
        results["prefill"] = model.forward(PROMPT, 0, kv)
        results["decode"] = [be.decode_greedy(model, 5, len(PROMPT) + i, kv) for i in range(3)]

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    assert nmse(results["prefill"], cpu.forward(PROMPT, 0, cpu.new_kv(64))) < 1e-5
    assert len(results["decode"]) == 3 and fake.graph_launches == 2


def test_the_fake_refuses_work_in_a_thread_without_a_context():
    import threading

    fake = FakeDriver()
    from ukgpu.gpu.cuda.driver import open_device

    open_device(0, fake)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(fake.cuMemAlloc(256)[0]))
    thread.start()
    thread.join()
    assert seen[0].name == "CUDA_ERROR_INVALID_CONTEXT"


def test_close_frees_the_device_arena(tiny):
    model, be, fake = gpu_model(tiny)
    kv = model.new_kv(16)
    model.forward(PROMPT[:3], 0, kv)
    be.decode(model, 1, 3, kv)
    assert fake.allocs
    be.close()
    assert not fake.allocs and not be.graphs.graphs


def test_the_engine_generates_the_same_tokens_on_the_cuda_backend(tiny):
    from ukgpu.llama_core.engine import Engine
    from ukgpu.llama_core.sampling import SamplingParams

    be = create_backend(gguf=tiny, driver=FakeDriver(), arena_bytes=64 << 20)
    gpu, cpu = Engine.load(tiny, backend=be, n_ctx=64), Engine.load(tiny, backend="cpu", n_ctx=64)
    prompt = gpu.tokenizer.encode("hello world, the quick brown fox")
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=7)):
        got = [e.token_id for e in gpu.generate(prompt, params, max_tokens=8) if e.token_id is not None]
        want = [e.token_id for e in cpu.generate(prompt, params, max_tokens=8) if e.token_id is not None]
        assert got == want and len(got) >= 1


def test_the_engine_decodes_through_graph_replays(tiny):
    """After prefill, the engine's decode steps are graph launches, not per-kernel launches."""
    from ukgpu.llama_core.engine import Engine
    from ukgpu.llama_core.sampling import SamplingParams

    fake = FakeDriver()
    be = create_backend(gguf=tiny, driver=fake, arena_bytes=64 << 20)
    engine = Engine.load(tiny, backend=be, n_ctx=64)
    prompt = engine.tokenizer.encode("hello world, the quick brown fox")
    # The slot's first decode step captures its graph; every later step, in this request and
    # the next one on the same slot, replays it.
    for captured, params in ((1, SamplingParams(temperature=0)),
                             (0, SamplingParams(temperature=0.9, seed=7))):
        before = fake.graph_launches
        seq = engine.start(prompt, params, max_tokens=6)
        while seq.finish_reason is None:
            engine.step(seq)
        decoded = len(seq.generated) - 1  # the first token comes from prefill
        engine.release(seq)
        assert decoded >= 2 and fake.graph_launches - before == decoded - captured
        assert be.graphs.captures == 1
