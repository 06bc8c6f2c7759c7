"""The CUDA backend on a real GPU: every kernel through the backend's launcher, the real models
and every family's synthetic layout (llama3, yarn, mistral, qwen3, gemma3 with its sliding
window, phi3) against the CPU reference, graph-captured decode, and `ukgpu verify` end to end.

Skips with the reason when there is no usable GPU (no driver, no device, pre-sm_80, missing
kernels).  Real models must be in the model cache (the GPU machine has no network); the tiny
synthetic models are written on the spot.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ukgpu.gpu.cuda.select import probe
from ukgpu.gpu.cuda.verify_checks import nmse
from ukgpu.gpu.cuda.verify_kernels import kernel_checks

pytestmark = pytest.mark.gpu

PROMPT_IDS = np.array([1, 504, 3458, 314, 260, 1345, 30, 12, 45, 99, 100, 2000, 31, 7], np.int64)


@pytest.fixture(scope="module")
def gpu_reason():
    ok, reason = probe()
    if not ok:
        pytest.skip(f"no usable CUDA GPU: {reason}")
    return reason


@pytest.fixture
def backends():
    """create(gguf) -> a CudaBackend whose device memory is freed after the test."""
    from ukgpu.gpu.cuda.select import create_backend

    made = []

    def create(gguf=None, **kw):
        made.append(create_backend(gguf=gguf, **kw))
        return made[-1]

    yield create
    for be in made:
        be.close()


def test_every_kernel_meets_its_bound(gpu_reason, backends):
    be = backends(arena_bytes=256 << 20)
    checks = kernel_checks(be.kernels, be.arena, seed=1)
    bad = [(c.name, c.value, c.bound, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    assert len(checks) > 40


def _model(name: str, folder: Path | None = None):
    """A cached model (the GPU machine has no network: models are pulled beforehand), or the tiny
    and per-family synthetic ones, written on the spot."""
    from ukgpu.llama_core.gguf.family_specs import FAMILY_SPECS
    from ukgpu.llama_core.gguf.file import open_gguf
    from ukgpu.llama_core.gguf.synthetic import load_spec, write_spec
    from ukgpu.llama_core.models import registry

    from fakes.tiny_models import SHAPES, write_model

    if name in SHAPES:
        return open_gguf(write_model(folder / f"{name}.gguf", SHAPES[name]))
    if name in FAMILY_SPECS:
        write_spec(load_spec(name), folder / f"{name}.gguf", seed=0)
        return open_gguf(folder / f"{name}.gguf")
    if not registry.is_cached(name):
        pytest.skip(f"{name} is not in the model cache: `ukgpu models pull {name}` first")
    return open_gguf(registry.model_path(name))


FAMILIES = ["syn-llama3", "syn-llama-yarn", "syn-mistral", "syn-qwen3", "syn-gemma3", "syn-phi3"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", *FAMILIES, "smollm2-135m",
                                  "qwen2.5-coder-0.5b", "gemma3-270m"])
def test_model_prefill_and_graph_decode_follow_the_cpu(gpu_reason, name, backends, tmp_path):
    from ukgpu.llama_core.cpu.backend import CpuBackend
    from ukgpu.llama_core.model import Model

    gguf = _model(name, tmp_path)
    be = backends(gguf, n_ctx=512)
    gpu, cpu = Model(gguf, be), Model(gguf, CpuBackend())
    kv, ckv = gpu.new_kv(128), cpu.new_kv(128)
    ids = PROMPT_IDS % gguf.config.vocab_size
    got, want = gpu.forward(ids, 0, kv), cpu.forward(ids, 0, ckv)
    assert nmse(got, want) < 1e-3
    token, pos, agree = int(want[-1].argmax()), len(ids), 0
    for _ in range(16):
        row = cpu.forward(np.array([token]), pos, ckv, all_logits=False)[0]
        nxt = be.decode_greedy(gpu, token, pos, kv)
        if nxt != int(row.argmax()):
            margin = row.max() - row[nxt]
            assert margin < 0.1, f"greedy diverged at {agree} with CPU margin {margin}"
            break
        agree, token, pos = agree + 1, nxt, pos + 1
    assert be.graphs.captures == 1  # divergence above: only at a near tie


def _logits_run(gguf, backends, n_prompt: int, steps: int) -> tuple[np.ndarray, list, object]:
    """Prefill logits of n_prompt tokens, then `steps` decode steps' logits (graph replays)."""
    from ukgpu.llama_core.model import Model

    be = backends(gguf, n_ctx=512)
    model = Model(gguf, be)
    kv = model.new_kv(512)
    ids = np.arange(1, n_prompt + 1) * 7919 % gguf.config.vocab_size
    prefill = model.forward(ids, 0, kv)
    token, rows = int(prefill[-1].argmax()), []
    for pos in range(n_prompt, n_prompt + steps):
        rows.append(be.decode(model, token, pos, kv))
        token = int(rows[-1][0].argmax())
    return prefill, rows, be


@pytest.mark.parametrize("name", ["tiny-qwen2", "syn-qwen3", "syn-gemma3"])
def test_programmatic_dependent_launch_changes_no_bit(gpu_reason, name, backends, tmp_path, monkeypatch):
    """Every kernel waits for the one before it ahead of any global access (ptx_kernels/pdl.py),
    so PDL launches (sm_90+) must give bit-for-bit the logits of plain ones: a kernel that read
    an activation too early would show here as a difference, in the eager prefill or in the
    graph replays (a 150-token prompt: the decode reads three 64-key splits)."""
    gguf = _model(name, tmp_path)
    with_pdl, rows, be = _logits_run(gguf, backends, 150, 24)
    if be.ctx.info.cc < (9, 0):
        pytest.skip(f"sm_{be.ctx.info.cc[0]}{be.ctx.info.cc[1]} has no programmatic dependent launch")
    assert be.kernels.pdl, be.kernels.pdl_off
    monkeypatch.setenv("UKGPU_PDL", "0")
    plain, plain_rows, be_plain = _logits_run(gguf, backends, 150, 24)
    assert not be_plain.kernels.pdl and be.graphs.captures == be_plain.graphs.captures == 1
    np.testing.assert_array_equal(with_pdl, plain)
    for step, (a, b) in enumerate(zip(rows, plain_rows)):
        np.testing.assert_array_equal(a, b, err_msg=f"decode step {step}")


@pytest.mark.hardware
def test_graph_decode_is_much_faster_than_eager(gpu_reason, backends):
    from ukgpu.llama_core.model import Model

    gguf = _model("smollm2-135m")
    be = backends(gguf, n_ctx=512)
    model = Model(gguf, be)
    kv = model.new_kv(256)
    model.forward(PROMPT_IDS, 0, kv)
    pos = len(PROMPT_IDS)
    be.decode_greedy(model, 5, pos, kv)  # warm-up + capture
    t0 = time.perf_counter()
    for i in range(1, 33):
        be.decode_greedy(model, 5, pos + i, kv)
    graph_s = (time.perf_counter() - t0) / 32
    t0 = time.perf_counter()
    for i in range(33, 41):
        model.forward(np.array([5]), pos + i, kv, all_logits=False)
    eager_s = (time.perf_counter() - t0) / 8
    print(f"SmolLM2 decode: graph {1 / graph_s:.0f} tok/s, eager {1 / eager_s:.0f} tok/s")
    assert graph_s < eager_s / 2


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_verify_cli_passes_on_this_gpu(gpu_reason, name, tmp_path):
    import json

    from ukgpu.llama_core.models import registry
    from ukgpu.tools.cli import main

    _model(name)  # skips when it is not cached
    out = tmp_path / "verify.json"
    code = main(["verify", "-m", str(registry.model_path(name)), "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, [c for c in report["checks"] if not c["ok"]]
    assert report["status"] == "pass"
