"""Benchmark the shipped kernel artifacts on a GPU (not collected by pytest; run it directly).

    python tests/perf/bench_ptx_gpu.py [--json out.json] [--ptx-target sm_80] [--quick]

Kernels launch through the backend's own launcher (`gpu.cuda.modules.KernelSet` over
`open_device`'s context; `--ptx-target` is its `force_ptx`), buffers come from a `DeviceArena` per
measurement, freed after it.  Measures, in one process and one CUDA context:
- device copy bandwidth: cuMemcpyDtoDAsync of 1 GiB (GB/s counts read + write bytes);
- decode mat-vec GB/s (bytes of the repacked weight planes + x + y per call) for Q4_K and Q8_0 at
  4096x4096, 8960x1536 and 1536x8960, batch 1 (b1) and 8 (b8), as a fraction of copy bandwidth;
- the decode graph's fused mat-vecs (rmsnorm + gate/up + SiLU, projection + residual add, the
  output's rmsnorm + matrix) on the 1.5B Q4_K_M shapes, b1 and b8, GB/s as above;
- prefill GEMM TFLOP/s (2*M*N*K per call) for F16, Q8_0 and Q4_K weights at 2048^3 and
  M=512 x 8960x1536, next to torch.matmul (fp16, cuBLAS) on the same shapes when torch has CUDA;
- decode attention (split + combine, head_dim 128, 12/2 heads) GB/s of K+V read at 512, 4096
  and 32768 cached keys, unsplit and in 16 splits.
Kernel timings come from CUDA graphs, not from Python launches: each measurement captures
`per_graph` launches of its kernel(s) into one graph (through `KernelSet.launch`, so the manifest's
checks run once, at capture), instantiates it, replays it after a warm-up and divides the
CUDA-event time of the replays by replays x per_graph.  A Python launch (argument packing, the
bindings' parameter marshalling, the driver call: tens of us) would swamp a ~2-3 us mat-vec.
`--quick` shrinks every shape and count to what the stand-in driver emulates in seconds (the kit's
dry run); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ukgpu.gpu.cuda.arena import DeviceArena
from ukgpu.gpu.cuda.driver import CudaContext, CudaError, open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.gpu.cuda.verify_checks import Device
from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.loader import fused_matvec_entry

MATVEC_SHAPES = [(4096, 4096), (8960, 1536), (1536, 8960)]  # (N, K)
# the decode graph's fused mat-vecs on Qwen2.5-Coder-1.5B Q4_K_M: (mode, qtype, N, K)
FUSED_SHAPES = [("glu", "Q4_K", 8960, 1536), ("add", "Q4_K", 1536, 1536), ("add", "Q4_K", 1536, 8960),
                ("add", "Q6_K", 1536, 8960), ("norm", "Q6_K", 151936, 1536)]
GEMM_SHAPES = [(2048, 2048, 2048), (512, 8960, 1536)]  # (M, N, K)
ARENA_BYTES = 256 << 20  # one measurement's buffers (the most: one shape's three GEMMs, ~120 MB)


@contextlib.contextmanager
def scratch(kernels: KernelSet, nbytes: int = ARENA_BYTES) -> Iterator[Device]:
    """Upload / read helpers over a fresh device arena, freed on exit."""
    arena = DeviceArena(kernels.cu, nbytes)
    try:
        yield Device(kernels, arena)
    finally:
        kernels.ctx.sync()
        arena.free()


def time_ms(ctx: CudaContext, fn: Callable[[], None], iters: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds per call of fn() (which enqueues work on the context's stream)."""
    for _ in range(warmup):
        fn()
    cu = ctx.cu
    start, end = cu.cuEventCreate(0), cu.cuEventCreate(0)
    try:
        cu.cuEventRecord(start, ctx.stream)
        for _ in range(iters):
            fn()
        cu.cuEventRecord(end, ctx.stream)
        cu.cuEventSynchronize(end)
        return cu.cuEventElapsedTime(start, end) / iters
    finally:
        cu.cuEventDestroy(start)
        cu.cuEventDestroy(end)


def copy_bandwidth(ctx: CudaContext, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of nbytes on the context's stream, GB/s of bytes read + written."""
    arena = DeviceArena(ctx.cu, 2 * nbytes)
    try:
        a, b = arena.alloc(nbytes), arena.alloc(nbytes)
        ms = time_ms(ctx, lambda: ctx.cu.cuMemcpyDtoDAsync(b, a, nbytes, ctx.stream), iters=10)
    finally:
        ctx.sync()
        arena.free()
    return 2 * nbytes / ms / 1e6  # GB/s


def _artifact(dev: Device, name: str) -> str:
    art = dev.kernels.kernel(name).artifact
    return f"{art.target}/{art.kind}"


@dataclass
class Counts:
    """How many launches one graph holds and how often it is replayed (after `warmup` replays)."""

    per_graph: int
    replays: int
    warmup: int = 2


FULL = {"matvec": Counts(100, 20), "gemm": Counts(10, 10), "attn": Counts(50, 20)}
QUICK = {"matvec": Counts(4, 2, 1), "gemm": Counts(2, 2, 1), "attn": Counts(4, 2, 1)}


def graph_time_ms(kernels: KernelSet, names: tuple[str, ...], vals: dict, counts: Counts) -> float:
    """Milliseconds per launch of `names` (in order), from replays of one captured graph."""
    ctx, cu = kernels.ctx, kernels.cu
    kernels.preload(list(names))  # module loads are not capturable
    ctx.sync()
    wait_after_launch = getattr(kernels, "sync", False)  # UKGPU_CUDA_SYNC's debugging mode
    kernels.sync = False  # a launch recorded into a graph must not wait for the stream
    cu.cuStreamBeginCapture(ctx.stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
    try:
        for _ in range(counts.per_graph):
            for name in names:
                kernels.launch(name, vals)
    except BaseException:
        with contextlib.suppress(CudaError):  # leave the stream usable; the cause propagates
            cu.cuGraphDestroy(cu.cuStreamEndCapture(ctx.stream))
        raise
    finally:
        kernels.sync = wait_after_launch
    graph = cu.cuStreamEndCapture(ctx.stream)
    try:
        exec_ = cu.cuGraphInstantiate(graph, 0)
    finally:
        cu.cuGraphDestroy(graph)
    try:
        ms = time_ms(ctx, lambda: cu.cuGraphLaunch(exec_, ctx.stream), iters=counts.replays,
                     warmup=counts.warmup)
    finally:
        ctx.sync()
        cu.cuGraphExecDestroy(exec_)
    return ms / counts.per_graph


def _timed(dev: Device, names: tuple[str, ...], vals: dict, counts: Counts) -> float:
    return graph_time_ms(dev.kernels, names, vals, counts)


def bench_matvec(dev: Device, qtype: str, n: int, k: int, batch: int, rng,
                 counts: Counts = FULL["matvec"]) -> dict:
    w = R.random_repacked(qtype, n, k, rng)
    planes = {f"w_{p}": dev.put(a) for p, a in w.planes().items()}
    x = rng.standard_normal((batch, k)).astype(np.float32)
    version = "b1" if batch == 1 else "b8"
    vals = planes | {"x": dev.put(x), "y": dev.arena.alloc(batch * n * 4), "N": n, "K": k, "B": batch}
    name = f"matvec_{qtype.lower()}_{version}"
    ms = _timed(dev, (name,), vals, counts)
    nbytes = sum(a.nbytes for a in w.planes().values()) + x.nbytes + batch * n * 4
    return {"kernel": name, "N": n, "K": k, "B": batch, "us": ms * 1e3, "GB/s": nbytes / ms / 1e6,
            "artifact": _artifact(dev, name)}


def bench_fused(dev: Device, mode: str, qtype: str, n: int, k: int, batch: int, rng,
                counts: Counts = FULL["matvec"]) -> dict:
    """A decode-graph mat-vec (`matvec_fused.py`): GB/s of its weight planes (two for glu) + x + y."""
    mats = [R.random_repacked(qtype, n, k, rng) for _ in range(2 if mode == "glu" else 1)]
    vals: dict = {f"{pre}_{p}": dev.put(a) for pre, w in zip("wu", mats) for p, a in w.planes().items()}
    x = rng.standard_normal((batch, k)).astype(np.float32)
    vals |= {"x": dev.put(x), "g": dev.put(np.ones(k, np.float32)), "bias": dev.put(np.zeros(n, np.float32)),
             "y": dev.put(np.zeros((batch, n), np.float32)), "N": n, "K": k, "B": batch, "eps": 1e-6,
             "flag": 0}
    name = fused_matvec_entry(mode, qtype, batch)
    ms = _timed(dev, (name,), vals, counts)
    nbytes = sum(a.nbytes for w in mats for a in w.planes().values()) + x.nbytes + batch * n * 4
    return {"kernel": name, "N": n, "K": k, "B": batch, "us": ms * 1e3, "GB/s": nbytes / ms / 1e6,
            "artifact": _artifact(dev, name)}


def bench_gemm(dev: Device, qtype: str, m: int, n: int, k: int, rng,
               counts: Counts = FULL["gemm"]) -> dict:
    w = R.random_repacked(qtype, n, k, rng)
    planes = {f"w_{p}": dev.put(a) for p, a in w.planes().items()}
    x = rng.standard_normal((m, k)).astype(np.float32)
    vals = planes | {"x": dev.put(x), "y": dev.arena.alloc(m * n * 4), "M": m, "N": n, "K": k}
    name = f"gemm_{qtype.lower()}"
    ms = _timed(dev, (name,), vals, counts)
    return {"kernel": name, "M": m, "N": n, "K": k, "us": ms * 1e3,
            "TFLOP/s": 2 * m * n * k / ms / 1e9, "artifact": _artifact(dev, name)}


def bench_attn_decode(dev: Device, hd: int, hq: int, hkv: int, n_keys: int, splits: int,
                      rng, counts: Counts = FULL["attn"]) -> dict:
    """One decode step over n_keys cached keys: GB/s of K+V bytes read (f16)."""
    n_ctx = n_keys
    per_split = -(-n_ctx // splits)
    chunk = -(-per_split // 64) * 64  # a multiple of 64 with splits * chunk >= n_ctx
    kv = rng.standard_normal((n_ctx, hkv, hd)).astype(np.float16)
    vals = {"q": dev.put(rng.standard_normal((1, hq, hd)).astype(np.float32)),
            "k_cache": dev.put(kv), "v_cache": dev.put(kv),
            "part_out": dev.arena.alloc(hq * splits * hd * 4), "part_ml": dev.arena.alloc(hq * splits * 8),
            "out": dev.arena.alloc(hq * hd * 4), "slots": dev.put(np.zeros(1, np.int32)),
            "lens": dev.put(np.array([n_keys], np.int32)), "n_ctx": n_ctx, "chunk": chunk,
            "Hq": hq, "Hkv": hkv, "scale": hd ** -0.5, "window": 0, "B": 1, "S": splits}
    names = (f"attn_decode_d{hd}", f"attn_combine_d{hd}")
    ms = _timed(dev, names, vals, counts)
    return {"kernel": f"{names[0]} + combine", "keys": n_keys, "Hq": hq, "Hkv": hkv, "S": splits,
            "us": ms * 1e3, "GB/s": 2 * kv.nbytes / ms / 1e6}


def bench_torch(m: int, n: int, k: int) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.randn(m, k, device="cuda", dtype=torch.float16)
    b = torch.randn(k, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        torch.matmul(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        torch.matmul(a, b)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 20
    return {"kernel": "torch.matmul fp16", "M": m, "N": n, "K": k, "us": ms * 1e3,
            "TFLOP/s": 2 * m * n * k / ms / 1e9}


@dataclass
class Sizes:
    matvec: list[tuple[int, int]]
    fused: list[tuple[str, str, int, int]]
    gemm: list[tuple[int, int, int]]
    keys: tuple[int, ...]
    copy_bytes: int
    counts: dict[str, Counts]


FULL_SIZES = Sizes(MATVEC_SHAPES, FUSED_SHAPES, GEMM_SHAPES, (512, 4096, 32768), 1 << 30, FULL)
QUICK_SIZES = Sizes([(256, 256)], [(m, q, 256, 256) for m, q, _, _ in FUSED_SHAPES[:4]], [(32, 256, 256)], (128,), 16 << 20, QUICK)


def run_matvec(kernels: KernelSet, sz: Sizes, copy: float, rng) -> list[dict]:
    rows = []
    print("| kernel | N x K | B | us | GB/s | of copy | artifact |\n|---|---|---|---|---|---|---|")
    for qtype in ("Q4_K", "Q8_0"):
        for n, k in sz.matvec:
            for batch in (1, 8):
                with scratch(kernels) as dev:
                    r = bench_matvec(dev, qtype, n, k, batch, rng, sz.counts["matvec"])
                rows.append(r)
                print(f"| {r['kernel']} | {n}x{k} | {batch} | {r['us']:.1f} | {r['GB/s']:.0f} | "
                      f"{r['GB/s'] / copy:.0%} | {r['artifact']} |", flush=True)
    return rows


def run_fused(kernels: KernelSet, sz: Sizes, copy: float, rng) -> list[dict]:
    rows = []
    print("\n| fused kernel | N x K | B | us | GB/s | of copy | artifact |\n|---|---|---|---|---|---|---|")
    for mode, qtype, n, k in sz.fused:
        for batch in (1, 8):
            with scratch(kernels) as dev:
                r = bench_fused(dev, mode, qtype, n, k, batch, rng, sz.counts["matvec"])
            rows.append(r)
            print(f"| {r['kernel']} | {n}x{k} | {batch} | {r['us']:.1f} | {r['GB/s']:.0f} | "
                  f"{r['GB/s'] / copy:.0%} | {r['artifact']} |", flush=True)
    return rows


def run_gemm(kernels: KernelSet, sz: Sizes, rng) -> list[dict]:
    out = []
    print("\n| kernel | M x N x K | us | TFLOP/s | artifact |\n|---|---|---|---|---|")
    for m, n, k in sz.gemm:
        with scratch(kernels) as dev:
            rows = [bench_gemm(dev, q, m, n, k, rng, sz.counts["gemm"]) for q in ("F16", "Q8_0", "Q4_K")]
        rows.append(bench_torch(m, n, k))
        for r in filter(None, rows):
            out.append(r)
            print(f"| {r['kernel']} | {m}x{n}x{k} | {r['us']:.1f} | {r['TFLOP/s']:.1f} | "
                  f"{r.get('artifact', 'cuBLAS')} |", flush=True)
    return out


def run_attn(kernels: KernelSet, sz: Sizes, rng) -> list[dict]:
    out = []
    print("\n| kernel | keys | Hq/Hkv | S | us | K+V GB/s |\n|---|---|---|---|---|---|")
    for n_keys in sz.keys:
        for splits in (1, 16):
            with scratch(kernels) as dev:
                r = bench_attn_decode(dev, 128, 12, 2, n_keys, splits, rng, sz.counts["attn"])
            out.append(r)
            print(f"| {r['kernel']} | {n_keys} | 12/2 | {splits} | {r['us']:.1f} | {r['GB/s']:.0f} |",
                  flush=True)
    return out


def run_all(kernels: KernelSet, sz: Sizes) -> dict:
    cc = kernels.ctx.info.cc
    rng = np.random.default_rng(0)
    copy = copy_bandwidth(kernels.ctx, sz.copy_bytes)
    print(f"device cc {cc[0]}.{cc[1]}; cuMemcpyDtoDAsync {copy:.0f} GB/s (read + write)")
    timing = {k: {"per_graph": c.per_graph, "replays": c.replays} for k, c in sz.counts.items()}
    return {"cc": list(cc), "copy_GBps": copy, "timing": "cuda graph replays", "counts": timing,
            "matvec": run_matvec(kernels, sz, copy, rng), "fused": run_fused(kernels, sz, copy, rng),
            "gemm": run_gemm(kernels, sz, rng),
            "attn_decode": run_attn(kernels, sz, rng)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--ptx-target", help="force that target's PTX (e.g. sm_80) instead of the cubin")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes and counts (a dry run under the stand-in driver)")
    args = ap.parse_args(argv)
    kernels = KernelSet(open_device(0), force_ptx=args.ptx_target)
    results = run_all(kernels, QUICK_SIZES if args.quick else FULL_SIZES)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
