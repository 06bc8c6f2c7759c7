"""Batched decode on the CUDA backend (stand-in driver): B sequences' caches share one KV slab,
one recorded graph per batch size serves any of them, and every row gets what the sequence
gets decoded alone; the engine's step_all uses it."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.select import create_backend
from ukgpu.gpu.cuda.verify_checks import nmse
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.gguf.synthetic import build_synthetic
from ukgpu.llama_core.model import ContextOverflowError, Model
from ukgpu.llama_core.sampling import SamplingParams
from ukgpu.llama_core.text.tokenizer import Tokenizer

from fakes.cuda_driver import FakeDriver
from fakes.tiny_models import SHAPES, write_model

PROMPTS = [[1, 54, 345, 31], [1, 200, 31], [1, 7, 8, 9, 10, 11], [1, 99], [1, 42, 43]]
N_CTX = 48


@pytest.fixture(scope="module", params=[*sorted(SHAPES), "syn-gemma3", "syn-qwen3"])
def gguf(request, tmp_path_factory):
    if request.param in SHAPES:
        path = write_model(tmp_path_factory.mktemp("batch") / f"{request.param}.gguf", SHAPES[request.param])
    else:
        path = build_synthetic(request.param)
    return open_gguf(path)


def gpu(gguf, n_slots, arena_bytes=96 << 20):
    fake = FakeDriver()
    be = create_backend(gguf=gguf, driver=fake, arena_bytes=arena_bytes, n_ctx=N_CTX, n_slots=n_slots)
    return Model(gguf, be), be, fake


def _prefilled(model, prompts):
    kvs = [model.new_kv(N_CTX) for _ in prompts]
    for p, kv in zip(prompts, kvs):
        model.forward(np.array(p), 0, kv, all_logits=False)
    return kvs


def test_batched_graph_rows_equal_single_decode(gguf):
    """Three sequences at different positions, three steps: the first eager (then recorded),
    the rest replayed; each row's logits equal that sequence's single-sequence decode."""
    model, be, _ = gpu(gguf, n_slots=3)
    prompts = PROMPTS[:3]
    kvs, alone = _prefilled(model, prompts), _prefilled(model, prompts)
    assert {kv.k.slab for kv in kvs} == {kvs[0].k.slab}  # one slab holds the batch
    tokens, pos = [5, 6, 7], [len(p) for p in prompts]
    for step in range(3):
        got = be.decode_batch(model, np.array(tokens), pos, kvs)
        for b, kv in enumerate(alone):
            want = be.decode(model, tokens[b], pos[b], kv)[0]
            assert nmse(got[b], want) < 1e-7, (step, b)
            assert int(np.argmax(got[b])) == int(np.argmax(want))
        tokens = [int(np.argmax(row)) % 400 for row in got]
        pos = [p + 1 for p in pos]
    (graph,) = be.graphs.batch_graphs.values()
    assert graph.replays == 2


def test_one_graph_serves_other_sequences_of_the_slab(gguf):
    model, be, fake = gpu(gguf, n_slots=4)
    kvs = _prefilled(model, PROMPTS[:4])
    be.decode_batch(model, np.array([3, 4]), [4, 3], kvs[:2])  # records B=2 for this slab
    eager, replays = len(fake.launches), fake.graph_launches
    got = be.decode_batch(model, np.array([9, 10]), [6, 2], [kvs[2], kvs[3]])  # other slots
    assert len(be.graphs.batch_graphs) == 1 and be.graphs.captures == 1
    assert len(fake.launches) == eager and fake.graph_launches == replays + 1  # a replay only
    ref = [be.decode(model, t, p, kv)[0] for t, p, kv in zip([9, 10], [6, 2], _prefilled(model, PROMPTS[2:4]))]
    assert all(nmse(g, r) < 1e-7 for g, r in zip(got, ref))


def test_batch_checks_positions_before_replay(gguf):
    model, be, _ = gpu(gguf, n_slots=2)
    kvs = _prefilled(model, PROMPTS[:2])
    be.decode_batch(model, np.array([3, 4]), [4, 3], kvs)
    with pytest.raises(ContextOverflowError):
        be.decode_batch(model, np.array([3, 4]), [N_CTX, 3], kvs)


def test_caches_of_different_slabs_decode_eagerly_and_right(gguf):
    model, be, _ = gpu(gguf, n_slots=1)  # a slab per cache
    kvs = _prefilled(model, PROMPTS[:2])
    assert kvs[0].k.slab is not kvs[1].k.slab
    got = be.decode_batch(model, np.array([3, 4]), [4, 3], kvs)
    assert not be.graphs.batch_graphs
    ref = [be.decode(model, t, p, kv)[0] for t, p, kv in zip([3, 4], [4, 3], _prefilled(model, PROMPTS[:2]))]
    assert all(nmse(g, r) < 1e-7 for g, r in zip(got, ref))


def test_engine_decodes_its_slots_together_with_the_same_tokens(smollm2):
    """The server's engine on the GPU: step_all decodes its three slots through the batched
    graph, and each gets the tokens it gets alone (real SmolLM2 weights and tokenizer)."""
    params = SamplingParams(temperature=0.0)
    model, be, _ = gpu(smollm2, n_slots=3, arena_bytes=None)  # sized by the formula
    tok = Tokenizer.from_gguf(smollm2)
    eng = Engine(model, tok, n_ctx=N_CTX, n_slots=3)
    seqs = [eng.start(p, params, 5) for p in PROMPTS[:3]]
    together = [[] for _ in seqs]
    while any(s.finish_reason is None for s in seqs):
        for i, res in enumerate(eng.step_all(seqs)):
            assert not isinstance(res, Exception), res
            together[i] += [e.token_id for e in res]
    assert be.graphs.batch_graphs and max(g.replays for g in be.graphs.batch_graphs.values()) >= 2
    alone_model, _, _ = gpu(smollm2, n_slots=1, arena_bytes=None)
    alone = Engine(alone_model, tok, n_ctx=N_CTX, n_slots=1)
    for p, got in zip(PROMPTS[:3], together):
        assert got == [e.token_id for e in alone.generate(p, params, 5)]
