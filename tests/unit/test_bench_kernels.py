"""Kernel timings: every matmul is checked against the CPU reference before it is timed."""

import numpy as np
import pytest

from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.tools.bench import kernels


class SkewedBackend(CpuBackend):
    """A backend whose Q8_0 matmuls are 10% off: its kernels must be refused, not timed."""

    def matmul(self, x, weight, bias=None):
        out = super().matmul(x, weight, bias)
        return out * 1.1 if getattr(weight.qtype, "name", "") == "Q8_0" else out


@pytest.fixture(scope="module", params=[CpuBackend, SkewedBackend])
def measured(request, smollm2):
    return request.param, kernels.bench_kernels(smollm2, "smollm2-135m", request.param(), "cpu", 1, 4)


def test_each_kernel_is_validated_then_timed(measured):
    backend, entry = measured
    tested = {r.test.split(" ", 1)[1] for r in entry.results} | {t.split(" ", 1)[1] for t in entry.info.get("failed", {})}
    # layer 0's four distinct Q4_1 matrices and the tied Q8_0 output matrix, as mat-vec and slab
    assert tested == {"ffn_down Q4_1 576x1536", "ffn_gate Q4_1 1536x576", "attn_k Q4_1 192x576",
                      "attn_output Q4_1 576x576", "token_embd Q8_0 49152x576"}
    for r in entry.results:
        assert r.extra["rel_err"] <= kernels.REL_TOL
        assert r.median > 0 and r.extra["tflops"] > 0
        n = 1 if r.test.startswith("mv") else 4
        assert r.extra["flops"] == 2 * n * np.prod([int(v) for v in r.test.split()[-1].split("x")])
    if backend is SkewedBackend:
        assert set(entry.info["failed"]) == {"mv token_embd Q8_0 49152x576", "mm token_embd Q8_0 49152x576"}
        assert all("relative error" in why for why in entry.info["failed"].values())
        assert not any("Q8_0" in r.test for r in entry.results)
    else:
        assert "failed" not in entry.info and len(entry.results) == 10


def test_ceilings_are_positive_and_plausible():
    entry = kernels.cpu_ceilings(1)
    by = {r.test: r for r in entry.results}
    assert by["copy"].unit == "GB/s" and 0.1 < by["copy"].median < 1000
    assert by["gemm_f32"].unit == "TFLOP/s" and 1e-4 < by["gemm_f32"].median < 100
    gpu = kernels.cuda_ceilings(1)
    assert (gpu.available and len(gpu.results) == 2) or (not gpu.available and gpu.reason)
