"""Per-token cost of a response_format grammar on the CPU backend.

    .venv/bin/python tests/perf/grammar_mask.py [--tokens 64] [models...]

For each model: greedy decoding of the same chat prompt with and without a json_schema
grammar (compact JSON, an array of bounded strings so it runs the whole budget), reporting
ms/token of the whole step and, with the grammar, of the mask alone (compute the allowed
set, apply it to the logits, advance the matcher) and the one-off schema compile.
"""

from __future__ import annotations

import argparse
import time

SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False,
          "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 40}}}}
PROMPT = [{"role": "user", "content": "List many fruits as JSON."}]


def run(engine, params, n_tokens: int) -> tuple[float, int]:
    """Seconds per decoded token (prefill excluded) and the tokens decoded."""
    seq = engine.start(engine.chat_ids(PROMPT), params, max_tokens=n_tokens)
    try:
        engine.step(seq)  # prefill + first token
        t0 = time.perf_counter()
        while seq.finish_reason is None:
            engine.step(seq)
        n = len(seq.generated) - 1
        return (time.perf_counter() - t0) / max(n, 1), n
    finally:
        engine.release(seq)


def main() -> None:
    from ukgpu.llama_core.engine import Engine
    from ukgpu.llama_core.grammar import GrammarMatcher, GrammarSpec
    from ukgpu.llama_core.sampling import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    mask_seconds = [0.0]
    for name in (GrammarMatcher.mask, GrammarMatcher.accept):  # time the grammar's own work
        def timed(self, *a, _f=name):
            t = time.perf_counter()
            try:
                return _f(self, *a)
            finally:
                mask_seconds[0] += time.perf_counter() - t
        setattr(GrammarMatcher, name.__name__, timed)
    print("| model | vocab | plain ms/token | with grammar ms/token | mask ms/token | compile ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for model in args.models:
        engine = Engine.load(model, backend="cpu", n_ctx=512)
        t = time.perf_counter()
        spec = GrammarSpec.json_schema(engine.tokenizer, SCHEMA)  # includes the tokenizer table, once
        compile_ms = (time.perf_counter() - t) * 1e3
        run(engine, SamplingParams(temperature=0), 4)  # warm-up
        plain, _ = run(engine, SamplingParams(temperature=0), args.tokens)
        mask_seconds[0] = 0.0
        grammar, n = run(engine, SamplingParams(temperature=0, grammar=spec), args.tokens)
        print(f"| {model} | {engine.tokenizer.vocab_size} | {plain * 1e3:.1f} | {grammar * 1e3:.1f} "
              f"| {mask_seconds[0] / max(n + 1, 1) * 1e3:.2f} | {compile_ms:.0f} |")


if __name__ == "__main__":
    main()
