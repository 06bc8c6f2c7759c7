"""Benchmark of `cpu_kernels.qmatmul` (not collected by pytest).

    .venv/bin/python tests/perf/bench_cpu_kernels.py [--threads 2] [--reps 20] [--types Q4_1,Q8_0]
                                                     [--shapes smollm2,qwen05] [--decode-step]

For each type and real layer shape (out, in) of SmolLM2-135M and Qwen2.5-0.5B it times:
mat-vec (n=1) on the raw GGUF rows and on the `prepare`d (repacked) handle, mat-mat n=128,
and numpy float32 `x @ W.T` on the dequantized weight in the same run.  Weights are random
blocks with sane scales (the speed does not depend on the values).  GB/s counts the weight
bytes read once per call; GFLOP/s is 2*n*out*in per second.  Times are the median of
`--reps` calls (the minimum is printed too: the machine may be shared).

`--decode-step` times every matmul of one SmolLM2 decode step on the real model file
(all 30 layers' q,k,v,o,gate,up,down and the tied output head), with raw and prepared weights;
it also reports the process CPU time of one step, which preemption on a shared machine does
not inflate (with one thread it is the step's cost; with two, their sum).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType as T

from ukgpu.llama_core.cpu import matmul as ck
from ukgpu.llama_core.gguf import quants

SHAPES = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
    "qwen05": [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)],
}
DEFAULT_TYPES = "Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K,F16,F32"


def timeit(fn, reps: int, cpu: bool = False):
    """(median, min) wall seconds of fn() over reps calls after one warm call; with `cpu`,
    also the minimum process CPU seconds of one call (all threads; immune to preemption)."""
    fn()
    ts, cs = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    if cpu:
        return float(np.median(ts)), float(np.min(ts)), float(np.min(cs))
    return float(np.median(ts)), float(np.min(ts))


def bench_shape(q: T, n_out: int, n_in: int, reps: int, rng) -> list[str]:
    if n_in % quants.FORMATS[q].block.elems:
        return []
    raw = ck.random_blocks(q, n_out, n_in, rng)
    view = ck.RawWeight(q, (n_out, n_in), raw)
    prep = ck.prepare(view)
    dense = quants.dequantize(raw.reshape(-1), q, n_out * n_in).reshape(n_out, n_in)
    nbytes = raw.nbytes
    lines = []
    for n in (1, 128):
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        flop = 2.0 * n * n_out * n_in
        cases = [("raw", lambda: ck.qmatmul(x, view)), ("numpy f32", lambda: x @ dense.T)]
        if prep.tiles is not None:
            cases.insert(1, ("prepared", lambda: ck.qmatmul(x, prep)))
        for label, fn in cases:
            med, best = timeit(fn, reps if n == 1 else max(3, reps // 4))
            wbytes = dense.nbytes if label.startswith("numpy") else nbytes
            lines.append(f"| {q.name} | {n_out}x{n_in} | {n} | {label} | {med * 1e3:.3f} | {best * 1e3:.3f} "
                         f"| {wbytes / med / 1e9:.2f} | {flop / med / 1e9:.1f} |")
    return lines


def decode_step(reps: int) -> list[str]:
    """Time all matmuls of one SmolLM2-135M decode token (n=1) on the real weights."""
    from ukgpu.llama_core.gguf.file import open_gguf
    from ukgpu.llama_core.models.registry import resolve_model

    g = open_gguf(resolve_model("smollm2-135m"))
    names = [n for n in g.tensors if n.startswith("blk.") and n.endswith(".weight") and len(g.tensors[n].shape) == 2]
    names.append("output.weight" if "output.weight" in g.tensors else "token_embd.weight")
    views = [g.tensors[n] for n in names]
    lines = []
    for label, ws in (("raw", views), ("prepared", [ck.prepare(v) for v in views])):
        xs = [np.random.default_rng(0).standard_normal((1, w.shape[1])).astype(np.float32) for w in ws]

        def step():
            for x, w in zip(xs, ws):
                ck.qmatmul(x, w)

        med, best, cpu = timeit(step, reps, cpu=True)
        total = sum(np.asarray(v.data).nbytes for v in views)
        lines.append(f"| SmolLM2 decode step ({len(ws)} matmuls, {total / 1e6:.1f} MB) | {label} "
                     f"| {med * 1e3:.2f} | {best * 1e3:.2f} | {cpu * 1e3:.2f} | {total / best / 1e9:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--shapes", default="smollm2,qwen05")
    ap.add_argument("--decode-step", action="store_true")
    args = ap.parse_args()
    import numba

    numba.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"warmup (compile or load cached kernels): {ck.warmup():.2f} s; threads {numba.get_num_threads()}")
    rng = np.random.default_rng(0)
    if args.decode_step:
        print("| what | weights | median ms | min ms | min CPU ms (all threads) | GB/s (at min) |")
        print("|---|---|---|---|---|---|")
        print("\n".join(decode_step(args.reps)), flush=True)
    print("| type | out x in | n | path | median ms | min ms | GB/s (weights) | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for tname in args.types.split(","):
        for model in args.shapes.split(","):
            for n_out, n_in in SHAPES[model]:
                for line in bench_shape(T[tname], n_out, n_in, args.reps, rng):
                    print(line, flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
