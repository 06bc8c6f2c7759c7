"""The largest |x| entering every matmul of a real model, per matrix role, on the CPU backend.

Why: the CUDA prefill GEMM rounds x to float16 (max 65504) before its tensor-core dot; a value
past that becomes inf.  This runs the float32 CPU reference (`llama_core`) over a few prompts
and prints, per role (q/k/v share the attention-norm output, so they are one role "qkv"), the
largest |x| over all layers and rows, the layer it came from, and the same for the attention
prefill's f16 operands (q * scale, and the K/V cache rows).

    .venv/bin/python tests/perf/activation_range.py smollm2-135m qwen2.5-coder-0.5b gemma3-270m
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.text.tokenizer import Tokenizer

PROMPTS = (
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 5, 8, 13, 21, 34,",
)
ROLES = {"wq": "qkv", "wk": "qkv", "wv": "qkv", "wo": "o", "w_gate": "gate_up", "w_up": "gate_up",
         "w_down": "down"}


class RangeBackend(CpuBackend):
    """The CPU backend recording max |x| per (role, layer) of every matmul input."""

    def __init__(self) -> None:
        super().__init__()
        self.roles: dict[int, tuple[str, int]] = {}
        self.peak: dict[str, tuple[float, int]] = {}

    def name_weights(self, model: Model) -> None:
        for i, lw in enumerate(model.weights.layers):
            for attr, role in ROLES.items():
                self.roles[id(getattr(lw, attr))] = (role, i)
        self.roles[id(model.weights.output)] = ("output", -1)

    def _note(self, role: str, layer: int, x: Any) -> None:
        m = float(np.max(np.abs(x)))
        if m > self.peak.get(role, (-1.0, 0))[0]:
            self.peak[role] = (m, layer)

    def matmul(self, x: np.ndarray, weight: Any, bias: Any | None = None) -> np.ndarray:
        role, layer = self.roles.get(id(weight), ("?", -1))
        self._note(role, layer, x)
        return super().matmul(x, weight, bias)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, kv: Any, layer: int,
                  start_pos: int, window: int = 0, scale: float | None = None) -> np.ndarray:
        hd = kv.k.shape[-1]
        self._note("attn q*scale", layer, q * (1.0 / np.sqrt(hd) if scale is None else scale))
        self._note("attn k", layer, k)
        self._note("attn v", layer, v)
        return super().attention(q, k, v, kv, layer, start_pos, window, scale)


def measure(name: str) -> dict[str, Any]:
    be = RangeBackend()
    model = Model.load(name, be)
    be.name_weights(model)
    tok = Tokenizer.from_gguf(model.gguf)
    rows = 0
    for text in PROMPTS:
        ids = np.asarray(tok.encode(text), dtype=np.int64)
        model.forward(ids, 0, model.new_kv(len(ids) + 1))
        rows += len(ids)
    return {"model": name, "prompts": len(PROMPTS), "rows": rows,
            "max_abs": {r: {"value": round(v, 2), "layer": i} for r, (v, i) in sorted(be.peak.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    for name in ap.parse_args().models:
        print(json.dumps(measure(name)))


if __name__ == "__main__":
    main()
