"""Write llama.cpp reference tokenizations for the tokenizer tests.

Runs under a Python that has `llama-cpp-python` (for instance
`/root/ref/venv/bin/python tools/dev/golden_tokens.py`); it uses nothing from
ukgpu, so the golden data is independent of the code it checks.

For every vocabulary in tests/data/vocab (ggml-vocab-*.gguf from the
llama-cpp-python sdist, synthetic-*.gguf from tools/dev/synthetic_vocab.py) and
for the pulled models in MODELS it writes `tests/data/vocab/<name>.tokens.json`:

    special_ids    bos / eos / eot as llama.cpp reports them (null if none)
    add_bos        whether llama.cpp adds BOS for add_special
    eog_ids        every id llama.cpp treats as end-of-generation
    pieces_sha256  {"special": .., "plain": ..}: sha256 over every token's
                   piece (4-byte little-endian length + bytes), rendered with
                   and without special tokens
    cases          [{text, add_special, parse_special, ids, detok, detok_special}]
                   the test strings (the vocabulary's .inp strings for the
                   ggml-vocab files, plus TRICKY_TEXTS for every vocabulary)
                   with llama.cpp's ids and its whole-sequence detokenization
                   (llama_detokenize, remove_special=False) without and with
                   special tokens rendered.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import struct
import sys
from pathlib import Path

VOCAB_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "vocab"
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
INP_SEPARATOR = "\n__ggml_vocab_test__\n"

TRICKY_TEXTS = (
    "Hello world",
    " Hello world",
    "  two leading spaces and trailing   ",
    "\n\n\nthree newlines",
    "\t\tindented\twith\ttabs",
    "windows\r\nline\r\nendings\r\n",
    "a     b      c",
    " ",
    "    ",
    "\u00a0nbsp\u2003em space\u3000ideographic space\u2028line sep",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "Ünïcödé façade naïve café résumé",
    "e\u0301 n\u0303 combining marks",
    "日本語のテキストです。",
    "中文和English混合text",
    "Здравствуй, мир! Как дела?",
    "مرحبا بالعالم",
    "हिन्दी भाषा",
    "한국어 텍스트",
    "ελληνικά γράμματα",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 math letters",
    "🦙🚀 emoji 👩‍👩‍👧‍👦 family 🏳️‍🌈 flag 😶‍🌫️",
    "\U0001F600\U0001F601\U0001F602",
    "def square(x):\n    return x ** 2  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '<div class="x">&nbsp;</div>',
    "SELECT * FROM users WHERE id = 42;",
    "x=[1,2,3];y={'k':None}",
    "1234567890",
    "3.14159 2.71828 1e-10 -0.5",
    "0x1F 0b1010 0o777",
    "$1,234.56 and 99%",
    "it's I'm they're we've you'll he'd DON'T WON'T",
    "Hello , world ! How are you ? Fine .",
    "' era ' quote '",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after",
    "<s>hello</s> world",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "text <|im_end|> more",
    "control\x00chars\x01\x1f\x7f bell\x07",
    "\ue000 private use \U000f0000",
    "unassigned \u0378 codepoint",
    "a" * 300,
    "supercalifragilisticexpialidocious" * 4,
    "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    # the chat markers of the model families (Gemma 3, Llama 3, Phi-3, Mistral, Qwen 3)
    "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|user|>\nHi there<|end|>\n<|assistant|>\n",
    "<s>[INST] Hi there [/INST] Hello</s>[INST] again [/INST]",
    "<|im_start|>assistant\n<think>\nreasoning\n</think>\n\nanswer<|im_end|>",
    "<unused0> <mask> [multimodal] <start_of_image> <eos>",
    "a\n\n\n\nb    c\t\t\td \n \n\n  \t",
    # case changes and slashes, where tekken and gpt-4o cut words
    "HelloWorld camelCaseWord HTTPServer ÉcoleÉTÉ getHTTPResponseCode",
    "don't DON'T it's I'LL x/y\n/ a\r\n/b path/to/file.txt",
)


def default_model_path(name: str) -> Path:
    cache = os.environ.get("UKGPU_CACHE")
    if not cache:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache = str(Path(base) / "ukgpu")
    return Path(cache) / "models" / f"{name}.gguf"


def read_inp(path: Path) -> list[str]:
    texts = path.read_text(encoding="utf-8").split(INP_SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()
    return texts


class Reference:
    """llama.cpp's tokenizer for one GGUF file (vocabulary only)."""

    def __init__(self, path: Path):
        import llama_cpp

        self.lib = llama_cpp
        self.llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self.n_tokens = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def detokenize(self, ids: list[int], unparse_special: bool) -> str:
        arr = (self.lib.llama_token * max(1, len(ids)))(*ids)
        size = 64 + 64 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, size, False, unparse_special)
        if n < 0:
            raise RuntimeError(f"detokenize buffer too small ({-n} > {size})")
        return buf.raw[:n].decode("utf-8", errors="replace")

    def piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 256, 0, special)
        if n < 0:  # -n bytes needed
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def pieces_sha256(self, special: bool) -> str:
        digest = hashlib.sha256()
        for token in range(self.n_tokens):
            data = self.piece(token, special)
            digest.update(struct.pack("<I", len(data)) + data)
        return digest.hexdigest()

    def special_id(self, fn) -> int | None:
        token = fn(self.vocab)
        return None if token < 0 else int(token)


def golden(path: Path, texts: list[tuple[str, bool, bool]]) -> dict:
    ref = Reference(path)
    lib = ref.lib
    cases = []
    for text, add_special, parse_special in texts:
        ids = ref.tokenize(text, add_special, parse_special)
        cases.append({
            "text": text, "add_special": add_special, "parse_special": parse_special, "ids": ids,
            "detok": ref.detokenize(ids, False), "detok_special": ref.detokenize(ids, True),
        })
    return {
        "file": path.name,
        "llama_cpp_python": lib.__version__,
        "n_tokens": ref.n_tokens,
        "special_ids": {
            "bos": ref.special_id(lib.llama_vocab_bos),
            "eos": ref.special_id(lib.llama_vocab_eos),
            "eot": ref.special_id(lib.llama_vocab_eot),
        },
        "add_bos": bool(lib.llama_vocab_get_add_bos(ref.vocab)),
        "eog_ids": [t for t in range(ref.n_tokens) if lib.llama_vocab_is_eog(ref.vocab, t)],
        "pieces_sha256": {"special": ref.pieces_sha256(True), "plain": ref.pieces_sha256(False)},
        "cases": cases,
    }


def tricky_cases() -> list[tuple[str, bool, bool]]:
    return [(t, add, parse) for t in TRICKY_TEXTS for add in (False, True) for parse in (False, True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="names to (re)write, e.g. qwen2 smollm2-135m")
    args = parser.parse_args()
    jobs: list[tuple[str, Path, list]] = []
    for gguf in sorted(VOCAB_DIR.glob("ggml-vocab-*.gguf")):
        name = gguf.name[len("ggml-vocab-"):-len(".gguf")]
        inp = [(t, False, False) for t in read_inp(gguf.with_name(gguf.name + ".inp"))]
        jobs.append((name, gguf, inp + tricky_cases()))
    for gguf in sorted(VOCAB_DIR.glob("synthetic-*.gguf")):
        jobs.append((gguf.name[:-len(".gguf")], gguf, tricky_cases()))
    for name in MODELS:
        jobs.append((name, default_model_path(name), tricky_cases()))
    for name, path, texts in jobs:
        if args.only and name not in args.only:
            continue
        if not path.is_file():
            print(f"skip {name}: {path} missing (run `ukgpu models pull {name}`)", file=sys.stderr)
            continue
        data = golden(path, texts)
        out = VOCAB_DIR / f"{name}.tokens.json"
        out.write_text(json.dumps(data, ensure_ascii=True, indent=0) + "\n")
        print(f"wrote {out} ({len(data['cases'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
