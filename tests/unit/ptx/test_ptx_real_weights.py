"""Real GGUF weights (the two default models) through repack and the mat-vec / embedding kernels,
read with `llama_core.gguf_file.open_gguf` exactly as the CUDA backend reads them.

Random bytes already cover every bit pattern (test_ptx_repack.py); this checks the conventions
on real tensors: GGUF (in, out) dims -> numpy (N, K) rows of blocks, every quant type the
default models use (Q4_1, Q8_0, Q5_0, Q4_K, Q6_K, F32), and K sizes of real layers (576..4864).
The first rows of one tensor per type keep the interpreter fast.
"""

import numpy as np
import pytest
from conftest import run_spec
from gguf.quants import dequantize

from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.models.registry import resolve_model
from ukgpu.ptx_kernels.repack import LAYOUTS, dequantize_repacked, repack

ROWS = 12


def _one_tensor_per_type(model: str) -> dict:
    """qtype -> TensorView (shape in numpy order (N, K), data the raw bytes), as the backend sees them."""
    found = {}
    for t in open_gguf(resolve_model(model, pull=False)).tensors.values():
        if t.qtype in LAYOUTS and len(t.shape) == 2 and t.qtype.name not in found:
            found[t.qtype.name] = t
    return found


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b"])
def tensors(request):
    return _one_tensor_per_type(request.param)


def test_real_tensors_repack_exactly_and_multiply_correctly(tensors):
    assert {"Q8_0"} <= set(tensors)
    rng = np.random.default_rng(0)
    for qtype, t in tensors.items():
        n, k = t.shape
        raw = t.data[: t.data.nbytes // n * ROWS]  # the first ROWS rows, raw bytes
        want = dequantize(raw.reshape(ROWS, -1), t.qtype).astype(np.float32).reshape(ROWS, k)
        w = repack(raw, qtype, ROWS, k)
        np.testing.assert_array_equal(dequantize_repacked(w), want, err_msg=f"{t.name} {qtype}")
        x = rng.standard_normal((1, k)).astype(np.float32)
        planes = {f"w_{p}": a for p, a in w.planes().items()}
        y = np.full((1, ROWS), np.nan, np.float32)
        out = run_spec(f"matvec_{qtype.lower()}_b1", planes | {"x": x, "y": y}, {"N": ROWS, "K": k, "B": 1})
        ref = x.astype(np.float64) @ want.astype(np.float64).T
        bound = 1e-5 * (np.abs(x) @ np.abs(want).T)
        assert np.all(np.abs(out["y"] - ref) <= bound), f"{t.name} {qtype}"
        ids = np.array([ROWS - 1, 0], np.int32)
        o = np.full((2, k), np.nan, np.float32)
        emb = run_spec(f"embedding_{qtype.lower()}", planes | {"ids": ids, "out": o}, {"K": k, "T": 2})
        np.testing.assert_allclose(emb["out"], want[ids], rtol=1e-6, err_msg=f"{t.name} {qtype}")
