"""ukgpu's CUDA backend vs llama.cpp CUDA: pp512 and tg128 on synthetic models of real shapes.

    python tests/perf/bench_cuda.py [--llama-bench PATH] [--json out.json] [--repeats 5]
                                    [--models qwen2.5-coder-1.5b smollm2-135m] [--quick]
                                    [--llama-only]

Not collected by pytest; needs an NVIDIA GPU (sm_80+) and the NVIDIA driver.  Models are the
random-weight files of `llama_core.synthetic` (every tensor with the real model's type and shape:
Qwen2.5-Coder-1.5B Q4_K_M, SmolLM2-135M Q4_1), built on first use, so nothing large has to travel.

- pp512: one forward pass of 512 prompt tokens into an empty KV cache, last-position logits copied
  to the host (prefill through the GEMM kernels).
- tg128: 128 greedy tokens from position 0, each one graph replay (`decode_greedy`: the argmax
  runs on the device, 4 bytes come back); the first step (eager + capture) is a warm-up.
- tg32 eager: the same through `Model.forward` (one Python launch per kernel), to show what the
  graph saves.
- tg64 x4: four sequences decoding together through the batch-size-4 graph of their slab, the
  B logits rows copied back each step as the server does; the sum of their tokens/s.
- roofline: tg128 against the tokens/s a step would reach if it only streamed its weights (the
  GGUF bytes of every block's matrices and the output matrix, what any engine must read) at the
  device-to-device copy bandwidth measured in the same run.
Each is repeated `--repeats` times after a warm-up; the median is reported.  llama.cpp numbers come
from a `llama-bench` binary built with -DGGML_CUDA=ON (`-ngl 99 -p 512 -n 128 -o json`), with
flash attention on and off, when `--llama-bench` is given; `--llama-only` runs llama-bench alone
(the GPU kit's second command).  `--quick` (the kit's dry run under the stand-in driver) measures
pp16 / tg4 / tg2 eager once: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ("qwen2.5-coder-1.5b", "smollm2-135m")
N_PROMPT, N_GEN, N_EAGER = 512, 128, 32
N_BATCH = 4  # sequences decoding together in the batch measurement
QUICK = (16, 4, 2)  # --quick: N_PROMPT, N_GEN, N_EAGER


def _median_rate(tokens: int, seconds: list[float]) -> float:
    return tokens / statistics.median(seconds)


def bench_ukgpu(path: Path, repeats: int) -> dict:
    from ukgpu.gpu.cuda.select import create_backend
    from ukgpu.llama_core.gguf.file import open_gguf
    from ukgpu.llama_core.model import Model

    t0 = time.perf_counter()
    gguf = open_gguf(path)
    be = create_backend(gguf=gguf, n_ctx=N_PROMPT + N_GEN + 8, n_slots=N_BATCH)
    model = Model(gguf, be)
    load_s = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, N_PROMPT)  # int[512]
    kv = model.new_kv(N_PROMPT + 8)
    pp = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        model.forward(prompt, 0, kv, all_logits=False)  # ends with a device->host copy: synced
        if i:
            pp.append(time.perf_counter() - t)
    kv = model.new_kv(N_GEN + 8)
    be.decode_greedy(model, int(prompt[0]), 0, kv)  # eager step + graph capture
    tg = []
    for _ in range(repeats):
        token, t = int(prompt[0]), time.perf_counter()
        for pos in range(N_GEN):
            token = be.decode_greedy(model, token, pos, kv)
        tg.append(time.perf_counter() - t)
    eager = []
    for _ in range(max(1, repeats // 2)):
        token, t = int(prompt[0]), time.perf_counter()
        for pos in range(N_EAGER):
            token = int(model.forward(np.array([token]), pos, kv, all_logits=False)[0].argmax())
        eager.append(time.perf_counter() - t)
    batch = bench_batch(be, model, [kv] + [model.new_kv(N_GEN + 8) for _ in range(N_BATCH - 1)],
                        int(prompt[0]), repeats)
    weight_bytes, device_bytes = decode_weight_bytes(model, gguf)
    return {f"tg{N_GEN // 2}_b{N_BATCH}": batch, "load_s": round(load_s, 2), f"pp{N_PROMPT}": _median_rate(N_PROMPT, pp),
            f"tg{N_GEN}": _median_rate(N_GEN, tg), f"tg{N_EAGER}_eager": _median_rate(N_EAGER, eager),
            "decode_weight_mb": round(weight_bytes / 1e6, 1),
            "decode_device_weight_mb": round(device_bytes / 1e6, 1),
            "device": be.ctx.info.line(), "arena": be.usage(),
            "kernels": sorted({k["kind"] + " " + k["target"] for k in be.kernels.describe()}),
            "pdl": be.kernels.pdl_off or "on"}  # programmatic dependent launch, or why it is off


def bench_batch(be, model, kvs: list, token: int, repeats: int) -> float:
    """Aggregate tokens/s of N_BATCH sequences decoding together, N_GEN // 2 steps, each step one
    replay of the batch graph of their slab (the caches share one) and B logits rows copied back,
    as the server's scheduler does; the first step (eager + capture) is a warm-up."""
    steps, tokens = N_GEN // 2, np.full(len(kvs), token)
    be.decode_batch(model, tokens, [0] * len(kvs), kvs)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for pos in range(steps):
            tokens = be.decode_batch(model, tokens, [pos] * len(kvs), kvs).argmax(axis=1)
        runs.append(time.perf_counter() - t)
    return _median_rate(steps * len(kvs), runs)


def decode_weight_bytes(model, gguf) -> tuple[int, int]:
    """(GGUF bytes, device bytes) of the weights every decode step reads at least once: each
    block's matrices and the output matrix (the embedding table only gives one row, unless it is
    also the output).  The roofline counts the GGUF bytes, the same for every engine; the device
    planes (ptx_kernels/repack.py) are at most a few percent more."""
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    w = model.weights
    mats = [getattr(lw, n) for lw in w.layers for n in names] + [w.output]
    return sum(gguf.tensors[m.name].data.nbytes for m in mats), sum(m.nbytes for m in mats)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, GB/s counting the bytes read and written (the decode roofline's
    bandwidth: a mat-vec at best streams its weights once)."""
    from bench_ptx_gpu import copy_bandwidth  # this folder's kernel benchmark

    from ukgpu.gpu.cuda.driver import open_device

    return copy_bandwidth(open_device(0), nbytes)


def roofline_line(name: str, res: dict, copy_gbs: float) -> str:
    """tg as a fraction of weight bytes / copy bandwidth (the issue's 60% goal for 1.5B)."""
    ceiling = copy_gbs * 1e3 / res["decode_weight_mb"]  # tokens/s if each token only streamed its weights
    tg = res[f"tg{N_GEN}"]
    return (f"{name}: tg{N_GEN} {tg:,.0f} t/s = {100 * tg / ceiling:.0f}% of the roofline "
            f"({res['decode_weight_mb']:.0f} MB of GGUF weights per token at {copy_gbs:,.0f} GB/s "
            f"copy bandwidth: {ceiling:,.0f} t/s)")


def bench_llama_cpp(binary: str, path: Path, repeats: int) -> dict:
    out = {}
    for fa in (1, 0):
        cmd = [binary, "-m", str(path), "-ngl", "99", "-p", str(N_PROMPT), "-n", str(N_GEN),
               "-r", str(repeats), "-fa", str(fa), "-o", "json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            out[f"fa{fa}"] = {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
            continue
        for rec in json.loads(done.stdout):
            test = f"pp{rec['n_prompt']}" if rec["n_gen"] == 0 else f"tg{rec['n_gen']}"
            out.setdefault(f"fa{fa}", {})[test] = rec["avg_ts"]
    return out


def llama_only(args: argparse.Namespace) -> int:
    """llama-bench alone on the synthetic models (no CUDA context of ours)."""
    from ukgpu.llama_core.gguf.synthetic import build_synthetic

    results = {name: {"llama.cpp": bench_llama_cpp(args.llama_bench, build_synthetic(name), args.repeats)}
               for name in args.models}
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--llama-bench", help="llama-bench binary built with CUDA")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="pp16/tg4, once (a dry run)")
    ap.add_argument("--llama-only", action="store_true", help="only llama-bench (needs --llama-bench)")
    args = ap.parse_args(argv)
    global N_PROMPT, N_GEN, N_EAGER
    if args.quick:
        N_PROMPT, N_GEN, N_EAGER = QUICK
        args.repeats = 1
    if args.llama_only:
        if not args.llama_bench:
            ap.error("--llama-only needs --llama-bench")
        return llama_only(args)
    from ukgpu.gpu.cuda.select import probe
    from ukgpu.llama_core.gguf.synthetic import build_synthetic

    ok, reason = probe()
    if not ok:
        print(f"bench_cuda: no usable CUDA GPU: {reason}", file=sys.stderr)
        return 2
    print(reason)
    copy_gbs = copy_bandwidth_gbs(16 << 20 if args.quick else 1 << 30)
    print(f"device copy bandwidth: {copy_gbs:,.0f} GB/s (read + write)")
    results = {}
    for name in args.models:
        path = build_synthetic(name, progress=True)
        res = {"ukgpu": bench_ukgpu(path, args.repeats)}
        if args.llama_bench:
            res["llama.cpp"] = bench_llama_cpp(args.llama_bench, path, args.repeats)
        results[name] = res
        print(json.dumps({name: res}, indent=1), flush=True)
        if args.json:  # after each model: a run stopped later keeps what it measured
            args.json.write_text(json.dumps({"copy_gbs": copy_gbs, **results}, indent=2) + "\n")
    print(f"\n| shape | ukgpu pp{N_PROMPT} | ukgpu tg{N_GEN} (graph) | ukgpu tg eager "
          f"| ukgpu tg{N_GEN // 2} x{N_BATCH} (sum) "
          f"| llama.cpp pp{N_PROMPT} fa on/off | llama.cpp tg{N_GEN} fa on/off |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        u, ll = res["ukgpu"], res.get("llama.cpp", {})

        def peer(test: str, ll: dict = ll) -> str:
            vals = [ll.get(f"fa{fa}", {}).get(test) for fa in (1, 0)]
            return " / ".join(f"{v:,.0f}" if isinstance(v, float) else "-" for v in vals)

        print(f"| {name} | {u[f'pp{N_PROMPT}']:,.0f} | {u[f'tg{N_GEN}']:,.0f} "
              f"| {u[f'tg{N_EAGER}_eager']:,.0f} | {u[f'tg{N_GEN // 2}_b{N_BATCH}']:,.0f} | {peer(f'pp{N_PROMPT}')} | {peer(f'tg{N_GEN}')} |")
    print()
    for name, res in results.items():
        print(roofline_line(name, res["ukgpu"], copy_gbs))
    if args.json:
        args.json.write_text(json.dumps({"copy_gbs": copy_gbs, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
