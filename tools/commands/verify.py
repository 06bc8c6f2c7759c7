"""`ukgpu verify`: check the CUDA backend against the CPU reference (kernels, layers, end to end).

Exit status: 0 every check passes, 1 any mismatch (a faulted kernel, and the checks a lost GPU
context left not run, included), 2 no usable GPU (the kernel manifests and artifact hashes are
checked instead, and the output says so).  Outside verify, `UKGPU_CUDA_SYNC=1` makes the CUDA
backend wait after every eager launch so that a fault names its kernel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ukgpu.gpu.cuda.verify import VerifyOptions, run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify", help="check GPU kernels, layers and generation against the CPU reference",
        description="Run the CUDA backend next to the float64 CPU reference and compare: every "
                    "kernel on random inputs (NMSE bounds per op), the activations of every "
                    "block of a model, and its logits and greedy continuation. Without a level "
                    "flag all three run. Every launch waits for its kernel, so a kernel that "
                    "faults is named; after a fault that loses the GPU context the remaining "
                    "checks are reported as not run. Exit 0 pass, 1 mismatch, 2 no GPU.")
    p.add_argument("-m", "--model", default="smollm2-135m",
                   help="model name or GGUF path for --layers/--e2e (default: smollm2-135m)")
    p.add_argument("--kernels", action="store_true", help="kernel-level checks")
    p.add_argument("--layers", action="store_true", help="per-block activations vs the CPU model")
    p.add_argument("--e2e", action="store_true", help="logits and greedy continuation vs the CPU")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens compared in --e2e")
    p.set_defaults(func=_verify)


def options(args: argparse.Namespace) -> VerifyOptions:
    every = not (args.kernels or args.layers or args.e2e)
    return VerifyOptions(model=args.model, kernels=every or args.kernels,
                         layers=every or args.layers, e2e=every or args.e2e, json_out=args.json,
                         device=args.device, n_generate=args.tokens)


def _verify(args: argparse.Namespace) -> int:
    return run(options(args))
