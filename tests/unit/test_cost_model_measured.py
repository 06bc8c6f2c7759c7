"""The cost model's laws measured on an H200 (`cost_model.MEASURED_H200`) against the profile they
came from: one eager decode step at position 100 (`tools/dev/profile_decode.py` under ncu,
docs/results/cuda-h200/run4-ncu-*.md), traced here on the stand-in over the same synthetic models.
The trace must be the profiled step (same kernel count), and the laws must price it within 15%;
the analytic model, for contrast, is far below what the card did."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.select import create_backend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.gguf.synthetic import build_synthetic
from ukgpu.llama_core.model import Model
from ukgpu.tools.bench import cost_model as cm

from fakes.cuda_driver import FakeDevice, FakeDriver

# model -> (kernels in the profiled step, their summed ncu time in seconds)
PROFILED = {"qwen2.5-coder-1.5b": (184, 2331.5e-6), "smollm2-135m": (182, 1072.0e-6)}


def _decode_trace(name: str) -> tuple[list, object]:
    """The launch trace of one decode step at position 100 (after a 100-token prompt)."""
    gguf = open_gguf(build_synthetic(name))
    fake = FakeDriver(devices=[FakeDevice(name="H200 (stand-in)", total_bytes=141 << 30)], emulate=False)
    be = create_backend(gguf=gguf, driver=fake, n_ctx=2048, n_slots=1)
    model = Model(gguf, be)
    kv = model.new_kv(2048)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, 100)
    model.forward(prompt, 0, kv, all_logits=False)
    fake.trace.clear()
    model.forward(np.array([int(prompt[-1])]), 100, kv, all_logits=False)
    return list(fake.trace), lambda ptr, n: fake.view(ptr, np.int32, n).tolist()


@pytest.mark.parametrize("name", list(PROFILED))
def test_the_measured_laws_price_the_profiled_step(name, monkeypatch):
    monkeypatch.setenv("UKGPU_SPLIT_K_COLUMNS", "0")  # the profiled step: no split-K down projection,
    monkeypatch.setenv("UKGPU_NORMED_OUTPUT", "0")  # the output matrix recomputing the norm
    trace, read = _decode_trace(name)
    kernels, seconds = PROFILED[name]
    assert len(trace) == kernels
    measured = cm.predict(trace, graph=False, read_i32=read, measured=cm.MEASURED_H200)
    assert {n.bound for n in measured.nodes} == {"measured"}  # every decode kernel has its law
    assert measured.device_s == pytest.approx(seconds, rel=0.15)
    analytic = cm.predict(trace, graph=True, read_i32=read)
    assert analytic.device_s < 0.5 * seconds  # what the card showed the analytic model to miss


# model -> (kernels of today's step: one rmsnorm more for the output row; split-K down layers,
# predicted step seconds with PREDICTED_H200, docs/benchmarks/cuda.md)
TODAY = {"qwen2.5-coder-1.5b": (185, 28, 2150.6e-6), "smollm2-135m": (183, 0, 1085.8e-6)}


@pytest.mark.parametrize("name", list(TODAY))
def test_the_predicted_laws_price_todays_step(name, monkeypatch):
    monkeypatch.setenv("UKGPU_SPLIT_K_COLUMNS", "2048")  # the candidate step: split-K turned on
    monkeypatch.delenv("UKGPU_NORMED_OUTPUT", raising=False)
    trace, read = _decode_trace(name)
    kernels, split_layers, seconds = TODAY[name]
    assert len(trace) == kernels
    assert sum(e["name"].startswith("matvec_split_add_") for e, _, _ in trace) == split_layers
    laws = cm.MEASURED_H200 | cm.PREDICTED_H200
    step = cm.predict(trace, graph=False, read_i32=read, measured=laws)
    assert {n.bound for n in step.nodes} == {"measured"}
    assert step.device_s == pytest.approx(seconds, rel=0.02)


# model -> predicted step seconds with the one-row mat-vecs of ptx_kernels/row_dot.py priced by
# cost_model.ROW_DOT_H200 (split-K off, as shipped; docs/benchmarks/cuda.md)
ROW_DOT = {"qwen2.5-coder-1.5b": 1470.0e-6, "smollm2-135m": 962.6e-6}


@pytest.mark.parametrize("name", list(ROW_DOT))
def test_the_row_dot_law_prices_the_shipped_step(name, monkeypatch):
    monkeypatch.delenv("UKGPU_SPLIT_K_COLUMNS", raising=False)
    monkeypatch.delenv("UKGPU_NORMED_OUTPUT", raising=False)
    trace, read = _decode_trace(name)
    laws = cm.ROW_DOT_H200 | cm.MEASURED_H200 | cm.PREDICTED_H200
    step = cm.predict(trace, graph=False, read_i32=read, measured=laws)
    assert {n.bound for n in step.nodes} == {"measured"}
    old = cm.predict(trace, graph=False, read_i32=read, measured=cm.MEASURED_H200 | cm.PREDICTED_H200)
    b1 = [i for i, (e, _, _) in enumerate(trace) if e["name"].startswith("matvec") and e["name"].endswith("_b1")]
    assert b1 and all(step.nodes[i].seconds < old.nodes[i].seconds for i in b1)  # every one-row mat-vec
    assert step.device_s == pytest.approx(ROW_DOT[name], rel=0.02)
