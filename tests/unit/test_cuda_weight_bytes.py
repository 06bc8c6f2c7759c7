"""Device weight bytes on the real shapes: the repacked planes of every matrix of SmolLM2-135M and
Qwen2.5-Coder-1.5B Q4_K_M (random-weight GGUFs) take at most 5% more bytes than their GGUF
tensors.  A decode step streams every matrix once, so this ratio is the decode's weight traffic
over the file's (tests/perf/predict_cuda.py prices it).  Counted on the stand-in driver
(`emulate=False`: uploads are recorded, nothing is computed)."""

from __future__ import annotations

import pytest

from ukgpu.gpu.cuda.select import create_backend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.gguf.synthetic import build_synthetic
from ukgpu.llama_core.model import Model
from ukgpu.ptx_kernels.repack import LAYOUTS

from fakes.cuda_driver import FakeDevice, FakeDriver

MAX_RATIO = 1.05


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-1.5b"])
def test_device_planes_of_all_matrices_are_within_5_percent_of_the_gguf_bytes(name):
    gguf = open_gguf(build_synthetic(name))
    fake = FakeDriver(devices=[FakeDevice(name="H200 (stand-in)", total_bytes=141 << 30)], emulate=False)
    be = create_backend(gguf=gguf, driver=fake, n_ctx=64, n_slots=1)
    Model(gguf, be)
    matrices = [w for w in be._weights.values() if w.planes]
    assert len(matrices) >= 7 * gguf.config.n_layers  # q k v o gate up down per layer at least
    device = sum(w.nbytes for w in matrices)
    file = sum(gguf.tensors[w.name].data.nbytes for w in matrices)
    per_type: dict[str, list[int]] = {}
    for w in matrices:
        pair = per_type.setdefault(w.qtype, [0, 0])
        pair[0] += w.nbytes
        pair[1] += gguf.tensors[w.name].data.nbytes
    detail = ", ".join(f"{q} {d / f:.3f}x" for q, (d, f) in per_type.items())
    assert device <= MAX_RATIO * file, f"{name}: device {device} B vs GGUF {file} B ({detail})"
    assert set(per_type) <= {lay.name for lay in LAYOUTS.values()}
