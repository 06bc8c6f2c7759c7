"""Prefill numerics on a model with a "massive activation" channel (issue 15, defect 1).

`write_outlier_model` scales one channel of every ffn_norm weight by 1e5, so the rows entering
gate/up carry values past float16's 65504 (checked here on the CPU reference) and the FFN
intermediate entering `down` is larger still.  The stand-in's GEMM rounds operands as the PTX
does: with x cast straight to f16 those rows became inf and the logits NaN; with the GEMM's
per-row power-of-two scaling (ptx_kernels/gemm.py) the CUDA prefill (GEMM, > 8 rows) must equal
token-by-token CUDA decode (fp32 mat-vec) and the float64 CPU model: finite, same argmax, small
NMSE.  A prompt of <= 8 rows (mat-vec path) and one of > 8 rows (GEMM path) must agree on the
rows they share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ukgpu.gpu.cuda.select import create_backend
from ukgpu.gpu.cuda.verify_checks import nmse
from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model

from fakes.cuda_driver import FakeDriver
from fakes.tiny_models import SHAPES, write_outlier_model

PROMPT = np.array([3, 17, 99, 250, 4, 511, 0, 42, 77, 300, 12, 13, 5, 6, 200, 101], dtype=np.int64)
F16_MAX = 65504.0


class _MaxInput(CpuBackend):
    """The CPU reference, keeping the largest |x| that entered any matmul."""

    peak = 0.0

    def matmul(self, x: np.ndarray, weight: Any, bias: Any | None = None) -> np.ndarray:
        self.peak = max(self.peak, float(np.abs(x).max()))
        return super().matmul(x, weight, bias)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def outlier(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("outlier") / f"{request.param}.gguf"
    return open_gguf(write_outlier_model(path, SHAPES[request.param]))


def _cuda(gguf) -> Model:
    return Model(gguf, create_backend(gguf=gguf, driver=FakeDriver(), arena_bytes=64 << 20, n_ctx=64))


def test_outlier_model_passes_f16_range(outlier):
    be = _MaxInput(dtype=np.float64)
    cpu = Model(outlier, be)
    logits = cpu.forward(PROMPT, 0, cpu.new_kv(64))
    assert be.peak > 10 * F16_MAX  # the GEMM's x would overflow f16 by far without scaling
    assert np.isfinite(logits).all()


def test_outlier_prefill_equals_decode_and_cpu(outlier):
    gpu = _cuda(outlier)
    prefill = gpu.forward(PROMPT, 0, gpu.new_kv(64))  # 16 rows: the GEMM path
    kv = gpu.new_kv(64)
    decode = np.concatenate([gpu.forward(PROMPT[i:i + 1], i, kv) for i in range(len(PROMPT))])
    cpu = Model(outlier, CpuBackend(dtype=np.float64))
    want = cpu.forward(PROMPT, 0, cpu.new_kv(64))
    assert np.isfinite(prefill).all() and np.isfinite(decode).all()
    assert nmse(prefill, want) < 1e-4
    assert nmse(prefill, decode) < 1e-4
    assert (prefill.argmax(-1) == want.argmax(-1)).all()
    assert (prefill.argmax(-1) == decode.argmax(-1)).all()


def test_matvec_and_gemm_prompts_agree(outlier):
    gpu = _cuda(outlier)
    short = gpu.forward(PROMPT[:8], 0, gpu.new_kv(64))  # <= 8 rows: fp32 mat-vec
    long = gpu.forward(PROMPT, 0, gpu.new_kv(64))[:8]  # > 8 rows: f16 GEMM, same first 8 rows
    assert np.isfinite(short).all() and np.isfinite(long).all()
    assert nmse(long, short) < 1e-4
    assert (long.argmax(-1) == short.argmax(-1)).all()
