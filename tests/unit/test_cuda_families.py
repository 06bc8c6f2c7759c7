"""Every family's random-weight model (`llama_core.gguf.family_specs`: llama3 factors, YaRN,
Mistral, Qwen 3, Gemma 3 with sliding-window local layers, Phi-3 with fused tensors and
long/short rope factors) on the CUDA backend under the fake driver, against the float64 CPU
backend, within `ukgpu verify`'s rules: the 64-token prompt's logits within NMSE 1e-5 (the
fake's math is float32/float64, the KV cache float16), the same argmax at every position, and
a 32-token greedy continuation decoded from the captured CUDA graph identical to the CPU's (a
divergence only where the CPU's top two logits are within verify's NEAR_TIE).  Every kernel the
forward launches is one `model_kernels` preloads."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.select import create_backend, model_kernels
from ukgpu.gpu.cuda.verify import NEAR_TIE
from ukgpu.gpu.cuda.verify_kernels import nmse
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.family_specs import FAMILY_SPECS
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.gguf.synthetic import load_spec, write_spec
from ukgpu.llama_core.model import Model

from fakes.cuda_driver import FakeDriver

N_PROMPT, N_GREEDY = 64, 32


@pytest.fixture(scope="module", params=sorted(FAMILY_SPECS))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / f"{request.param}.gguf"
    write_spec(load_spec(request.param), path, seed=0)
    return open_gguf(path)


def _pair(gguf, n_ctx):
    fake = FakeDriver()
    be = create_backend(gguf=gguf, driver=fake, arena_bytes=128 << 20, n_ctx=n_ctx)
    return Model(gguf, be), Model(gguf, CpuBackend(dtype=np.float64)), be, fake


def _prompt(gguf) -> np.ndarray:
    return np.random.default_rng(64).integers(1, gguf.config.vocab_size, N_PROMPT)


@pytest.mark.parametrize("n_ctx", [128, 64])  # phi3: long rope factors above 64, short at 64
def test_prompt_logits_and_greedy_continuation_follow_the_cpu(family, n_ctx):
    gpu, cpu, be, fake = _pair(family, n_ctx)
    ids = _prompt(family)[: n_ctx - N_GREEDY]
    kv, ckv = gpu.new_kv(n_ctx), cpu.new_kv(n_ctx)
    got, want = gpu.forward(ids, 0, kv), cpu.forward(ids, 0, ckv)
    assert got.shape == want.shape and nmse(got, want) < 1e-5
    assert (got.argmax(-1) == want.argmax(-1)).all()
    token, pos = int(want[-1].argmax()), len(ids)
    for step in range(N_GREEDY - 1):
        row = cpu.forward(np.array([token]), pos, ckv, all_logits=False)[0]
        nxt = be.decode_greedy(gpu, token, pos, kv)
        if nxt != int(row.argmax()):
            top2 = np.sort(row)[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, f"greedy diverged at step {step}"
            break
        token, pos = nxt, pos + 1
    assert be.graphs.captures == 1 and fake.graph_launches >= 1
    assert set(be.kernels.loaded) == set(model_kernels(family))  # nothing loaded past preload


def test_graph_decode_logits_match_eager_decode(family):
    """The recorded step (per-layer windows, scales, rope tables baked in) gives the logits an
    eager forward gives, position after position."""
    gpu, cpu, be, _ = _pair(family, 128)
    ids = _prompt(family)[:40]
    kv, ckv = gpu.new_kv(128), cpu.new_kv(128)
    gpu.forward(ids, 0, kv)
    cpu.forward(ids, 0, ckv)
    for pos in range(40, 46):
        token = int(ids[pos - 40])
        got = be.decode(gpu, token, pos, kv)
        want = cpu.forward(np.array([token]), pos, ckv, all_logits=False)
        assert nmse(got, want) < 1e-5, pos
    assert be.graphs.captures == 1
