"""KV prefix reuse: a released slot keeps the ids of the tokens whose keys/values it holds, and
`Engine.start` prefills only what follows the longest shared prefix.

On the real SmolLM2 model the greedy tokens after reuse must equal those of a fresh prefill
(a second chat turn, a prompt diverging inside the cached prefix, a repeated prompt).  Slot
choice, the forward calls and forgetting after a failure run on a recording model; the CUDA
backend runs on the fake driver, where reuse must leave the slot's captured decode graph alone.
"""

from __future__ import annotations

import queue
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ukgpu.kernel.api.metrics import Metrics
from ukgpu.kernel.api.scheduler import Finished, Job, Scheduler
from ukgpu.llama_core.backend import KVCache
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.sampling import SamplingParams
from ukgpu.llama_core.text.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)
GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "smollm2-135m.npz"


@pytest.fixture(scope="module")
def model(smollm2) -> Model:
    return Model(smollm2, CpuBackend())


@pytest.fixture(scope="module")
def golden() -> dict[str, list[int]]:
    with np.load(GOLDEN) as data:
        return {k: data[k].tolist() for k in ("prompt_ids", "greedy_ids")}


def fresh(model: Model, n_slots: int = 1) -> Engine:
    return Engine.load(model, n_ctx=256, n_slots=n_slots)


def run(engine: Engine, prompt: list[int], max_tokens: int = 8) -> tuple[list[int], object]:
    """(generated ids, the finished sequence) of one greedy request."""
    seq = engine.start(prompt, GREEDY, max_tokens)
    try:
        while seq.finish_reason is None:
            engine.step(seq)
    finally:
        engine.release(seq)
    return seq.generated, seq


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --- on the real model ---------------------------------------------------

def test_second_chat_turn_reuses_the_first_and_matches_a_fresh_prefill(model):
    engine = fresh(model)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    turn1 = engine.chat_ids(messages)
    reply, _ = run(engine, turn1, max_tokens=12)
    text = engine.tokenizer.decode([t for t in reply if t not in engine.tokenizer.eog_ids])
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
    turn2 = engine.chat_ids(messages)

    got, seq = run(engine, turn2, max_tokens=12)
    want, alone = run(fresh(model), turn2, max_tokens=12)
    assert got == want
    fed = turn1 + reply[:-1]  # the last sampled token never went through the model
    assert seq.stats.cached_tokens == common_prefix(fed, turn2) >= len(turn1)
    assert alone.stats.cached_tokens == 0
    assert seq.stats.prompt_tokens == alone.stats.prompt_tokens == len(turn2)


def test_prompt_diverging_inside_the_cached_prefix(model, golden):
    engine = fresh(model)
    first = golden["prompt_ids"]
    run(engine, first, max_tokens=4)
    other = first[:30] + engine.tokenizer.encode(" and then the storm came", add_special=False)
    assert other[30] != first[30]
    got, seq = run(engine, other)
    want, _ = run(fresh(model), other)
    assert got == want and seq.stats.cached_tokens == 30


def test_a_repeated_prompt_evaluates_only_its_last_token(model, golden):
    engine = fresh(model)
    prompt = golden["prompt_ids"]
    first, _ = run(engine, prompt)
    again, seq = run(engine, prompt)
    assert first == again == golden["greedy_ids"][:8]
    assert seq.stats.cached_tokens == len(prompt) - 1
    assert engine.stats.cached_tokens == len(prompt) - 1
    assert engine.stats.prompt_tokens == 2 * len(prompt)


def test_a_cancelled_sequence_offers_what_went_through_the_model(model, golden):
    engine = fresh(model)
    prompt = golden["prompt_ids"][:40]
    seq = engine.start(prompt, GREEDY, max_tokens=8)
    for _ in range(3):
        engine.step(seq)
    engine.release(seq)  # cancelled after 3 tokens: the prompt and 2 of them are in the cache
    assert seq.finish_reason == "cancelled"
    longer = seq.tokens + engine.tokenizer.encode(" so", add_special=False)
    got, again = run(engine, longer)
    assert again.stats.cached_tokens == len(prompt) + 2
    assert got == run(fresh(model), longer)[0]


# --- slots, forward calls and failures on a recording model ----------------

class RecordingBackend(CpuBackend):
    """The `Backend` defaults under the recording model (a decode step is its `forward`), one
    sequence per pass."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.max_batch = 1


class RecordingModel:
    """Answers every forward with logits picking token 100; `fail` makes the next call raise."""

    def __init__(self, gguf) -> None:
        self.gguf = gguf
        self.config = SimpleNamespace(vocab_size=gguf.config.vocab_size)
        self.backend = RecordingBackend()
        self.calls: list[tuple[int, int]] = []  # (n tokens, start_pos)
        self.fail = False

    def new_kv(self, n_ctx: int) -> KVCache:
        return KVCache(None, None, n_ctx)

    def forward(self, tokens, start_pos, kv, all_logits=True):
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")
        self.calls.append((len(tokens), start_pos))
        logits = np.zeros((1, self.config.vocab_size), np.float32)
        logits[0, 100] = 1.0
        return logits


@pytest.fixture
def recorded(smollm2) -> Engine:
    return Engine(RecordingModel(smollm2), Tokenizer.from_gguf(smollm2), n_ctx=64, n_slots=2)


@pytest.fixture
def one_slot(smollm2) -> Engine:
    return Engine(RecordingModel(smollm2), Tokenizer.from_gguf(smollm2), n_ctx=64, n_slots=1)


def test_the_slot_with_the_longest_prefix_is_chosen(recorded):
    a, b = recorded.start(list(range(1, 11)), GREEDY, 2), recorded.start(list(range(50, 61)), GREEDY, 2)
    assert (a.slot, b.slot) == (0, 1)
    for seq in (a, b):
        recorded.step(seq)
        recorded.release(seq)
    seq = recorded.start([50, 51, 52, 53, 99], GREEDY, 2)
    assert seq.slot == 1 and seq.n_cached == 4
    recorded.step(seq)
    assert recorded.model.calls[-1] == (1, 4)  # only the diverging token is evaluated
    other = recorded.start([7, 8], GREEDY, 2)  # no common prefix: the first free slot
    assert other.slot == 0 and other.n_cached == 0
    recorded.release(seq)
    recorded.release(other)


def test_a_prompt_inside_the_cache_reevaluates_its_last_token(recorded):
    run(recorded, list(range(1, 11)), max_tokens=3)  # slot 0 holds 1..10 and two 100s
    seq = recorded.start([1, 2, 3, 4], GREEDY, 2)
    recorded.step(seq)
    assert recorded.model.calls[-1] == (1, 3) and seq.stats.cached_tokens == 3
    recorded.release(seq)


def test_a_failed_prefill_forgets_the_slot(one_slot):
    prompt = list(range(1, 11))
    run(one_slot, prompt, max_tokens=2)
    seq = one_slot.start(prompt + [11, 12], GREEDY, 2)
    assert seq.n_cached == 10
    one_slot.model.fail = True
    with pytest.raises(RuntimeError, match="device lost"):
        one_slot.step(seq)
    one_slot.release(seq)
    again = one_slot.start(prompt, GREEDY, 2)
    assert again.n_cached == 0
    one_slot.step(again)
    assert one_slot.model.calls[-1] == (10, 0)
    one_slot.release(again)


def test_a_failed_decode_forgets_the_slot_too(one_slot):
    prompt = list(range(1, 11))
    seq = one_slot.start(prompt, GREEDY, 4)
    one_slot.step(seq)
    one_slot.model.fail = True
    with pytest.raises(RuntimeError, match="device lost"):
        one_slot.step(seq)
    one_slot.release(seq)
    assert one_slot.start(prompt, GREEDY, 2).n_cached == 0


def test_stats_rate_counts_only_evaluated_tokens(recorded):
    run(recorded, list(range(1, 11)), max_tokens=2)
    _, seq = run(recorded, list(range(1, 11)) + [100, 7, 8], max_tokens=2)
    s = seq.stats
    assert (s.prompt_tokens, s.cached_tokens) == (13, 11)
    assert s.prefill_tps == pytest.approx(2 / s.prefill_seconds)


def test_the_scheduler_reports_cached_tokens(recorded):
    scheduler = Scheduler(recorded, max_queue=4, metrics=Metrics())
    scheduler.start()
    try:
        finals = []
        for prompt in (list(range(1, 11)), list(range(1, 11)) + [100, 5]):
            items: queue.Queue = queue.Queue()
            scheduler.submit(Job(prompt, GREEDY, 2, [], items.put))
            while not isinstance(item := items.get(timeout=10), Finished):
                pass
            finals.append(item)
    finally:
        scheduler.stop()
    assert [f.cached_tokens for f in finals] == [0, 11]


# --- CUDA backend on the fake driver ----------------------------------------

def test_reuse_on_the_cuda_backend_keeps_its_decode_graph(tmp_path):
    from ukgpu.gpu.cuda.select import create_backend
    from ukgpu.llama_core.gguf.file import open_gguf

    from fakes.cuda_driver import FakeDriver
    from fakes.tiny_models import SHAPES, write_model

    gguf = open_gguf(write_model(tmp_path / "tiny.gguf", SHAPES["tiny-llama"]))

    def engine() -> tuple[Engine, object, FakeDriver]:
        fake = FakeDriver()
        be = create_backend(gguf=gguf, driver=fake, arena_bytes=64 << 20, n_ctx=64)
        return Engine.load(gguf, backend=be, n_ctx=64), be, fake

    reusing, be, fake = engine()
    prompt = reusing.tokenizer.encode("hello world, the quick brown fox")
    first, _ = run(reusing, prompt, max_tokens=6)
    follow = prompt + first[:-1] + reusing.tokenizer.encode(" jumps over", add_special=False)
    launches = fake.graph_launches
    got, seq = run(reusing, follow, max_tokens=6)
    assert seq.stats.cached_tokens == len(prompt) + len(first) - 1
    assert be.graphs.captures == 1  # the slot's graph from the first request is replayed
    assert fake.graph_launches - launches == len(got) - 1  # every decode step after prefill
    assert got == run(engine()[0], follow, max_tokens=6)[0]
