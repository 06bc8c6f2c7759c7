"""Where a CPU decode step's time goes: per backend op, and per matrix type with its GB/s.

    python3 tools/dev/profile_cpu_decode.py smollm2-135m [--steps 32]

Prints (1) the compiled step's and the generic forward's ms per token, (2) the generic forward's
time per backend op (calls per token beside it), and (3) each matrix type's mat-vec time summed
over one token's matrices, timed alone, with the weight bytes and GB/s.  The model is prefilled
with 16 tokens first; numba's threads are NUMBA_NUM_THREADS (default: all cores).
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import numpy as np

OPS = ("embedding", "matmul", "rmsnorm", "rope", "attention", "rmsnorm_heads", "swiglu", "gelu_gate", "add",
       "scale", "take_rows", "to_host")


def _per_token(step, steps: int, start: int) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        step(start + i)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    from ukgpu.llama_core.model import Model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    model = Model.load(args.model)
    be, n = model.backend, args.steps
    kv = model.new_kv(16 + 4 * n + 8)
    model.forward(np.arange(1, 17), 0, kv, all_logits=False)
    token = np.array([5])

    def fused(pos: int) -> None:
        be.decode(model, 5, pos, kv)

    def generic(pos: int) -> None:
        model.forward(token, pos, kv, all_logits=False)

    fused(16)
    print(f"{args.model}: compiled step {_per_token(fused, n, 17) * 1e3:.2f} ms/token, "
          f"generic forward {_per_token(generic, n, 17 + n) * 1e3:.2f} ms/token "
          f"({os.environ.get('NUMBA_NUM_THREADS', os.cpu_count())} threads)")

    _per_op(model, generic, n, 17 + 2 * n)
    _per_type(model)


def _per_op(model, generic, n: int, start: int) -> None:
    be = model.backend
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()

    def timer(op: str):
        inner = getattr(be, op)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[op] += time.perf_counter() - t
                calls[op] += 1
        return timed

    for op in OPS:
        setattr(be, op, timer(op))
    total = _per_token(generic, n, start)
    for op in OPS:
        delattr(be, op)
    print(f"generic forward, timed per op: {total * 1e3:.2f} ms/token, {sum(calls.values()) / n:.0f} calls/token")
    for op, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {op:14s} {s / n * 1e3:8.3f} ms  {calls[op] / n:5.0f} calls")


def _per_type(model) -> None:
    from ukgpu.llama_core.cpu import matmul

    by_type: dict[tuple[str, bool], list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    w = model.weights
    mats = [m for lw in w.layers for m in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down)] + [w.output]
    rng = np.random.default_rng(0)
    for m in mats:
        pw = m.kernel
        x = rng.standard_normal((1, pw.shape[1])).astype(np.float32)
        matmul.qmatmul(x, pw)
        t = time.perf_counter()
        for _ in range(5):
            matmul.qmatmul(x, pw)
        row = by_type[(pw.qtype.name, pw.tiles is not None)]
        row[0] += (time.perf_counter() - t) / 5
        row[1] += pw.nbytes
        row[2] += 1
    print("mat-vec per matrix type (each matrix timed alone, summed over one token):")
    for (name, tiled), (s, nbytes, count) in by_type.items():
        print(f"  {name:6s} {'repacked' if tiled else 'raw rows':8s} {count:4.0f} matrices {nbytes / 1e6:7.1f} MB "
              f"{s * 1e3:7.2f} ms  {nbytes / s / 1e9:5.2f} GB/s")
    print(f"  sum {sum(r[0] for r in by_type.values()) * 1e3:.2f} ms/token")


if __name__ == "__main__":
    main()
