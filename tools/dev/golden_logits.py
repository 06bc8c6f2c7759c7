"""Write llama.cpp reference logits for the forward-pass tests.

Runs under a Python that has `llama-cpp-python` (for instance
`/root/ref/venv/bin/python tools/dev/golden_logits.py`); it uses nothing from
ukgpu, so the golden data is independent of the code it checks.

Two references per model, each from a fixed 64-token prompt evaluated in one
batch with an F32 KV cache and every position's logits kept, then greedily
extended by 64 tokens one at a time:

  `<name>.npz`    llama.cpp on the model's weights dequantized to F32 by
                  llama.cpp itself (`llama_model_quantize` to ALL_F32): exact
                  float arithmetic on the quantized weights, the numbers a
                  correct forward pass must reproduce (to ~1e-5).
  `<name>.q.npz`  llama.cpp on the quantized file itself.  Its CPU matmuls round
                  every activation vector to 8-bit blocks first, which moves
                  the logits by a few % of their range; `decode_spread` records
                  how far llama.cpp's own one-token-at-a-time decode of the
                  prompt lands from its batched prefill (the last position), a
                  yardstick for comparing against this reference.

The small random-weight layouts of each model family (`syn-*`, written by ukgpu's one
synthetic writer, `llama_core/gguf/synthetic.py`, from (spec, seed): this tool asks the
project's interpreter, `--ukgpu-python`, to write the file) get the `<name>.npz` reference only;
the tests rebuild the file from the same spec and seed and check its sha256 before comparing.

Each file holds:

    prompt_ids   int32[64]           the prompt, tokenized by llama.cpp
    topk_ids     int32[64, 16]       per position: the 16 largest logits' ids (descending)
    topk_vals    float32[64, 16]     ... and their values
    full_pos     int32[k]            positions whose whole logit row is kept
    full_logits  float32[k, vocab]
    greedy_ids   int32[64]           the greedy continuation
    greedy_margin float32[64]        top-1 minus top-2 logit at each greedy step
    decode_spread float32            (.q.npz only) see above
    model_sha256, llama_cpp_version  the file checked, the reference's version
    seed                             (syn-* only) the synthetic file's seed
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. "
    "He counted the steps, one hundred and twelve of them, and wrote the number "
    "in a small notebook. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n"
    "Beyond the harbour the fishing boats returned with their nets full of silver "
    "herring, and the gulls followed them home."
)
N_PROMPT = 64
N_GREEDY = 64
TOP_K = 16
MODELS = {"smollm2-135m": (0, 21, 42, 63), "qwen2.5-coder-0.5b": (0, 63), "gemma3-270m": (0, 63)}
# Prompts that start with BOS, as llama.cpp tokenizes them in normal use (the vocabulary says so;
# SmolLM2's and Qwen's do not, and the synthetic files' goldens were made without it).
ADD_BOS = {"gemma3-270m"}
SYNTHETIC = ("syn-llama3", "syn-llama-yarn", "syn-mistral", "syn-qwen3", "syn-gemma3", "syn-phi3")
SYNTHETIC_FULL_POS = tuple(range(0, N_PROMPT, 8)) + (N_PROMPT - 1,)
SYNTHETIC_SEED = 0
WRITE_SYNTHETIC = ("import sys; from pathlib import Path; from ukgpu.llama_core.gguf import synthetic; "
                   "synthetic.write_spec(synthetic.load_spec(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))")
GGML_TYPE_F32 = 0
LLAMA_FTYPE_ALL_F32 = 0


def default_model_path(name: str) -> Path:
    cache = os.environ.get("UKGPU_CACHE")
    if not cache:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache = str(Path(base) / "ukgpu")
    return Path(cache) / "models" / f"{name}.gguf"


def disable_weight_repacking() -> None:
    """Keep llama.cpp off its repacked (AMX) weight buffers.

    On CPUs that report AMX but run it under a hypervisor that does not grant
    the tile state, llama.cpp's AMX matmul crashes; the plain path is also the
    one whose numerics the golden data should describe.
    """
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params
    if getattr(defaults, "_ukgpu_patched", False):
        return

    def plain_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    plain_params._ukgpu_patched = True
    llama_module.llama_cpp.llama_model_default_params = plain_params


def open_reference(path: Path, n_threads: int):
    from llama_cpp import Llama

    disable_weight_repacking()

    return Llama(
        model_path=str(path),
        n_ctx=N_PROMPT + N_GREEDY + 8,
        n_batch=N_PROMPT + N_GREEDY,
        n_ubatch=N_PROMPT + N_GREEDY,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )


def prompt_ids(llm, add_bos: bool = False) -> list[int]:
    ids = llm.tokenize(PROMPT_TEXT.encode(), add_bos=add_bos, special=False)
    if len(ids) < N_PROMPT:
        raise SystemExit(f"prompt text gives only {len(ids)} tokens; lengthen PROMPT_TEXT")
    return [int(t) for t in ids[:N_PROMPT]]


def top2_margin(row: np.ndarray) -> float:
    two = np.partition(row, -2)[-2:]
    return float(two.max() - two.min())


def golden_for(path: Path, full_pos: tuple[int, ...], n_threads: int,
               add_bos: bool = False) -> dict[str, np.ndarray]:
    llm = open_reference(path, n_threads)
    ids = prompt_ids(llm, add_bos)
    llm.eval(ids)
    logits = np.array(llm.scores[:N_PROMPT], dtype=np.float32)  # [64, vocab]
    order = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    greedy, margins = [], []
    row = logits[-1]
    for _ in range(N_GREEDY):
        tok = int(np.argmax(row))
        greedy.append(tok)
        margins.append(top2_margin(row))
        llm.eval([tok])
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return {
        "prompt_ids": np.array(ids, dtype=np.int32),
        "topk_ids": order.astype(np.int32),
        "topk_vals": np.take_along_axis(logits, order, axis=1),
        "full_pos": np.array(full_pos, dtype=np.int32),
        "full_logits": logits[list(full_pos)],
        "greedy_ids": np.array(greedy, dtype=np.int32),
        "greedy_margin": np.array(margins, dtype=np.float32),
    }


def decode_spread(llm, ids: list[int], batched_last: np.ndarray) -> float:
    """max|diff|/max|ref| of the last prompt position: one token at a time vs batched."""
    llm.reset()
    for tok in ids:
        llm.eval([tok])
    stepwise = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    return float(np.abs(stepwise - batched_last).max() / np.abs(batched_last).max())


def dequantize_to_f32(src: Path, dst: Path, n_threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.quantize_output_tensor = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not dequantize {src} to F32")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(out: Path, data: dict[str, np.ndarray]) -> None:
    np.savez_compressed(out, **data)
    print(f"{out}: {out.stat().st_size} bytes, greedy min margin "
          f"{data['greedy_margin'].min():.4f}", file=sys.stderr)


def write_synthetic(name: str, dst: Path, python: str) -> None:
    """The family layout `name` written by ukgpu's synthetic writer (in the project's Python)."""
    subprocess.run([python, "-c", WRITE_SYNTHETIC, name, str(dst), str(SYNTHETIC_SEED)], check=True,
                   env=dict(os.environ, PYTHONPATH=""))


def synthetic_golden(name: str, args: argparse.Namespace, version: str) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / f"{name}.gguf"
        write_synthetic(name, path, args.ukgpu_python)
        common = {"model_sha256": np.array(sha256(path)), "llama_cpp_version": np.array(version),
                  "seed": np.int32(SYNTHETIC_SEED)}
        f32_path = Path(tmp) / f"{name}.f32.gguf"
        dequantize_to_f32(path, f32_path, args.threads)
        write(args.out / f"{name}.npz", {**golden_for(f32_path, SYNTHETIC_FULL_POS, args.threads), **common})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[2] / "tests/data/golden")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", type=Path, default=None, help="room for the F32 model (~4x)")
    parser.add_argument("--ukgpu-python", default=str(Path(__file__).parents[2] / ".venv/bin/python"),
                        help="a Python with ukgpu installed, to write the syn-* files")
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"of {[*MODELS, *SYNTHETIC]}")
    args = parser.parse_args(argv)
    import llama_cpp

    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        if name in SYNTHETIC:
            synthetic_golden(name, args, llama_cpp.__version__)
            continue
        path = default_model_path(name)
        if not path.exists():
            raise SystemExit(f"{path} missing: run `ukgpu models pull {name}` first")
        common = {"model_sha256": np.array(sha256(path)),
                  "llama_cpp_version": np.array(llama_cpp.__version__)}
        quant = golden_for(path, MODELS[name], args.threads, name in ADD_BOS)
        llm = open_reference(path, args.threads)
        quant["decode_spread"] = np.float32(decode_spread(
            llm, list(map(int, quant["prompt_ids"])), quant["full_logits"][-1]))
        del llm
        write(args.out / f"{name}.q.npz", {**quant, **common})
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            f32_path = Path(tmp) / f"{name}.f32.gguf"
            dequantize_to_f32(path, f32_path, args.threads)
            write(args.out / f"{name}.npz", {**golden_for(f32_path, MODELS[name], args.threads, name in ADD_BOS),
                                             **common})
    return 0


if __name__ == "__main__":
    sys.exit(main())
