"""Write small byte-level BPE vocabularies for pre-tokenizers no shipped vocabulary file covers.

    python tools/dev/synthetic_vocab.py            # any Python with the `gguf` package

llama-cpp-python's sdist ships test vocabularies for most pre-tokenizers, but none for
Mistral's `tekken` (Mistral Nemo, Small 3, ...) or `gpt-4o` (Phi-4-mini, arch phi3).  This
writes `tests/data/vocab/synthetic-<pre>.gguf`, a vocabulary-only GGUF that llama.cpp loads
(the llama-bpe file's hyperparameters, `tokenizer.ggml.pre = <pre>`), whose merges make the
pre-tokenizer's word boundaries visible in the ids:

- the 256 byte tokens (GPT-2 byte alphabet) and every pair of the 128 characters that
  ASCII text and a few multi-byte scripts produce, merged in a fixed shuffled order;
- 1,500 three-character tokens merged from a pair and a character;
- whole words with no merge path (taken whole only where the pre-tokenizer ignores merges);
- control tokens <s>, </s>, [INST], [/INST], <|im_end|>.

tools/dev/golden_tokens.py then records llama.cpp's ids for them.  Deterministic (seeded).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter

VOCAB_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "vocab"
PRES = ("tekken", "gpt-4o")
HPARAMS_FROM = VOCAB_DIR / "ggml-vocab-llama-bpe.gguf"
CONTROL = ("<s>", "</s>", "[INST]", "[/INST]", "<|im_end|>")
WHOLE_WORDS = ("Hello", "ĠWorld", "ĠMistral", "camel", "ĠHTTPServer", "123", "Ġdon't", "ĊĊ")


def byte_alphabet() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def pair_bytes() -> list[int]:
    """Bytes of ASCII text and of é, ü, 日本, Ж, 🦙's UTF-8 (128 in all)."""
    multi = "éüÉ日本Ж🦙".encode()
    chosen = [0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *sorted(set(multi))]
    return chosen[:128]


def vocabulary(seed: int) -> tuple[list[str], list[int], list[str]]:
    rng = random.Random(seed)
    alphabet = byte_alphabet()
    chars = [alphabet[b] for b in pair_bytes()]
    pairs = [(a, b) for a in chars for b in chars]
    rng.shuffle(pairs)
    triples = [(a + b, c) for a, b, c in (rng.sample(chars, 3) for _ in range(1500))]
    merges, tokens = [], list(CONTROL) + alphabet
    seen = set(tokens)
    for left, right in pairs + triples:
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
            merges.append(f"{left} {right}")
    tokens += [w for w in WHOLE_WORDS if w not in seen]
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    return tokens, types, merges


def write(pre: str, out: Path) -> None:
    reader = GGUFReader(HPARAMS_FROM)
    writer = GGUFWriter(out, "llama")
    for field in reader.fields.values():
        name = field.name
        if name.startswith(("tokenizer.", "GGUF.")) or name in ("general.architecture", "general.name",
                                                                "llama.vocab_size"):
            continue
        value = field.contents()
        vtype = field.types[0]
        writer.add_key_value(name, value, vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    tokens, types, merges = vocabulary(seed=sum(map(ord, pre)))
    writer.add_string("general.name", f"synthetic-{pre}")
    writer.add_uint32("llama.vocab_size", len(tokens))
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 0)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    print(f"wrote {out} ({len(tokens)} tokens, {len(merges)} merges)")


def main() -> int:
    for pre in PRES:
        write(pre, VOCAB_DIR / f"synthetic-{pre}.gguf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
