"""CPU prefill / decode throughput of ukgpu's engine next to llama.cpp, same machine, same run.

    .venv/bin/python tests/perf/bench_cpu.py --threads 2 [--peer-python /root/ref/venv/bin/python]

For each model: pp (one batched forward of --pp tokens from an empty cache) and
tg (--tg single-token forwards, greedy, from an empty cache), best of --reps;
each measurement runs in a fresh subprocess so peak RSS belongs to one model.
ukgpu's peak RSS is reported above the interpreter's own baseline (numpy, numba
and the kernels imported) and checked against model file + KV cache + 25%.
llama.cpp runs through llama-cpp-python (`eval` of --pp tokens, then --tg
one-token `eval`s) with n_threads = --threads.  Not a pytest module.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
PEER_PYTHON = "/root/ref/venv/bin/python"
ROOT = Path(__file__).parents[2]


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_ukgpu(model: str, pp: int, tg: int, reps: int, threads: int) -> dict:
    import numba
    import numpy as np

    from ukgpu.llama_core.cpu import matmul as cpu_kernels
    from ukgpu.llama_core.model import Model
    from ukgpu.llama_core.models.registry import resolve_model

    numba.set_num_threads(threads)
    cpu_kernels.warmup()
    baseline = _current_rss_mb()
    m = Model.load(model)
    kv = m.new_kv(pp + tg)
    prompt = (np.arange(pp) * 7919 + 11) % m.config.vocab_size
    m.forward(prompt[:8], 0, kv, all_logits=False)  # compile / touch every code path once
    best_pp = best_tg = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        m.forward(prompt, 0, kv, all_logits=False)
        best_pp = min(best_pp, time.perf_counter() - t0)
        token = 1
        t0 = time.perf_counter()
        for pos in range(tg):
            token = int(m.forward(np.array([token]), pos, kv, all_logits=False)[0].argmax())
        best_tg = min(best_tg, time.perf_counter() - t0)
    kv_mb = (kv.k.nbytes + kv.v.nbytes) / 2**20
    file_mb = resolve_model(model).stat().st_size / 2**20
    return {"pp_tps": pp / best_pp, "tg_tps": tg / best_tg, "peak_rss_mb": _rss_mb(),
            "baseline_rss_mb": baseline, "kv_mb": kv_mb, "file_mb": file_mb}


PEER_SCRIPT = r"""
import json, sys, time, resource
import llama_cpp.llama as L
defaults = L.llama_cpp.llama_model_default_params
def plain():  # repacked (AMX) weights crash on some virtual CPUs; see tools/dev/golden_logits.py
    p = defaults(); p.use_extra_bufts = False; return p
L.llama_cpp.llama_model_default_params = plain
path, pp, tg, reps, threads = sys.argv[1], *map(int, sys.argv[2:6])
llm = L.Llama(model_path=path, n_ctx=pp + tg + 8, n_batch=pp, n_ubatch=pp, n_threads=threads,
              n_threads_batch=threads, flash_attn=False, verbose=False)
prompt = [(i * 7919 + 11) % llm.n_vocab() for i in range(pp)]
llm.eval(prompt[:8]); llm.reset()
best_pp = best_tg = float("inf")
for _ in range(reps):
    llm.reset(); t0 = time.perf_counter(); llm.eval(prompt); best_pp = min(best_pp, time.perf_counter() - t0)
    llm.reset(); t0 = time.perf_counter()
    for _ in range(tg):
        llm.eval([1])
    best_tg = min(best_tg, time.perf_counter() - t0)
print(json.dumps({"pp_tps": pp / best_pp, "tg_tps": tg / best_tg,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_worker(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--peer-python", default=PEER_PYTHON, help="a Python with llama-cpp-python ('' skips)")
    ap.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker_ukgpu(args.worker[0], args.pp, args.tg, args.reps, args.threads)))
        return 0
    from ukgpu.llama_core.models.registry import resolve_model

    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               NUMBA_NUM_THREADS=str(args.threads))
    common = ["--pp", str(args.pp), "--tg", str(args.tg), "--reps", str(args.reps),
              "--threads", str(args.threads)]
    print(f"| model | impl | pp{args.pp} t/s | tg{args.tg} t/s | peak RSS MB | RSS budget MB |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        ours = run_worker([sys.executable, __file__, "--worker", model, *common], env)
        budget = (ours["file_mb"] + ours["kv_mb"]) * 1.25
        grown = ours["peak_rss_mb"] - ours["baseline_rss_mb"]
        print(f"| {model} | ukgpu cpu | {ours['pp_tps']:.1f} | {ours['tg_tps']:.1f} | "
              f"{grown:.0f} above a {ours['baseline_rss_mb']:.0f} baseline | {budget:.0f} |", flush=True)
        if args.peer_python and Path(args.peer_python).exists():
            peer = run_worker([args.peer_python, "-c", PEER_SCRIPT, str(resolve_model(model)),
                               str(args.pp), str(args.tg), str(args.reps), str(args.threads)], env)
            print(f"| {model} | llama.cpp | {peer['pp_tps']:.1f} | {peer['tg_tps']:.1f} | "
                  f"{peer['peak_rss_mb']:.0f} | |", flush=True)
            print(f"|  | ratio ukgpu/llama.cpp | {ours['pp_tps'] / peer['pp_tps']:.2f} | "
                  f"{ours['tg_tps'] / peer['tg_tps']:.2f} | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
