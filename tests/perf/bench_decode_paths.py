"""CPU decode paths, timed in one process (not collected by pytest; run it directly):

    python tests/perf/bench_decode_paths.py [-m smollm2-135m] [--reps 15]

- forward: one `Model.forward` of n = 1, 2, 4, 8, 16 tokens at position 100 (mat-vec block
  kernels up to 4 rows, 4-row chunks up to 16, dequantized slabs above);
- attention: one query over 64 / 256 / 1024 cached keys with the model's head layout
  (`cpu_ops_nb.attend_one`);
- engine: 4 greedy sequences of 32 tokens, `Engine.step` per sequence against `Engine.step_all`
  (batched decode), alternating, twice each.
Medians; the machine's other load shows in the spread, so compare within one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ukgpu.llama_core.cpu import rope_attention as cpu_ops_nb
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "The three primary colors are"]


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def forward_rows(model: Model, reps: int) -> None:
    kv = model.new_kv(256)
    model.forward(np.arange(8), 0, kv)
    for n in (1, 2, 4, 8, 16):
        ms = _median_ms(lambda: model.forward(np.arange(n) + 5, 100, kv), reps)
        print(f"forward {n:2d} tokens: {ms:7.1f} ms  ({ms / n:5.1f} ms/token)")


def attention(model: Model, reps: int) -> None:
    c = model.config
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((c.n_kv_heads, 2048, c.head_dim)).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    q = rng.standard_normal(c.n_heads * c.head_dim).astype(np.float32)
    out = np.empty_like(q)
    scale = np.float32(1 / np.sqrt(c.head_dim))
    for end in (64, 256, 1024):
        ms = _median_ms(lambda: cpu_ops_nb.attend_one(q, keys, values, end, scale, out), reps * 4)
        print(f"attention, {c.n_heads}/{c.n_kv_heads} heads x {c.head_dim}, {end:4d} keys: "
              f"{ms * 1e3:6.0f} us")


def engine_batch(model_name: str) -> None:
    eng = Engine.load(model_name, backend="cpu", n_ctx=256, n_slots=len(PROMPTS))
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]

    def run(batched: bool) -> float:
        seqs = [eng.start(p, SamplingParams(temperature=0.0), 32) for p in prompts]
        t0, n = time.perf_counter(), 0
        while any(s.finish_reason is None for s in seqs):
            results = eng.step_all(seqs) if batched else [eng.step(s) for s in seqs]
            n += sum(len(r) for r in results)
        seconds = time.perf_counter() - t0
        for s in seqs:
            eng.release(s)
        return n / seconds

    run(True), run(False)
    for batched in (False, True, False, True):
        label = "step_all (batched)" if batched else "step per sequence "
        print(f"engine, {len(prompts)} sequences x 32 tokens, {label}: {run(batched):6.1f} tokens/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    model = Model.load(args.model)
    forward_rows(model, args.reps)
    attention(model, args.reps)
    engine_batch(args.model)


if __name__ == "__main__":
    main()
