"""Random-weight GGUF models with the exact layout of real ones, for benchmarks and tests.

A shape spec (`data/shapes/<name>.json`, written by
`python -m ukgpu.tools.bench.extract_shapes` from the real model's header) lists
every tensor (name, ggml type, shape in numpy order) and the metadata with its
GGUF types.  `build_synthetic(name, seed)` writes a file with that layout:
random normal weights (std 0.02; norms near 1) quantized to each tensor's real
type with `quants.quantize`, so block scales are sane; the same metadata; and
a tokenizer copied from a cached real model with the same vocabulary (checked
by fingerprint), or else a minimal byte-level BPE vocabulary of the same size.
Files are cached by (shape, seed) under `<cache>/synthetic/`.  llama.cpp and
ukgpu both load them.

`write_spec(spec, path, seed)` is the one GGUF writer of random models: the test suite's tiny
models (under tests/) are specs too.  A spec is a dict:

    name       the shape's name (a real shape's may have a tokenizer donor, see DONORS)
    source     what the layout is of (written into general.source.synthetic)
    metadata   {key: {"type": GGUFValueType name, "sub_type": name or None, "value": ...}}
               without the tokenizer arrays
    tensors    [{"name", "type": GGML type name, "shape": [rows, cols] or [n]}], in file order
    vocab      {array key: {"type", "length", "sha256"}}: the donor's tokenizer arrays to copy
               (optional: without a donor the minimal vocabulary is written)

A tensor may carry "values" (a list of floats, F32 only): written as given instead of random
(rope frequency factors).  Besides the real shapes, `load_spec` knows the small per-family
layouts of `family_specs` (syn-llama3, syn-qwen3, syn-gemma3, syn-phi3, ...).  The same
(spec, seed) always gives the same bytes: the golden logits of tests/data/golden name the
file by its sha256, and the tests rebuild it and check that digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.gguf import quants
from ukgpu.llama_core.gguf.family_specs import FAMILY_SPECS
from ukgpu.llama_core.models import registry

SHAPES_DIR = Path(__file__).resolve().parents[1] / "data" / "shapes"
SHAPES = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
DONORS = {"smollm2-135m": "smollm2-135m", "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b",
          "qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}  # real model whose vocabulary is the same
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                    "tokenizer.ggml.scores")
WEIGHT_STD = 0.02
CHUNK_ELEMENTS = 1 << 22  # rows quantized per step stay under ~16 MiB of float32


class SyntheticError(UkgpuError):
    """A synthetic-model shape is unknown or its spec is unusable."""


def fingerprint(values: list) -> str:
    """sha256 of a metadata array's values (same digest for the same list, whatever read it)."""
    return hashlib.sha256(json.dumps(list(values), ensure_ascii=False).encode()).hexdigest()


def load_spec(name: str) -> dict[str, Any]:
    """The spec of a real shape (data/shapes) or of a family layout (`family_specs`)."""
    if name in FAMILY_SPECS:
        return FAMILY_SPECS[name]()
    path = SHAPES_DIR / f"{name}.json"
    if name not in SHAPES or not path.is_file():
        raise SyntheticError(f"unknown synthetic shape {name!r}; use one of: "
                             f"{', '.join((*SHAPES, *FAMILY_SPECS))}")
    return json.loads(path.read_text())


def synthetic_path(name: str, seed: int) -> Path:
    return registry.cache_dir() / "synthetic" / f"{name}-seed{seed}.gguf"


def build_synthetic(name: str, seed: int = 0, force: bool = False, progress: bool = False) -> Path:
    """The cached random-weight model of shape `name` (built on first use)."""
    spec = load_spec(name)
    path = synthetic_path(name, seed)
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        write_spec(spec, tmp, seed, progress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_spec(spec: dict[str, Any], path: Path, seed: int, progress: bool = False) -> None:
    """Write a random-weight GGUF of `spec` (a loaded shape spec, or one cut down from it) to path."""
    md = spec["metadata"]
    writer = GGUFWriter(path, md["general.architecture"]["value"])
    for key, item in md.items():
        if key in ("general.architecture", "general.alignment"):
            continue  # the writer adds both itself
        sub = GGUFValueType[item["sub_type"]] if item["sub_type"] else None
        writer.add_key_value(key, item["value"], GGUFValueType[item["type"]], sub_type=sub)
    vocab, _ = vocabulary(spec)
    for key, (values, vtype) in vocab.items():
        writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=vtype)
    writer.add_string("general.source.synthetic", f"random weights, seed {seed}, layout of {spec['source']}")
    for t in spec["tensors"]:
        qtype = GGMLQuantizationType[t["type"]]
        shape = tuple(t["shape"])
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor_info(t["name"], shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            byte_shape = (*shape[:-1], quants.row_bytes(qtype, shape[-1]))
            writer.add_tensor_info(t["name"], byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    tensors = spec["tensors"]
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc=f"synthetic {spec['name']}", unit="tensor")
    rng = np.random.default_rng(seed)
    for t in tensors:
        writer.write_tensor_data(_random_tensor(rng, t))
    writer.close()


def _random_tensor(rng: np.random.Generator, t: dict[str, Any]) -> np.ndarray:
    qtype = GGMLQuantizationType[t["type"]]
    shape = tuple(t["shape"])
    if "values" in t:
        if qtype != GGMLQuantizationType.F32 or len(t["values"]) != int(np.prod(shape)):
            raise SyntheticError(f"tensor {t['name']}: given values must be F32 and fill {shape}")
        return np.asarray(t["values"], dtype=np.float32).reshape(shape)
    if len(shape) == 1:  # norms (near 1) and biases (small)
        center = 1.0 if t["name"].endswith("norm.weight") else 0.0
        values = (center + WEIGHT_STD * rng.standard_normal(shape[0], dtype=np.float32)).astype(np.float32)
        return values if qtype == GGMLQuantizationType.F32 else quants.quantize(values, qtype)
    return np.concatenate(list(_random_rows(rng, shape, qtype)), axis=0)


def _random_rows(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> Iterator[np.ndarray]:
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        values = WEIGHT_STD * rng.standard_normal((min(step, rows - r0), cols), dtype=np.float32)  # [r, cols]
        yield values if qtype == GGMLQuantizationType.F32 else quants.quantize(values, qtype)


def vocabulary(spec: dict[str, Any]) -> tuple[dict[str, tuple[list, GGUFValueType]], str]:
    """The tokenizer arrays to write and where they came from ("donor NAME" or "minimal")."""
    donor = DONORS.get(spec["name"])
    if donor is not None and registry.is_cached(donor):
        from ukgpu.llama_core.gguf.file import open_gguf

        md = open_gguf(registry.model_path(donor)).metadata
        want = spec["vocab"]
        if all(key in md and fingerprint(md[key]) == w["sha256"] for key, w in want.items()):
            return {key: (md[key], GGUFValueType[w["type"]]) for key, w in want.items()}, f"donor {donor}"
    n_vocab = next(t["shape"][0] for t in spec["tensors"] if t["name"] == "token_embd.weight")
    return minimal_vocab(n_vocab), "minimal"


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255."""
    direct = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in direct else chr(next(extra)) for b in range(256)]


def minimal_vocab(n_vocab: int) -> dict[str, tuple[list, GGUFValueType]]:
    """A valid byte-level BPE vocabulary of n_vocab tokens: the 256 bytes, merges of
    lowercase-letter pairs, then control tokens to fill the embedding rows."""
    chars = _byte_chars()
    letters = [chars[b] for b in range(ord("a"), ord("z") + 1)]
    pairs = [(a, b) for a in letters for b in letters][: max(0, min(676, n_vocab - 256 - 16))]
    tokens = chars + [a + b for a, b in pairs]
    types = [1] * len(tokens)
    tokens += [f"<|synthetic_{i}|>" for i in range(n_vocab - len(tokens))]
    types += [3] * (n_vocab - len(types))
    merges = [f"{a} {b}" for a, b in pairs]
    return {"tokenizer.ggml.tokens": (tokens[:n_vocab], GGUFValueType.STRING),
            "tokenizer.ggml.token_type": (types[:n_vocab], GGUFValueType.INT32),
            "tokenizer.ggml.merges": (merges, GGUFValueType.STRING)}
