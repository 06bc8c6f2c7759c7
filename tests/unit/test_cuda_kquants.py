"""Q5_K, Q3_K and Q2_K weights through the CUDA backend on the stand-in driver: a tiny model
whose matrices (and token embedding) are only these types uploads them in their device layout
at the GGUF's size, and its prefill and greedy decode follow the CPU model."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.select import create_backend, model_kernels
from ukgpu.gpu.cuda.verify_checks import nmse
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model

from fakes.cuda_driver import FakeDriver
from fakes.tiny_models import SHAPES, ModelShape, write_model

PROMPT = np.array([3, 17, 99, 250, 4, 511, 0, 42, 77, 300, 12], dtype=np.int64)
_TYPES = {"embd": "Q3_K", "q": "Q5_K", "k": "Q2_K", "v": "Q3_K", "o": "Q5_K", "gate": "Q2_K",
          "up": "Q5_K", "down": "Q3_K", "output": "Q2_K"}
KQ_SHAPES = {arch: ModelShape(f"tiny-{arch}-kq", arch, 2, 256, 4, 2, 512, 512, _TYPES, tied=tied)
             for arch, tied in (("llama", False), ("qwen2", True))}


@pytest.fixture(scope="module", params=sorted(KQ_SHAPES))
def tiny(request, tmp_path_factory):
    return open_gguf(write_model(tmp_path_factory.mktemp("kq") / f"{request.param}.gguf", KQ_SHAPES[request.param]))


def test_the_k_quant_shapes_are_the_tiny_shapes_with_other_types():
    base = SHAPES["tiny-llama"]
    assert (KQ_SHAPES["llama"].d_model, KQ_SHAPES["llama"].d_ff, KQ_SHAPES["llama"].vocab) == (
        base.d_model, base.d_ff, base.vocab)


def test_the_model_needs_the_k_quant_kernels_and_uploads_gguf_bytes(tiny):
    names = model_kernels(tiny)
    for q in ("q5_k", "q3_k", "q2_k"):
        assert {f"matvec_{q}_b1", f"gemm_{q}"} <= set(names), q
    assert "embedding_q3_k" in names
    be = create_backend(gguf=tiny, driver=FakeDriver(), arena_bytes=64 << 20, n_ctx=32)
    Model(tiny, be)
    matrices = [w for w in be._weights.values() if w.planes]
    assert {w.qtype for w in matrices} == {"Q5_K", "Q3_K", "Q2_K"}
    for w in matrices:  # every K-quant at exactly its GGUF bytes
        assert w.nbytes == tiny.tensors[w.name].data.nbytes, w.name


def test_prefill_and_greedy_decode_follow_the_cpu_model(tiny):
    fake = FakeDriver()
    be = create_backend(gguf=tiny, driver=fake, arena_bytes=64 << 20, n_ctx=64)
    model, cpu = Model(tiny, be), Model(tiny, CpuBackend(dtype=np.float64))
    kv, ckv = model.new_kv(64), cpu.new_kv(64)
    got = model.forward(PROMPT, 0, kv)  # GEMM (11 rows)
    want = cpu.forward(PROMPT, 0, ckv)
    assert nmse(got, want) < 1e-5 and (got.argmax(-1) == want.argmax(-1)).all()
    token = int(want[-1].argmax())
    for pos in range(len(PROMPT), len(PROMPT) + 4):  # mat-vecs, fused ones, through the decode graph
        logits = cpu.forward(np.array([token]), pos, ckv, all_logits=False)
        assert nmse(be.decode(model, token, pos, kv), logits) < 1e-5
        token = int(logits.argmax())
    assert fake.graph_launches == 3
