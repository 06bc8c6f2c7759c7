"""`ukgpu generate`: complete one prompt, streaming tokens as they come.

The model options, sampling options and the closing statistics line are shared
with `ukgpu chat` (cmd_chat.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from ukgpu.llama_core.cpu.compile import ensure_compiled
from ukgpu.llama_core.engine import Engine, Stats
from ukgpu.llama_core.sampling import SamplingParams
from ukgpu.tools import argtypes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="complete a prompt with a model (streams tokens)")
    add_model_args(parser)
    parser.add_argument("-p", "--prompt", required=True, help="the prompt text ('-' reads stdin)")
    parser.add_argument("-n", "--n-predict", type=argtypes.positive, default=128, metavar="N",
                        help="tokens to generate at most (default 128)")
    add_sampling_args(parser)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable)")
    parser.set_defaults(func=_generate)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True,
                        help="a known model name (`ukgpu models list`) or a .gguf path")
    parser.add_argument("--backend", choices=("cpu", "auto", "cuda"), default="auto",
                        help="auto: CUDA when usable, else the CPU (default)")
    parser.add_argument("-c", "--ctx", type=argtypes.ctx, default=2048, help="context size in tokens")
    parser.add_argument("-t", "--threads", type=argtypes.int_in(1, 1024), default=None,
                        help="CPU threads for the matmul kernels (default: all cores)")
    add_cpu_activations_arg(parser)


def add_cpu_activations_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-activations", choices=("f32", "q8"), default=None,
                        help="CPU backend: f32 = exact products (the reference; default), q8 = activations "
                             "rounded to 8-bit blocks as llama.cpp's CPU path does, on integer dot "
                             "products (faster decode); sets UKGPU_CPU_ACTIVATIONS")


def apply_cpu_activations(args: argparse.Namespace) -> None:
    """The flag, for every CPU backend this process makes (the fallback from a lost GPU too)."""
    if args.cpu_activations:
        os.environ["UKGPU_CPU_ACTIVATIONS"] = args.cpu_activations


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temp", type=argtypes.float_in(0.0), default=0.8, help="temperature; 0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=argtypes.non_negative, default=40, help="0 turns it off (default 40)")
    g.add_argument("--top-p", type=argtypes.float_in(0.0, 1.0), default=0.95, help="1 turns it off (default 0.95)")
    g.add_argument("--min-p", type=argtypes.float_in(0.0, 1.0), default=0.05, help="0 turns it off (default 0.05)")
    g.add_argument("--repeat-penalty", type=argtypes.float_in(0.0, above=True), default=1.0,
                   help="1 turns it off (default)")
    g.add_argument("--repeat-last-n", type=argtypes.int_in(-1), default=64, help="penalty window (-1: all)")
    g.add_argument("--presence-penalty", type=argtypes.float_in(-2.0, 2.0), default=0.0)
    g.add_argument("--frequency-penalty", type=argtypes.float_in(-2.0, 2.0), default=0.0)
    g.add_argument("--seed", type=argtypes.int_in(0, 2**64 - 1), default=None, help="makes sampling reproducible")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed,
    )


def load_engine(args: argparse.Namespace) -> Engine:
    apply_cpu_activations(args)
    if args.threads is not None:
        import numba

        numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    if args.backend != "cuda":  # compile time must not land in the first prompt's speed
        ensure_compiled(sys.stderr)
    return Engine.load(args.model, backend=args.backend, n_ctx=args.ctx)


def run(engine: Engine, ids: list[int], params: SamplingParams, max_tokens: int,
        stop: list[str]) -> tuple[str, str | None, Stats]:
    """Generate, printing each piece of text as it comes: (text, finish reason, stats)."""
    seq = engine.start(ids, params, max_tokens, stop)
    pieces = []
    try:
        while seq.finish_reason is None:
            for event in engine.step(seq):
                sys.stdout.write(event.text)
                sys.stdout.flush()
                pieces.append(event.text)
    finally:
        engine.release(seq)
        sys.stdout.write("\n")  # also ends a partial answer before an error message
        sys.stdout.flush()
    return "".join(pieces), seq.finish_reason, seq.stats


def stats_line(stats: Stats, finish: str | None) -> str:
    return (f"prompt: {stats.prompt_tokens} tokens, {stats.prefill_seconds:.2f} s, "
            f"{stats.prefill_tps:.1f} t/s | decode: {stats.generated_tokens} tokens, "
            f"{stats.decode_seconds:.2f} s, {stats.decode_tps:.1f} t/s | finish: {finish}")


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = load_engine(args)
    ids = engine.tokenizer.encode(prompt, add_special=True)
    _, reason, stats = run(engine, ids, sampling_params(args), args.n_predict, args.stop)
    print(stats_line(stats, reason), file=sys.stderr)
    return 0
