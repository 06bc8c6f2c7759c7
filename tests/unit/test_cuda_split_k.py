"""The two one-row decode paths of gpu/cuda/fused_ops.py on the stand-in driver: the split-K
residual mat-vec (`matvec_split_add`, the down projection of the 1.5B shape) and the output
matrix read from a normed row (rmsnorm once, then the plain mat-vec).  On the tiny models the
thresholds are lowered so both paths run; greedy tokens through the decode graph must be the
CPU's and the default path's."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda import fused_ops
from ukgpu.gpu.cuda.select import create_backend
from ukgpu.gpu.cuda.verify_checks import nmse
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model

from fakes.cuda_driver import FakeDriver
from fakes.tiny_models import SHAPES, write_model

PROMPT = np.array([3, 17, 99, 250, 4, 511, 0, 42, 77, 300, 12, 13], dtype=np.int64)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny(request, tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("splitk") / f"{request.param}.gguf", SHAPES[request.param])
    return SHAPES[request.param], open_gguf(path)


def _greedy(gguf, steps: int = 6) -> tuple[list[int], list[np.ndarray], FakeDriver]:
    fake = FakeDriver()
    be = create_backend(gguf=gguf, driver=fake, arena_bytes=64 << 20, n_ctx=64)
    model = Model(gguf, be)
    kv = model.new_kv(64)
    token = int(model.forward(PROMPT, 0, kv)[-1].argmax())
    tokens, logits = [], []
    for pos in range(len(PROMPT), len(PROMPT) + steps):
        fake.trace.clear()  # left holding the last step's nodes
        logits.append(be.decode(model, token, pos, kv))
        token = int(logits[-1].argmax())
        tokens.append(token)
    assert fake.graph_launches == steps - 1  # the first step eager, then replays
    return tokens, logits, fake


def test_split_k_and_normed_output_decode_as_before(tiny, monkeypatch):
    shape, tiny = tiny
    monkeypatch.setenv("UKGPU_SPLIT_K_COLUMNS", "0")
    monkeypatch.setenv("UKGPU_NORMED_OUTPUT", "0")
    before, before_logits, _ = _greedy(tiny)
    monkeypatch.setenv("UKGPU_SPLIT_K_COLUMNS", "256")  # the tiny down projection (K 512): 2 splits
    monkeypatch.setenv("UKGPU_NORMED_OUTPUT", "1")
    monkeypatch.setattr(fused_ops, "NORMED_INPUT_ROWS", 256)  # the tiny output matrix: 512 rows
    now, now_logits, fake = _greedy(tiny)
    names = [e["name"] for e, _, _ in fake.trace]
    split = [n for n in names if n.startswith("matvec_split_add_")]
    assert split == [f"matvec_split_add_{shape.types['down'].lower()}_b1"] * shape.n_layers, names
    out = shape.types["embd" if shape.tied else "output"].lower()
    at = len(names) - 1 - names[::-1].index("rmsnorm_f32")  # the output: rmsnorm, then the mat-vec
    assert names[at + 1] == f"matvec_{out}_b1" and not names[at + 2].startswith("matvec"), names
    assert now == before
    assert all(nmse(a, b) < 1e-10 for a, b in zip(now_logits, before_logits))
    cpu = Model(tiny, CpuBackend(dtype=np.float64))
    ckv = cpu.new_kv(64)
    token = int(cpu.forward(PROMPT, 0, ckv)[-1].argmax())
    for pos, got in zip(range(len(PROMPT), len(PROMPT) + len(now)), now_logits):
        want = cpu.forward(np.array([token]), pos, ckv, all_logits=False)
        assert nmse(got, want) < 1e-5
        token = int(want.argmax())


@pytest.mark.parametrize("n,k,cols,want", [
    (1536, 8960, None, 1),  # off by default until measured on an H200
    (1536, 8960, "2048", 4),  # Qwen2.5-1.5B down: 384 row blocks, 4 splits of 2,240 columns
    (1536, 1536, "2048", 1),  # its o projection: each split would be under 2,048 columns
    (576, 1536, "2048", 1),  # SmolLM2 down
    (8960, 1536, "2048", 1),  # gate/up sized: 2,240 row blocks fill the GPU
    (1536, 8960, "0", 1),  # switched off
    (1536, 1536, "512", 3),
    (576, 1536, "512", 3),
    (576, 576, "512", 1),
    (1536, 32768, "2048", 4),  # at most 4
])
def test_split_k_rule(n, k, cols, want, monkeypatch):
    if cols is None:
        monkeypatch.delenv("UKGPU_SPLIT_K_COLUMNS", raising=False)
    else:
        monkeypatch.setenv("UKGPU_SPLIT_K_COLUMNS", cols)
    assert fused_ops.split_k(n, k) == want


def test_normed_input_rule(monkeypatch):
    monkeypatch.delenv("UKGPU_NORMED_OUTPUT", raising=False)
    assert fused_ops.normed_input(151_936, 1) and fused_ops.normed_input(49_152, 1)
    assert not fused_ops.normed_input(151_936, 4)  # the batch graph keeps the fused b8 entry
    assert not fused_ops.normed_input(8960, 1)
    monkeypatch.setenv("UKGPU_NORMED_OUTPUT", "0")
    assert not fused_ops.normed_input(151_936, 1)
