"""Live comparison with llama.cpp on a fresh prompt (not the stored golden one).

Runs when llama-cpp-python is importable here, or when a Python that has it is
found ($UKGPU_LLAMA_CPP_PYTHON, else /root/ref/venv/bin/python): llama.cpp
dequantizes SmolLM2 to F32 itself and returns every position's logits, which
the CPU backend must match to 1e-3 of the logit range, argmax for argmax.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.text.tokenizer import Tokenizer

TOOLS = Path(__file__).parents[2] / "tools" / "dev"
TEXT = "Rain fell on the tin roof of the workshop while the old clockmaker sorted gears."

SCRIPT = r"""
import sys, tempfile
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
import golden_logits as g
model, out, ids = Path(sys.argv[2]), sys.argv[3], [int(t) for t in sys.argv[4].split(",")]
with tempfile.TemporaryDirectory() as tmp:
    f32 = Path(tmp) / "model.f32.gguf"
    g.dequantize_to_f32(model, f32, 2)
    llm = g.open_reference(f32, 2)
    llm.eval(ids)
    np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))
"""


def reference_python() -> str | None:
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    candidate = os.environ.get("UKGPU_LLAMA_CPP_PYTHON", "/root/ref/venv/bin/python")
    return candidate if Path(candidate).exists() else None


@pytest.mark.slow
def test_fresh_prompt_matches_llamacpp(smollm2, smollm2_path, tmp_path):
    python = reference_python()
    if python is None:
        pytest.skip("llama-cpp-python not importable and no reference Python found; "
                    "set UKGPU_LLAMA_CPP_PYTHON to a Python that has it")
    ids = Tokenizer.from_gguf(smollm2).encode(TEXT, add_special=False)
    out = tmp_path / "ref.npy"
    subprocess.run([python, "-c", SCRIPT, str(TOOLS), str(smollm2_path), str(out),
                    ",".join(map(str, ids))], check=True, timeout=600)
    ref = np.load(out)  # [n, vocab]
    model = Model(smollm2, CpuBackend())
    ours = model.forward(np.array(ids), 0, model.new_kv(len(ids)))
    rel = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel.max() <= 1e-3, rel
    assert np.array_equal(ours.argmax(axis=1), ref.argmax(axis=1))
