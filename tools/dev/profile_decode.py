"""One decode step's kernels, for a profiler: prefill a prompt, then one eager decode forward
between cuProfilerStart and cuProfilerStop (the same kernels the decode graph replays).

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \\
        python3 tools/dev/profile_decode.py qwen2.5-coder-1.5b [--pos 100]
    python3 tools/dev/profile_decode.py --summarize ncu.csv     # per-kernel-name totals

Needs an NVIDIA GPU; the model is the synthetic one of that name (`llama_core.synthetic`).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def profile(name: str, pos: int) -> None:
    import numpy as np
    from cuda.bindings import driver

    from ukgpu.gpu.cuda.select import create_backend
    from ukgpu.llama_core.gguf.file import open_gguf
    from ukgpu.llama_core.gguf.synthetic import build_synthetic
    from ukgpu.llama_core.model import Model

    gguf = open_gguf(build_synthetic(name))
    be = create_backend(gguf=gguf, n_ctx=2048, n_slots=1)
    model = Model(gguf, be)
    kv = model.new_kv(2048)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, pos)
    model.forward(prompt, 0, kv, all_logits=False)
    driver.cuProfilerStart()
    model.forward(np.array([int(prompt[-1])]), pos, kv, all_logits=False)
    driver.cuCtxSynchronize()
    driver.cuProfilerStop()


def summarize(path: Path) -> str:
    """Per kernel name and grid (the grid tells a model's matrices apart): launches, total and mean
    microseconds, share of the step's kernel time."""
    rows = [r for r in csv.DictReader(line for line in path.read_text().splitlines()
                                      if line.startswith('"'))
            if r.get("Metric Name") == "gpu__time_duration.sum"]
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for r in rows:
        ns = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        us = ns / 1000 if unit.startswith("n") else ns if unit.startswith("u") else ns * 1000
        key = f"{r['Kernel Name']} grid {r.get('Grid Size', '?')}"  # one name covers many entries
        total[key] += us
        count[key] += 1
    step = sum(total.values())
    out = [f"{len(rows)} kernels, {step:,.1f} us of kernel time",
           "| kernel, grid | launches | total us | mean us | share |", "|---|---|---|---|---|"]
    for k in sorted(total, key=total.get, reverse=True):
        out.append(f"| {k} | {count[k]} | {total[k]:,.1f} | {total[k] / count[k]:.2f} | "
                   f"{100 * total[k] / step:.1f}% |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b")
    ap.add_argument("--pos", type=int, default=100, help="prompt length before the profiled step")
    ap.add_argument("--summarize", type=Path, help="an ncu --csv output to total per kernel")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    profile(args.model, args.pos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
