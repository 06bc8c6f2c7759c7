"""Per-kernel timing of a backend's matmul on a model's real weights, against ceilings.

For every distinct (type, shape) among layer 0's matrices and the output matrix:
  mv  1 x in  @ W.T  (decode: bandwidth-bound)   -> achieved GB/s of weight bytes
  mm  n x in  @ W.T  (prefill slab: compute-bound) -> achieved TFLOP/s
Inputs are made by the backend (embedding rows, their SwiGLU for d_ff-wide
matrices), so they live where its matmuls read them.  Each result is first
checked against the CPU reference (float64 matmul of the dequantized weights on
the same inputs); a kernel that disagrees is reported as failed, never timed.  The
ceilings are measured in the same run on the same device: copy bandwidth (bytes
read + written) and a dense GEMM (numpy on the CPU, torch/cuBLAS on the GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ukgpu.tools.bench.schema import Entry, Result

MIN_SAMPLE_S = 0.02  # each sample loops a call until this much time has passed
REL_TOL = 0.05  # 8-bit activation rounding stays well inside this


class KernelMismatch(Exception):
    pass


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds per call: one warm-up call, then `repeats` samples of a loop of >= MIN_SAMPLE_S."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    loops = max(1, int(MIN_SAMPLE_S / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - t0) / loops)
    return samples


def cpu_ceilings(repeats: int) -> Entry:
    src = np.ones(64 * 2**20 // 4, dtype=np.float32)  # 64 MiB, far above the caches
    dst = np.empty_like(src)
    copy_s = timed(lambda: np.copyto(dst, src), repeats)
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    gemm_s = timed(lambda: a @ a, repeats)
    results = [Result.of("copy", "GB/s", [2 * src.nbytes / s / 1e9 for s in copy_s]),
               Result.of("gemm_f32", "TFLOP/s", [2 * 1024**3 / s / 1e12 for s in gemm_s])]
    return Entry("-", "cpu", "ceilings", True, None, results, {"how": "numpy copyto 64 MiB; f32 1024^3 matmul"})


def cuda_ceilings(repeats: int) -> Entry:
    try:
        import torch
    except ImportError:
        return Entry.unavailable("-", "cuda", "ceilings", "torch is not installed (needed for the cuBLAS ceiling)")
    if not torch.cuda.is_available():
        return Entry.unavailable("-", "cuda", "ceilings", "torch sees no CUDA device")
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")

    def sync(fn):
        return lambda: (fn(), torch.cuda.synchronize())

    copy_s = timed(sync(lambda: dst.copy_(src)), repeats)
    gemm_s = timed(sync(lambda: a @ a), repeats)
    results = [Result.of("copy", "GB/s", [2 * src.numel() / s / 1e9 for s in copy_s]),
               Result.of("gemm_bf16", "TFLOP/s", [2 * 8192**3 / s / 1e12 for s in gemm_s])]
    return Entry("-", "cuda", "ceilings", True, None, results, {"how": "torch copy_ 512 MiB; bf16 8192^3 matmul"})


def _pick_weights(gguf: Any) -> list[Any]:
    """Layer 0's matrices and the output matrix, one per distinct (type, shape)."""
    names = [n for n in gguf.tensors if n.startswith("blk.0.") and len(gguf.tensors[n].shape) == 2]
    names.append("output.weight" if "output.weight" in gguf.tensors else "token_embd.weight")
    seen, views = set(), []
    for name in names:
        v = gguf.tensors[name]
        key = (v.qtype, tuple(v.shape))
        if key not in seen:
            seen.add(key)
            views.append(v)
    return views


class Activations:
    """Test inputs made by the backend itself through the Backend interface (so they live
    where its matmuls read them): embedding rows for d_model-wide inputs, their SwiGLU
    through layer 0's gate/up for d_ff-wide ones."""

    def __init__(self, gguf: Any, backend: Any, n: int):
        self.backend = backend
        rows = gguf.tensors["token_embd.weight"].shape[0]
        ids = np.random.default_rng(n).integers(0, rows, n)  # int[n]
        self.embd = backend.embedding(backend.prepare_weight(gguf.tensors["token_embd.weight"]), ids)  # [n, d]
        self.d_model = gguf.tensors["token_embd.weight"].shape[1]
        self.gguf = gguf
        self._ff = None

    def of_width(self, cols: int) -> Any:
        if cols == self.d_model:
            return self.embd
        gate, up = self.gguf.tensors["blk.0.ffn_gate.weight"], self.gguf.tensors["blk.0.ffn_up.weight"]
        if cols != gate.shape[0]:
            raise KernelMismatch(f"no test activation of width {cols}")
        if self._ff is None:
            be = self.backend
            self._ff = be.swiglu(be.matmul(self.embd, be.prepare_weight(gate)),
                                 be.matmul(self.embd, be.prepare_weight(up)))  # [n, d_ff]
        return self._ff


def _check(backend: Any, w: Any, view: Any, x: Any) -> float:
    from ukgpu.llama_core.gguf import quants

    x_host = np.asarray(backend.to_host(x), dtype=np.float64)  # [n, in]
    dense = quants.dequantize(np.asarray(view.data), view.qtype, int(np.prod(view.shape))).reshape(view.shape)
    want = x_host @ dense.astype(np.float64).T  # [n, out]
    got = np.asarray(backend.to_host(backend.matmul(x, w)), dtype=np.float64)
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    if not err <= REL_TOL:
        raise KernelMismatch(f"relative error {err:.3g} > {REL_TOL} against the CPU reference")
    return err


def bench_kernels(gguf: Any, model_name: str, backend: Any, runner: str, repeats: int, n_mm: int) -> Entry:
    results = []
    failures = {}
    inputs = {n: Activations(gguf, backend, n) for n in (1, n_mm)}
    for view in _pick_weights(gguf):
        w = backend.prepare_weight(view)
        rows, cols = view.shape
        qname = view.qtype.name
        short = view.name.replace("blk.0.", "").replace(".weight", "")
        for kind, n in (("mv", 1), ("mm", n_mm)):
            test = f"{kind} {short} {qname} {rows}x{cols}"
            try:
                x = inputs[n].of_width(cols)
                err = _check(backend, w, view, x)
            except KernelMismatch as exc:
                failures[test] = str(exc)
                continue
            secs = timed(lambda x=x, w=w: backend.to_host(backend.matmul(x, w)), repeats)
            nbytes = int(np.asarray(view.data).nbytes) + n * cols * 4 + n * rows * 4
            flops = 2 * n * rows * cols
            results.append(Result.of(test, "GB/s", [nbytes / s / 1e9 for s in secs], n=n, qtype=qname,
                                     bytes=nbytes, flops=flops, seconds=float(np.median(secs)),
                                     tflops=flops / float(np.median(secs)) / 1e12, rel_err=err))
    info = {"failed": failures} if failures else {}
    return Entry(model_name, runner, "kernels", True, None, results, info)
