"""Engine: slots, prefill/decode steps, stop strings, EOS, limits, stats.

Generation on the real SmolLM2 model checks the greedy tokens against
llama.cpp's; the text-streaming rules run on a scripted model (logits that pick
a fixed token sequence) with the real tokenizer, so every edge is exact.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ukgpu.llama_core.backend import KVCache
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.engine import ContextFullError, Engine, EngineError, NoFreeSlotError
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.sampling import SamplingParams
from ukgpu.llama_core.text.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)
GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "smollm2-135m.npz"


@pytest.fixture(scope="module")
def engine(smollm2) -> Engine:
    return Engine.load(Model(smollm2, CpuBackend()), n_ctx=160, n_slots=2)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in ("prompt_ids", "greedy_ids")}


class ScriptedBackend(CpuBackend):
    """The `Backend` defaults under the scripted model: a decode step is its `forward`."""

    name = "scripted"


class ScriptedModel:
    """Answers every forward with logits whose argmax is the next scripted token."""

    def __init__(self, gguf, script: list[int]) -> None:
        self.gguf, self.script = gguf, script
        self.config = SimpleNamespace(vocab_size=gguf.config.vocab_size)
        self.backend = ScriptedBackend()
        self.calls: list[tuple[int, int]] = []  # (n tokens, start_pos)

    def new_kv(self, n_ctx: int) -> KVCache:
        return KVCache(None, None, n_ctx)

    def forward(self, tokens, start_pos, kv, all_logits=True):
        self.calls.append((len(tokens), start_pos))
        logits = np.zeros((1, self.config.vocab_size), np.float32)
        logits[0, self.script[len(self.calls) - 1]] = 1.0
        return logits


@pytest.fixture(scope="module")
def tokenizer(smollm2) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2)


def scripted(smollm2, tokenizer, text: str, eos: bool = False) -> tuple[Engine, list[int]]:
    script = tokenizer.encode(text, add_special=False)
    if eos:
        script.append(tokenizer.eos_id)
    engine = Engine(ScriptedModel(smollm2, script), tokenizer, n_ctx=64, n_slots=1)
    return engine, script


def run_all(engine: Engine, max_tokens: int = 40, stop=()) -> tuple[str, list, str]:
    events = list(engine.generate([1, 2, 3], GREEDY, max_tokens, stop))
    return "".join(e.text for e in events), events, events[-1].finish_reason


# --- on the real model ---------------------------------------------------

def test_greedy_generation_matches_llamacpp(engine, golden):
    events = list(engine.generate(golden["prompt_ids"], GREEDY, max_tokens=8))
    ids = [e.token_id for e in events]
    assert ids == golden["greedy_ids"][:8].tolist()
    assert "".join(e.text for e in events) == engine.tokenizer.decode(ids)
    assert events[-1].finish_reason == "length"


def test_interleaved_sequences_do_not_disturb_each_other(engine, golden):
    prompt = golden["prompt_ids"]
    a = engine.start(prompt, GREEDY, max_tokens=4)
    b = engine.start(prompt[:20], GREEDY, max_tokens=4)
    out = {id(a): [], id(b): []}
    try:
        while a.finish_reason is None or b.finish_reason is None:
            for seq in (a, b):
                out[id(seq)] += [e.token_id for e in engine.step(seq)]
    finally:
        engine.release(a)
        engine.release(b)
    assert out[id(a)] == golden["greedy_ids"][:4].tolist()
    alone = [e.token_id for e in engine.generate(prompt[:20], GREEDY, max_tokens=4)]
    assert out[id(b)] == alone


def test_stats_count_tokens_and_time(engine, golden):
    seq = engine.start(golden["prompt_ids"][:10], GREEDY, max_tokens=4)
    while seq.finish_reason is None:
        engine.step(seq)
    engine.release(seq)
    s = seq.stats
    assert (s.prompt_tokens, s.generated_tokens) == (10, 4)
    assert s.prefill_seconds > 0 and s.decode_seconds > 0 and s.decode_tps > 0
    assert engine.stats.generated_tokens >= 4


def test_prompt_plus_max_tokens_beyond_context_is_refused(engine):
    with pytest.raises(ContextFullError, match="larger n_ctx"):
        engine.start(list(range(150)), GREEDY, max_tokens=11)
    with pytest.raises(EngineError, match="empty"):
        engine.start([], GREEDY, max_tokens=1)


def test_room_is_the_one_context_check(engine):
    """`start` and the HTTP API (which clips max_tokens to the room) ask `room` alone."""
    assert engine.room(150) == 10 and engine.room(150, max_tokens=10) == 10
    with pytest.raises(ContextFullError) as info:
        engine.room(160)
    assert (info.value.prompt_tokens, info.value.max_tokens, info.value.n_ctx) == (160, 1, 160)


def test_slots_run_out_and_come_back(engine):
    a = engine.start([1, 2], GREEDY, 2)
    b = engine.start([1, 2], GREEDY, 2)
    with pytest.raises(NoFreeSlotError, match="release"):
        engine.start([1, 2], GREEDY, 2)
    engine.release(a)
    engine.release(a)  # idempotent
    c = engine.start([1, 2], GREEDY, 2)
    engine.release(b)
    engine.release(c)
    assert engine.step(c) == [] and c.finish_reason == "cancelled"


def test_auto_backend_falls_back_to_cpu_with_one_line(smollm2, capsys):
    eng = Engine.load(smollm2, backend="auto", n_ctx=16)
    err = capsys.readouterr().err.strip().splitlines()
    if eng.model.backend.name == "cpu":
        assert len(err) == 1 and "cpu" in err[0] and eng.backend_note in err[0]
    with pytest.raises(EngineError, match="'cpu', 'auto' or 'cuda'"):
        Engine.load(smollm2, backend="tpu")


def test_a_backend_decode_step_is_the_models_forward_by_default(smollm2, monkeypatch):
    """The `Backend` defaults (the CPU's with its compiled step switched off; that step has its
    own tests in test_decode_step.py): `decode` is a one-token forward, `decode_greedy` the
    token a greedy sampler picks from it; no device memory to report or free."""
    from ukgpu.llama_core.sampling import Sampler

    monkeypatch.setenv("UKGPU_CPU_FUSED_DECODE", "0")
    model = Model(smollm2, CpuBackend())
    a, b = model.new_kv(16), model.new_kv(16)
    for kv in (a, b):
        model.forward(np.array([1, 504, 3458]), 0, kv)
    got = model.backend.decode(model, 314, 3, a)
    want = model.forward(np.array([314]), 3, b, all_logits=False)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(a.k[:, :, :4], b.k[:, :, :4])
    assert model.backend.decode_greedy(model, 314, 3, a) == Sampler(GREEDY)(want[-1])
    assert model.backend.usage() == "" and model.backend.close() is None


def test_decode_steps_go_through_the_backend(smollm2):
    """Past the prompt, plain greedy steps are `decode_greedy`, sampled ones `decode`."""
    class Counting(CpuBackend):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def decode(self, model, token, start_pos, kv):
            self.calls.append("decode")
            return super().decode(model, token, start_pos, kv)

        def decode_greedy(self, model, token, start_pos, kv):
            self.calls.append("greedy")
            return super().decode_greedy(model, token, start_pos, kv)

    backend = Counting()
    eng = Engine.load(Model(smollm2, backend), n_ctx=32)
    greedy = [e.token_id for e in eng.generate([1, 504, 3458], GREEDY, 4)]
    assert backend.calls == ["greedy", "decode"] * 3  # the default decode_greedy decodes
    backend.calls.clear()
    list(eng.generate([1, 504, 3458], SamplingParams(temperature=0.8, seed=1), 4))
    assert backend.calls == ["decode"] * 3
    plain = Engine.load(Model(smollm2, CpuBackend()), n_ctx=32)
    assert [e.token_id for e in plain.generate([1, 504, 3458], GREEDY, 4)] == greedy


# --- streaming rules on a scripted model ---------------------------------

TEXT = "Hello there, general Kenobi! You are a bold one."


def test_prefill_once_then_one_token_per_step(smollm2, tokenizer):
    engine, script = scripted(smollm2, tokenizer, TEXT)
    run_all(engine, max_tokens=5)
    assert engine.model.calls == [(3, 0), (1, 3), (1, 4), (1, 5), (1, 6)]


def test_length_finish_emits_everything(smollm2, tokenizer):
    engine, script = scripted(smollm2, tokenizer, TEXT)
    text, events, reason = run_all(engine, max_tokens=len(script))
    assert text == TEXT and reason == "length" and len(events) == len(script)


def test_eos_stops_without_emitting_its_text(smollm2, tokenizer):
    engine, _ = scripted(smollm2, tokenizer, TEXT, eos=True)
    text, events, reason = run_all(engine)
    assert text == TEXT and reason == "stop"
    assert events[-1].token_id == tokenizer.eos_id and events[-1].text == ""


@pytest.mark.parametrize("stop", ["general", ", gen", "Kenobi!", "e", "one."])
def test_stop_string_cuts_the_text_before_it(smollm2, tokenizer, stop):
    engine, _ = scripted(smollm2, tokenizer, TEXT)
    text, _, reason = run_all(engine, stop=[stop, "never seen"])
    assert reason == "stop" and text == TEXT[: TEXT.find(stop)]


def test_text_that_only_looks_like_a_stop_prefix_is_released(smollm2, tokenizer):
    engine, script = scripted(smollm2, tokenizer, TEXT)
    text, events, reason = run_all(engine, max_tokens=len(script), stop=["Kenobi?", "one.."])
    assert text == TEXT and reason == "length"
    # held back while ambiguous: "Kenobi" waits for the next token
    emitted = "".join(e.text for e in events[: len(tokenizer.encode("Hello there, general Kenobi",
                                                                      add_special=False))])
    assert not emitted.endswith("Kenobi")
