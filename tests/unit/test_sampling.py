"""Each sampling knob's semantics on hand-built logits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ukgpu.llama_core.sampling import Sampler, SamplingError, SamplingParams

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)


def draws(params: SamplingParams, logits=LOGITS, n: int = 4000, history=()) -> Counter:
    sampler = Sampler(params)
    return Counter(sampler(logits, history) for _ in range(n))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_zero_is_argmax_and_ignores_seed():
    for seed in (None, 1, 2):
        assert draws(SamplingParams(temperature=0, seed=seed), n=20) == Counter({0: 20})


def test_temperature_matches_softmax_frequencies():
    for temp in (0.5, 1.0, 2.0):
        counts = draws(SamplingParams(temperature=temp, seed=7), n=20000)
        freq = np.array([counts[i] for i in range(len(LOGITS))]) / 20000
        expected = softmax(LOGITS / temp)
        assert np.abs(freq - expected).max() < 0.015, (temp, freq, expected)


def test_higher_temperature_flattens():
    cold = draws(SamplingParams(temperature=0.3, seed=1))
    hot = draws(SamplingParams(temperature=3.0, seed=1))
    assert cold[0] > hot[0] and cold[5] <= hot[5]


def test_top_k_keeps_only_the_k_best():
    counts = draws(SamplingParams(temperature=5.0, top_k=2, seed=3))
    assert set(counts) == {0, 1}


def test_top_p_keeps_the_smallest_nucleus():
    probs = softmax(LOGITS)  # [0.57, 0.21, 0.13, 0.08, 0.03, 0.004]
    p = float(probs[0] + probs[1]) - 0.01  # two tokens reach it, one does not
    counts = draws(SamplingParams(temperature=1.0, top_p=p, seed=4))
    assert set(counts) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=4))) == {0}


def test_top_p_beyond_the_first_guess_sorts_everything():
    logits = np.zeros(5000, dtype=np.float32)  # uniform: the nucleus of 0.5 is 2500 tokens
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=5))
    ids, probs = sampler._candidates(logits)
    assert len(ids) == 2500 and abs(probs.sum() - 1) < 1e-6


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    probs = softmax(LOGITS)
    min_p = float(probs[2] / probs[0]) + 1e-3  # token 2 falls just below
    counts = draws(SamplingParams(temperature=1.0, min_p=min_p, seed=6))
    assert set(counts) == {0, 1}


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([3.0, 2.5, -1.0, -1.2], dtype=np.float32)
    greedy = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5))
    assert greedy(logits, history=[0]) == 1  # 3.0 / 1.5 = 2.0 < 2.5
    assert greedy(logits, history=[3]) == 0
    penalized = greedy._penalized(logits, [2])
    assert penalized[2] == pytest.approx(-1.5)  # negative: multiplied
    assert penalized[3] == pytest.approx(-1.2)


def test_extreme_penalty_keeps_logits_finite_and_sampling_defined():
    """A denormal repeat_penalty (the schema allows any value above 0) divides a positive logit
    to inf; the penalized logits stay finite, so sampling still draws a real token."""
    logits = np.array([3.0, 2.5, -1.0], dtype=np.float32)
    for penalty in (5e-324, 1e-300):
        params = SamplingParams(temperature=0.7, repeat_penalty=penalty, seed=1)
        sampler = Sampler(params)
        with np.errstate(over="raise", divide="raise", invalid="raise"):
            penalized = sampler._penalized(logits, [0, 2])
            assert np.isfinite(penalized).all()
            assert sampler(logits, history=[0, 2]) == 0  # boosted to the float32 maximum


def test_repeat_last_n_limits_the_window():
    logits = np.array([3.0, 2.5, 0.0], dtype=np.float32)
    in_window = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=2))
    assert in_window(logits, history=[0, 2, 1]) == 0  # token 0 fell out of the window
    assert in_window(logits, history=[1, 2, 0]) == 1  # token 0 is in it: 3.0 / 2 < 2.5
    whole = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=-1))
    assert whole(logits, history=[0, 2, 2]) == 1


def test_presence_and_frequency_penalties():
    logits = np.array([3.0, 2.0, 0.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25))
    out = sampler._penalized(logits, [0, 0, 0, 2])
    assert out == pytest.approx([3.0 - 0.5 - 0.75, 2.0, 0.0 - 0.5 - 0.25])
    assert sampler(logits, [0, 0, 0, 2]) == 1


def test_seed_reproducible_and_seeds_differ():
    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, top_k=4, seed=seed))
        return [sampler(LOGITS) for _ in range(50)]

    assert run(1234) == run(1234)
    assert run(1234) != run(4321)


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": 2.0},
    {"repeat_penalty": 0.0}, {"repeat_last_n": -2},
])
def test_invalid_params_raise_a_clear_error(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-300, 1e-246, 1e-30])
def test_tiny_temperature_with_min_p_picks_the_argmax(temperature):
    """Found by the API fuzzer: a temperature near 0 once overflowed to NaN and emptied the set."""
    logits = np.array([0.5, 3.0, -1.0, 2.9], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=temperature, min_p=0.7, top_p=0.54, seed=1))
    assert sampler(logits) == 1
