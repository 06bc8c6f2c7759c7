"""Prefill / decode speed of a ukgpu backend on one model, measured like llama-bench.

pp<N>: one forward pass of N prompt tokens into an empty KV cache (last-position
logits only); tg<N>: N greedy single-token steps starting from an empty cache
(the backend's `decode_greedy`: the model's forward on the CPU, a CUDA graph replay);
ttft: prefill plus choosing the first token.  Prompt ids are seeded random ids,
so the peer sees the same token count with no tokenizer in the timing.  One
warm-up of each test precedes the timed repeats.  Each (model, backend) pair runs
in its own process (`python -m ukgpu.tools.bench.backend_run`), so peak RSS
belongs to that pair alone and one failure cannot take the others down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ukgpu.tools.bench.schema import Entry, Result, entry_from_dict


@dataclass(frozen=True)
class RunConfig:
    n_prompt: int = 512
    n_gen: int = 128
    repeats: int = 3
    warmup: int = 1
    seed: int = 0


def backend_unavailable(name: str) -> str | None:
    """Why backend `name` cannot run here, or None if it can."""
    if name in ("cpu", "cpu-q8"):
        return None
    if name != "cuda":
        return f"unknown backend {name!r} (known: cpu, cpu-q8, cuda)"
    try:
        from ukgpu.gpu.cuda.select import probe
    except ImportError as exc:
        return f"ukgpu.gpu.cuda.select cannot be imported ({exc})"
    try:
        ok, reason = probe()
    except Exception as exc:  # a probe that fails is itself the reason
        return f"the CUDA probe raised {type(exc).__name__}: {exc}"
    return None if ok else reason


def make_backend(name: str, gguf=None):
    """Backend `name` ("cpu" | "cpu-q8" | "cuda") for the model `gguf`; a GPU that cannot run it raises.
    "cpu-q8" is the CPU backend rounding activations to 8 bits as llama.cpp does (its numerics)."""
    from ukgpu.llama_core.backend_choice import open_backend

    if name == "cpu-q8":
        from ukgpu.llama_core.cpu.backend import CpuBackend

        return CpuBackend(activations="q8")
    return open_backend(name, gguf)[0]


def measure(model_path: Path, model_name: str, backend_name: str, cfg: RunConfig) -> Entry:
    """Runs in the child process: load, warm up, time; returns the entry."""
    from tqdm import tqdm

    from ukgpu.llama_core.gguf.file import open_gguf
    from ukgpu.llama_core.model import Model

    t0 = time.perf_counter()
    gguf = open_gguf(model_path)
    model = Model(gguf, make_backend(backend_name, gguf))
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    prompt = np.random.default_rng(cfg.seed).integers(0, vocab, cfg.n_prompt)  # int[n_prompt]
    n_ctx = max(cfg.n_prompt, cfg.n_gen) + 1
    pp, ttft, tg = [], [], []
    runs = cfg.warmup + cfg.repeats
    label = f"{model_name} {backend_name}"
    for i in tqdm(range(runs), desc=label, unit="run", file=sys.stderr, leave=False):
        kv = model.new_kv(n_ctx)
        t0 = time.perf_counter()
        logits = model.forward(prompt, 0, kv, all_logits=False)  # [1, vocab]
        t1 = time.perf_counter()
        int(np.argmax(logits[-1]))
        t2 = time.perf_counter()
        kv = model.new_kv(n_ctx)
        token = int(prompt[0])
        t3 = time.perf_counter()
        for pos in range(cfg.n_gen):
            token = model.backend.decode_greedy(model, token, pos, kv)
        t4 = time.perf_counter()
        if i >= cfg.warmup:
            pp.append(t1 - t0)
            ttft.append(t2 - t0)
            tg.append(t4 - t3)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    results = [
        Result.of(f"pp{cfg.n_prompt}", "tokens/s", [cfg.n_prompt / s for s in pp]),
        Result.of(f"tg{cfg.n_gen}", "tokens/s", [cfg.n_gen / s for s in tg]),
        Result.of("ttft", "s", ttft),
        Result.of("peak_rss", "MiB", [peak_mib]),
    ]
    info = {"load_s": round(load_s, 3), "model_file": str(model_path), "n_ctx": n_ctx,
            "backend": type(model.backend).__name__, "threads": _threads()}
    if getattr(model.backend, "activations", None):  # the CPU backend's numerics: f32 (exact) or q8
        info["activations"] = model.backend.activations
    usage = model.backend.usage()
    if usage:  # device backends report their memory use
        info["device_memory"] = usage
    return Entry(model_name, backend_name, "backend", True, None, results, info)


def _threads() -> int | None:
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # numba absent or not initialised: the count is informational only
        return None


def run_in_child(model_path: Path, model_name: str, backend_name: str, cfg: RunConfig, threads: int,
                 timeout_s: float = 3600.0) -> Entry:
    """`measure` in a fresh interpreter with `threads` numba threads; a crash becomes an
    unavailable entry with its reason."""
    cmd = [sys.executable, "-m", __name__, str(model_path), model_name, backend_name, json.dumps(asdict(cfg))]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return Entry.unavailable(model_name, backend_name, "backend", f"timed out after {timeout_s:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return Entry.unavailable(model_name, backend_name, "backend",
                                 f"benchmark process failed (exit {done.returncode}); see its stderr above")
    return entry_from_dict(json.loads(lines[-1]), f"{backend_name} on {model_name}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ukgpu.tools.bench.backend_run")
    parser.add_argument("model_path", type=Path)
    parser.add_argument("model_name")
    parser.add_argument("backend")
    parser.add_argument("config", help="RunConfig as JSON")
    args = parser.parse_args(argv)
    entry = measure(args.model_path, args.model_name, args.backend, RunConfig(**json.loads(args.config)))
    print(json.dumps(asdict(entry)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
