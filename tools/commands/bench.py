"""`ukgpu bench`: prefill/decode tokens/s, time to first token, memory, kernels, boot time."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.gguf.synthetic import SHAPES
from ukgpu.tools import argtypes

EPILOG = """\
Tests are named like llama-bench: ppN = N prompt tokens in one forward pass, tgN = N
single-token steps, both in tokens/s; ttft = prefill + first token, in seconds. Each
(model, backend) pair runs in its own process after one warm-up; the report gives the
median and the spread (min/max and quartiles) of the repeats.

Peers (llama.cpp on the same device as the backend it is compared with, same threads):
  llamacpp       llama.cpp on the CPU: no layer offloaded (llama-bench -ngl 0, plus -dev none
                 where it has -dev; llama-cpp-python n_gpu_layers=0, op_offload off);
                 compared with --backends cpu and cpu-q8
  llamacpp-cuda  llama.cpp with every layer on the GPU (llama-bench -ngl 99,
                 llama-cpp-python n_gpu_layers=-1); compared with --backends cuda. Needs a
                 llama.cpp built with CUDA (-DGGML_CUDA=ON); with a CPU-only one it is
                 listed as not available, with the reason.
llama.cpp is found as: --llama-bench PATH; else llama-cpp-python in --peer-python PYTHON
(or in this interpreter); else a `llama-bench` on PATH. `pip install llama-cpp-python==0.3.36`
compiles llama.cpp (~12 min on 2 cores; add CMAKE_ARGS=-DGGML_CUDA=on for the GPU).

Examples:
  ukgpu bench -m smollm2-135m --peers llamacpp -p 128 -n 64 -o results.json
  ukgpu bench --synthetic qwen2.5-coder-1.5b --backends cpu,cuda --peers llamacpp,llamacpp-cuda \\
              --llama-bench ~/llama.cpp/build/bin/llama-bench -o gpu.json
  ukgpu dashboard results.json gpu.json -o report.html
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure tokens/s, TTFT, memory, kernels and boot time into a JSON file",
        description="Benchmark ukgpu backends (and llama.cpp) on real or synthetic models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", action="append", default=[], metavar="MODEL",
                        help="model name or GGUF path (repeatable)")
    parser.add_argument("--synthetic", action="append", default=[], choices=SHAPES, metavar="SHAPE",
                        help=f"random-weight model with a real model's layout: {', '.join(SHAPES)} (repeatable)")
    parser.add_argument("--backends", default="cpu", help="comma-separated: cpu, cpu-q8 (activations rounded to 8 bits "
                        "as llama.cpp rounds them), cuda (default cpu)")
    parser.add_argument("--peers", default="",
                        help="comma-separated peers to compare with: llamacpp (CPU), llamacpp-cuda (GPU)")
    parser.add_argument("--peer-python", metavar="PYTHON",
                        help="interpreter whose llama_cpp to use (default: this one if it has llama_cpp)")
    parser.add_argument("--llama-bench", metavar="PATH",
                        help="llama-bench binary to use for the peers (default: llama_cpp, else one on PATH)")
    parser.add_argument("-p", "--n-prompt", type=argtypes.positive, default=512,
                        help="prompt tokens (ppN), default 512")
    parser.add_argument("-n", "--n-gen", type=argtypes.positive, default=128,
                        help="generated tokens (tgN), default 128")
    parser.add_argument("-r", "--repeats", type=argtypes.positive, default=3,
                        help="timed repeats after one warm-up (default 3)")
    parser.add_argument("--warmup", type=argtypes.non_negative, default=1,
                        help="untimed runs before the repeats (default 1)")
    parser.add_argument("-t", "--threads", type=argtypes.int_in(1, 1024), default=len(os.sched_getaffinity(0)),
                        help="threads for ukgpu (numba) and the peer alike (default: usable cores)")
    parser.add_argument("--seed", type=argtypes.non_negative, default=0, help="prompt ids and synthetic weights seed")
    parser.add_argument("--no-kernels", action="store_true", help="skip per-kernel timings and ceilings")
    parser.add_argument("--image", type=Path, metavar="DIR", help="also time boot-to-READY of this image")
    parser.add_argument("-o", "--output", type=Path, help="write the results JSON here")
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from ukgpu.tools.bench.backend_run import RunConfig
    from ukgpu.tools.bench.runner import BenchRequest, run
    from ukgpu.tools.bench.summary import print_summary

    if not args.model and not args.synthetic and args.image is None:
        raise UkgpuError("nothing to benchmark: pass -m MODEL, --synthetic SHAPE or --image DIR")
    if min(args.n_prompt, args.n_gen, args.repeats, args.threads) < 1 or args.warmup < 0:
        raise UkgpuError("-p, -n, -r and -t must be at least 1 and --warmup at least 0")
    if args.peer_python and args.llama_bench:
        raise UkgpuError("--peer-python and --llama-bench name two different llama.cpp: pass one of them")
    req = BenchRequest(models=args.model, synthetic=args.synthetic, backends=_split(args.backends),
                       peers=_split(args.peers), peer_python=args.peer_python, llama_bench=args.llama_bench,
                       run=RunConfig(args.n_prompt, args.n_gen, args.repeats, args.warmup, args.seed),
                       kernels=not args.no_kernels, image=args.image, threads=args.threads)
    report = run(req, sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench"])
    print_summary(report)
    m = report.machine
    print(f"machine: {m.get('cpu')} ({m.get('cpu_id', '?')}; SIMD {' '.join(m.get('cpu_simd', [])) or '?'}), "
          f"{args.threads} threads", file=sys.stderr)
    if args.output:
        print(f"ukgpu bench: wrote {report.save(args.output)}", file=sys.stderr)
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
