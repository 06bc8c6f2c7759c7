"""Embeddings: a text's pooled final hidden state, L2-normalised (as OpenAI's are, unit length).

The hidden state is the one after the output norm (`Model.hidden_states`, what the output
matrix turns into logits).  Pooling over the input's tokens follows the GGUF key
`<arch>.pooling_type` with llama.cpp's numbering: 1 mean, 2 cls (the first token), 3 last;
absent or 0 (none: a generative model) means mean.  Other kinds (4, rank) are refused.
Each input runs alone through a scratch KV cache of its own length, eagerly, so it touches
no generation slot and works on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ukgpu.llama_core.errors import UkgpuError

POOLING = {0: "mean", 1: "mean", 2: "cls", 3: "last"}


class EmbeddingError(UkgpuError):
    """An input or a model the embedding cannot be computed for."""


def pooling(metadata: dict, arch: str) -> str:
    """"mean", "cls" or "last", from the model's `<arch>.pooling_type`."""
    kind = metadata.get(f"{arch}.pooling_type", 0)
    if kind not in POOLING:
        raise EmbeddingError(f"{arch}.pooling_type={kind!r} is not supported (0-3: none, mean, cls, "
                             "last): use a model that pools by mean, first or last token")
    return POOLING[kind]


def embed(model, ids: Sequence[int]) -> np.ndarray:  # model: llama_core.model.Model
    """float32[d], unit length: the pooled final hidden state of ids."""
    if not ids:
        raise EmbeddingError("the input has no tokens: send some text or token ids")
    hidden = model.hidden_states(np.asarray(ids), 0, model.new_kv(len(ids)))  # [n, d]
    how = pooling(model.gguf.metadata, model.gguf.arch)
    pooled = {"mean": lambda h: h.mean(axis=0), "cls": lambda h: h[0],
              "last": lambda h: h[-1]}[how](np.asarray(hidden, dtype=np.float64))
    norm = np.linalg.norm(pooled)
    return (pooled / norm if norm > 0 else pooled).astype(np.float32)
