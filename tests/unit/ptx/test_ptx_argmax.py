"""Two-launch argmax (argmax_part_f32 then argmax_reduce_f32, ptx_kernels/argmax.py) vs numpy's
argmax in interpreter mode, and the stand-in's emulation of both: a 151,936-wide row (qwen's
vocabulary), ties inside a part and across parts (the first index wins), the maximum in the last,
short part, rows of -inf, more parts than one reduce block."""

import numpy as np
import pytest
from conftest import SPECS, run_spec
from test_ptx_attention_fused import _Mem

from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.loader import argmax_split, evaluate

from fakes.cuda_kernels import emulator


def _rows(rng, v):
    x = rng.standard_normal((5, v)).astype(np.float32)
    x[1, [7, 3000, v - 1]] = 9.0  # tie across parts: 7 wins
    x[2, [v - 1]] = 9.0  # the last, short part
    x[3, :] = -np.inf
    x[4, [1500, 1501, 2047, 2048]] = 5.0  # ties in one part and at a part boundary
    return x


def _run(x, span):
    b, v = x.shape
    parts = -(-v // span)
    vals = {"B": b, "V": v, "span": span, "P": parts}
    got = run_spec("argmax_part_f32", {"logits": x, "part_val": np.full((b, parts), np.nan, np.float32),
                                       "part_idx": np.full((b, parts), -1, np.int32)}, vals)
    out = run_spec("argmax_reduce_f32", {"part_val": got["part_val"], "part_idx": got["part_idx"],
                                         "out": np.full(b, -1, np.int32)}, vals)
    return out["out"]


@pytest.mark.parametrize("v,span", [(151_936, None), (5_000, 1024), (300_000, 1024)])
def test_argmax_split(v, span, rng):
    span = span or argmax_split(v)[0]
    x = _rows(rng, v)
    np.testing.assert_array_equal(_run(x, span), R.argmax(x))


def test_argmax_split_sizes():
    assert argmax_split(151_936) == (1024, 149)
    assert argmax_split(262_144) == (2048, 128)
    assert argmax_split(1000) == (1024, 1)


def _emulate(name, arrays, values):
    spec = SPECS[name]
    mem = _Mem(arrays)
    args = {p: mem.ptrs[p] if t.startswith("*") else values[p] for p, t in spec.params}
    entry = {"name": name, "family": spec.family, "constexprs": spec.constexprs}
    emulator(entry)(mem, entry, args, tuple(evaluate(g, values) for g in spec.grid))
    return {k: mem.get(k, a) for k, a in arrays.items()}


def test_emulator_matches_numpy(rng):
    x = _rows(rng, 5_000)
    b, parts = x.shape[0], 5
    vals = {"B": b, "V": x.shape[1], "span": 1024, "P": parts}
    got = _emulate("argmax_part_f32", {"logits": x, "part_val": np.zeros((b, parts), np.float32),
                                       "part_idx": np.zeros((b, parts), np.int32)}, vals)
    out = _emulate("argmax_reduce_f32", {"part_val": got["part_val"], "part_idx": got["part_idx"],
                                         "out": np.full(b, -1, np.int32)}, vals)
    np.testing.assert_array_equal(out["out"], R.argmax(x))
