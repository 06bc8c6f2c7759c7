"""A small GGUF with real weights: the first N blocks of a llama-family model, its tokenizer cut to
the first V tokens, for a machine the whole model cannot be copied to.

    python tools/dev/gguf_slice.py MODEL.gguf OUT.gguf [--blocks 2] [--vocab 16384]

What the slice holds, byte for byte from MODEL: every tensor of blocks 0..N-1, the tensors outside
the blocks (output norm, ...), and the first V rows of the token embedding (and of the output
matrix when the model has its own).  The metadata is MODEL's with `<arch>.block_count = N` and
`<arch>.vocab_size = V`; the tokenizer keeps tokens 0..V-1, their types and scores, and the merges
whose two parts and result are all kept (so BPE never yields an id >= V: a text just splits into
more, shorter tokens).  So a token sequence of ids < V gives, after block i < N, exactly the
residual stream the full model gives (tests/unit/test_gguf_slice.py checks block 0 on the CPU).

Why the vocabulary is cut too: a device machine takes 64 MiB of working tree in all, 40 of them
the repository; SmolLM2-135M's Q8_0 token embedding alone is 28.7 MiB (49152 x 576) and does not
compress (xz: 96%).  2 blocks and 16384 tokens make a ~15 MB file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

VOCAB_ROWS = ("token_embd.weight", "output.weight")  # tensors with one row per token
SKIP_KEYS = {"general.architecture", "general.alignment"}  # the writer adds both itself


class SliceError(Exception):
    """The model cannot be cut as asked (its message says why)."""


def _field_value(field: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    types = field.types
    sub = types[1] if types[0] == GGUFValueType.ARRAY else None
    return field.contents(), types[0], sub


def cut_tokenizer(values: dict[str, Any], vocab: int) -> dict[str, Any]:
    """tokenizer.ggml.* arrays cut to the first `vocab` tokens (merges: all three kept)."""
    tokens = values["tokenizer.ggml.tokens"]
    if vocab > len(tokens):
        raise SliceError(f"--vocab {vocab} is larger than the model's {len(tokens)} tokens")
    kept = set(tokens[:vocab])
    out = dict(values)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in out:
            out[key] = list(out[key][:vocab])
    if "tokenizer.ggml.merges" in out:
        out["tokenizer.ggml.merges"] = [
            m for m in out["tokenizer.ggml.merges"]
            if (parts := m.split(" ", 1)) and len(parts) == 2 and parts[0] in kept
            and parts[1] in kept and parts[0] + parts[1] in kept]
    for key, val in out.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and int(val) >= vocab:
            raise SliceError(f"{key} = {val} is not among the first {vocab} tokens")
    return out


def _keep_tensor(name: str, blocks: int) -> bool:
    if not name.startswith("blk."):
        return True
    return int(name.split(".")[1]) < blocks


def slice_gguf(src: Path, dst: Path, blocks: int, vocab: int | None = None) -> dict:
    """Write the slice of `src` to `dst`; what it holds (blocks, vocab, tensors, bytes)."""
    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    if not 1 <= blocks <= n_blocks:
        raise SliceError(f"--blocks {blocks}: the model has {n_blocks} blocks (1..{n_blocks})")
    fields = {k: _field_value(f) for k, f in reader.fields.items()
              if not k.startswith("GGUF.") and k not in SKIP_KEYS}
    n_vocab = len(fields["tokenizer.ggml.tokens"][0])
    vocab = n_vocab if vocab is None else vocab
    values = cut_tokenizer({k: v[0] for k, v in fields.items()}, vocab)
    values[f"{arch}.block_count"] = blocks
    if f"{arch}.vocab_size" in values:
        values[f"{arch}.vocab_size"] = vocab
    writer = GGUFWriter(dst, arch)
    for key, (_, vtype, sub) in fields.items():
        writer.add_key_value(key, values[key], vtype, sub_type=sub)
    writer.add_string("general.source.slice", f"blocks 0..{blocks - 1} of {n_blocks}, tokens "
                      f"0..{vocab - 1} of {n_vocab}, from {src.name}")
    kept = 0
    for t in reader.tensors:
        if not _keep_tensor(t.name, blocks):
            continue
        data = np.asarray(t.data)
        if t.name in VOCAB_ROWS:
            data = data[:vocab]  # rows are whole quant blocks: a byte slice
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=t.tensor_type)
        kept += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"blocks": blocks, "vocab": vocab, "tensors": kept, "bytes": dst.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the full GGUF (e.g. ~/.cache/ukgpu/models/smollm2-135m.gguf)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--blocks", type=int, default=2, help="keep blocks 0..N-1 (default 2)")
    ap.add_argument("--vocab", type=int, default=16384,
                    help="keep tokens 0..V-1 (default 16384; 0: all)")
    args = ap.parse_args(argv)
    try:
        info = slice_gguf(args.model, args.out, args.blocks, args.vocab or None)
    except (SliceError, OSError, KeyError) as exc:
        print(f"gguf_slice: {exc}", file=sys.stderr)
        return 2
    print(f"gguf_slice: {args.out}: {info['blocks']} blocks, {info['vocab']} tokens, "
          f"{info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
