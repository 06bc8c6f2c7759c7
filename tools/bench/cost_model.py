"""A cost model of the CUDA backend's kernel launches: predicted seconds per node of a launch trace.

Input: a launch trace, one `(entry, args, grid)` per kernel node run (the stand-in driver's
`FakeDriver.trace`; `entry` is the kernel's manifest entry, `args` its launch arguments by
parameter name, `grid` its grid), and a `Device`.  Per node:

    t = launch latency + max(bytes / (HBM bandwidth * reach * occupancy),
                             L2 bytes / (L2 bandwidth * occupancy), flops / (peak * fill))

- bytes: what the kernel must move to or from HBM at least once (weights planes, activations,
  KV cache rows, outputs), from its family and arguments (`traffic`); re-reads that the L2 (50 MB
  on an H200) serves are not counted there but in `l2_bytes`: what the CTAs load in all, L2 hits
  included.  That term matters for the tiled kernels: every one of the GEMM's cdiv(N, 64) column
  programs loads its 64 rows of f32 x in full (and the per-row scaling's first pass loads them
  once more), every row program its W tile; every prefill-attention program its keys.
- flops: 2 per multiply-add; tensor-core families (the f16 GEMM, prefill attention) against the
  tensor peak, the rest (fp32 mat-vec, decode attention) against the fp32 SIMT peak.  The GEMM's
  SIMT work (dequantizing W tiles, casting and scaling x tiles: `alu_ops`) runs at half the fp32
  FLOP rate (one instruction a lane a cycle) and overlaps the tensor cores: the larger wins.
- occupancy: CTAs resident per SM = min(32, 2048 threads / CTA threads, 228 KiB / CTA shared
  bytes); the grid fills min(1, CTAs / (132 * that)) of the machine, and HBM bandwidth needs
  about `warps_to_saturate` resident warps per SM (Little's law: ~4.8 TB/s x ~600 ns latency
  = ~2.9 MB in flight, ~22 KB per SM, ~2 KB per warp with 16-byte loads), so a small grid gets
  a proportional share.  `fill` for the compute term: the share of SM-waves that hold a CTA,
  CTAs / (ceil(CTAs / 132) * 132) (a grid under 132 CTAs leaves SMs idle; the last wave too).
- launch latency: `node_s` per node of a replayed CUDA graph (each node waits on the one
  before), `eager_node_s` per eager launch on the device side; eager launches also cost
  `host_launch_s` of Python each on the host, which overlaps the device work, so an eager run
  takes max(device sum, host sum).

H200 figures (`H200`): 4.8 TB/s HBM3e (NVIDIA's H200 datasheet); 4.3 TB/s read+write measured by a
device-to-device copy on an H200 (docs/results/cuda-h200: 4,244-4,268 GB/s), so `reach` = 0.9; 132 SMs
(sm_90, 228 KiB shared memory and 2048 threads per SM, 32 CTAs at most: CUDA programming guide,
compute capability 9.0); ~7 TB/s L2 read bandwidth (an estimate from public microbenchmarks of
the H100, the same die: 5.5-7 TB/s); ~790 TFLOP/s dense bf16/f16 measured there (a bf16 GEMM; the datasheet's
989 is the boost peak); 67 TFLOP/s fp32 SIMT (datasheet); tf32 half the f16 rate (datasheet: 494
vs 989 dense); 1.5 us per dependent graph node and 2 us per eager launch on the device (published
CUDA-graph microbenchmarks of chains of empty kernels on H100: 1.5-2.5 us a node); ~20 us of
host time per eager launch of a prefill forward (the model's and backend's Python, the launcher,
cuda-python; the driver's own cost not included: tests/perf/launch_host_cost.py on the development
machine, 19.8 us SmolLM2 and 20.8 us the 1.5B).

Measured against the H200 (docs/benchmarks/cuda.md), this analytic model is 3.5x optimistic on
decode: the fused mat-vecs stream at 0.25-0.85 TB/s, not ~4.3, and every node has ~4.5 us of
fixed cost inside the kernel.  `MEASURED_H200` holds per-family laws fitted to the ncu profile of
one decode step of each benchmark model (fixed seconds + HBM bytes / a measured rate, by entry
name; within ~20% of each of the 12 kernels); `predict(..., measured=MEASURED_H200)` prices the
kernels it covers with them (no node latency beside it: the profiled kernels are the replayed
step, 2,332 us of kernels for a 2,170 us graph step) and the rest as above.  The laws describe
today's kernels: a kernel change must be measured again before its own law is trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from math import ceil
from typing import Any

from ukgpu.ptx_kernels.repack import FORMATS

Node = tuple[dict, dict, tuple]  # (manifest entry, launch args by name, grid)
ReadI32 = Callable[[int, int], list[int]]  # (device pointer, count) -> int32 values


@dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes_s: float  # peak HBM bandwidth
    l2_bytes_s: float  # L2 -> SM bandwidth, all SMs
    reach: float  # fraction of the peak a streaming kernel reaches
    sms: int
    tensor_flops: float  # dense f16/bf16 tensor-core FLOP/s
    fp32_flops: float  # fp32 SIMT FLOP/s
    node_s: float  # per dependent node of a replayed CUDA graph
    eager_node_s: float  # device-side cost of one eager launch
    host_launch_s: float  # host (Python) cost of one eager launch
    threads_per_sm: int = 2048
    shared_per_sm: int = 228 * 1024
    ctas_per_sm: int = 32
    warps_to_saturate: int = 12


H200 = Device("NVIDIA H200 (sm_90)", hbm_bytes_s=4.8e12, l2_bytes_s=7e12, reach=0.9, sms=132, tensor_flops=790e12,
              fp32_flops=67e12, node_s=1.5e-6, eager_node_s=2.0e-6, host_launch_s=20e-6)


# entry-name prefix -> (fixed seconds, bytes per second) of today's kernels on an H200 (ncu, one
# decode step at position 100 of Qwen2.5-Coder-1.5B Q4_K_M and SmolLM2-135M:
# docs/results/cuda-h200/run4-*).  Within ~20% of each: glu 15.5 MB in 23.7 us, output 191 MB in
# 224 us, o 1.3 MB in 5.6 us, down 7.7 / 11.3 MB in 17.1 / 21.7 us, qkv 2.6 MB in 7.7 us.
MEASURED_H200 = {
    "matvec_norm_": (4.5e-6, 0.8e12), "matvec_qkv_": (4.5e-6, 0.8e12),
    "matvec_glu_": (4.5e-6, 0.8e12), "matvec_add_": (4.5e-6, 0.8e12),
    "attn_decode_rope_": (11e-6, 0.8e12),  # 12.4 us (d128), 9.9 us (d64), ~100 keys
    "attn_combine_": (3.1e-6, 0.8e12),  # 3.3 / 3.0 us
    "embedding_": (3.0e-6, 0.8e12),  # one row: 3.1 us
}

# Predictions, not measurements (issue 18; docs/benchmarks/cuda.md "Split-K down projection and a
# normed output row"): laws for the kernels that change, assumed before the H200 measures them.
# - the split-K down projection (1,536 programs of 4.4 steps instead of 384 of 17.5): streams
#   like the mat-vecs that have enough programs (the GLU: 1,120 programs, 15.5 MB at the 0.8 TB/s
#   law), 1 us more for the last program's reduction (partials back from L2, a second pass);
# - the output matrix read by the plain b1 mat-vec from a normed row: its L2 reads fall from
#   3.7x to 0.6x its weight bytes (x, and g, no longer read twice by every one of 37,984
#   programs), so the 191 MB stream at 1.6 TB/s, twice the fused node's 0.85 (the doc's "halve");
# - rmsnorm of one row: one program, as the one-row embedding (3.1 us).
# `predict(..., measured=MEASURED_H200 | PREDICTED_H200)`: the measured laws first (by prefix).
PREDICTED_H200 = {
    "matvec_split_add_": (5.5e-6, 0.8e12),
    "rmsnorm_f32": (3.0e-6, 0.8e12),
    "matvec_": (4.5e-6, 1.6e12),  # the plain mat-vecs (decode: the output matrix only)
}


# A prediction, not a measurement: the one-row mat-vecs of `ptx_kernels/row_dot.py` (no barrier
# in the K loop, 16-byte quant loads, gate and up in one loop, 4 rows x 1,024 columns a step).
# The H200's profile of the kernels before them fits "3.2 us + 0.79 us a dependent round trip to
# memory": o (3 steps) 5.6 us, down (17.5 steps) 17.1 us, q/k/v (3 norm steps + 3) 7.7 us
# (predicted 7.9).  Here: 3.2 us + waves x round trips x 0.79 us (the same latency a round trip,
# as if removing the barriers gained nothing inside a step), round trips = the K steps (the norm's
# sum of squares now comes from the same loads: no pass of its own; split-K: its chunk's steps and
# one for the partials); waves = programs over 4 resident a SM (72-168 registers a thread, 128
# threads: ptxas on the sm_90a build); never faster than the bytes at 90% of HBM.
# `predict(..., measured=ROW_DOT_H200 | MEASURED_H200 | PREDICTED_H200)`.
ROW_DOT_STEP_S, ROW_DOT_FIXED_S, ROW_DOT_CTAS_PER_SM = 0.79e-6, 3.2e-6, 4


def _row_dot_law(e: dict, a: dict, grid: tuple, tr: Traffic, dev: Device) -> float | None:
    """Seconds of a one-row `row_dot` mat-vec (None for the other entries)."""
    c = e.get("constexprs", {})
    if not e["name"].endswith("_b1") or c.get("BLOCK_B", 1) != 1 or "BLOCK_K" not in c:
        return None
    k, split = a["K"], e["name"].startswith("matvec_split_add_")
    if split:
        k = ceil(ceil(k / 256) / a["splits"]) * 256
    steps = ceil(k / c["BLOCK_K"]) + split  # + the partials' sum
    ctas = grid[0] * grid[1] * grid[2]
    waves = ceil(ctas / (dev.sms * ROW_DOT_CTAS_PER_SM))
    return ROW_DOT_FIXED_S + max(waves * steps * ROW_DOT_STEP_S, tr.bytes / (dev.hbm_bytes_s * dev.reach))


# keyed "matvec" (not "matvec_", PREDICTED_H200's key) so that `ROW_DOT_H200 | ...` keeps it first
ROW_DOT_H200 = {"matvec": _row_dot_law}


@dataclass(frozen=True)
class Traffic:
    bytes: float  # HBM
    flops: float
    tensor: bool  # flops on tensor cores (else fp32 SIMT)
    l2_bytes: float = 0.0  # loaded by all CTAs, L2 hits included (0: the HBM bytes)
    alu_ops: float = 0.0  # SIMT instructions beside the tensor-core flops (the GEMM's dequant)


@dataclass
class NodeCost:
    name: str
    family: str
    seconds: float  # latency + work
    work_s: float
    bytes: float
    flops: float
    bound: str  # "memory" | "compute" | "latency" | "measured" (a MEASURED_H200 law)


@dataclass
class Prediction:
    nodes: list[NodeCost] = field(default_factory=list)

    @property
    def device_s(self) -> float:
        return sum(n.seconds for n in self.nodes)

    @property
    def bytes(self) -> float:
        return sum(n.bytes for n in self.nodes)

    def by_family(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in self.nodes:
            out[n.family] = out.get(n.family, 0.0) + n.seconds
        return out


def weight_bytes_per_element(qtype: str) -> float:
    """Bytes per weight element of the repacked device layout (ptx_kernels/repack.py)."""
    return FORMATS[qtype].bytes_per_element


def _matmul(e: dict, a: dict, grid: tuple) -> Traffic:
    rows = a["B"] if e["family"] == "matvec" else a["M"]
    n, k = a["N"], a["K"]
    if e["family"] == "matvec":
        w, x, y = n * k * weight_bytes_per_element(e["qtype"]), 4 * rows * k, 4 * rows * n
        return Traffic(w + x + y, 2.0 * rows * n * k, False)
    return _gemm(e, grid, rows, n, k)


def _gemm(e: dict, grid: tuple, rows: int, n: int, k: int, weights: int = 1, extra: float = 0.0,
          x_ops: float = 1.0) -> Traffic:
    """A tensor-core GEMM of `weights` (N, K) weights read in one loop (the GLU's two) into one
    (rows, N) output; `extra`: bytes besides x, W and y (g, biases, a residual read); `x_ops`:
    ALU operations per x element a column program does (the cast; the fused norm's g multiply
    and square add make 3)."""
    w, x, y = weights * n * k * weight_bytes_per_element(e["qtype"]), 4 * rows * k, 4 * rows * n
    x_passes = e.get("cost_x_passes", 1)  # 2: a separate row-max pass (`gemm_option`)
    l2 = x * x_passes * grid[1] + w * grid[0] + y + extra  # each column program loads all its x rows
    # per element: W dequant ~4 ops in every row program, x x_ops in every column program;
    # tile scaling: abs, max, multiply per x element, two acc multiplies per K step
    alu = 4.0 * weights * n * k * grid[0] + x_ops * rows * k * grid[1]
    if "X_EXP_SHIFT" in e.get("constexprs", {}):
        alu += 3.0 * rows * k * grid[1] + 2.0 * weights * rows * n * k / e["constexprs"].get("BLOCK_K", 64)
    return Traffic(w + x + y + extra, 2.0 * weights * rows * n * k, True, l2, alu)


def _gemm_fused(e: dict, a: dict, grid: tuple) -> Traffic:
    """`gemm_fused.py`: q/k/v as one GEMM of their summed rows plus g and the biases; the GLU's
    two weights in one loop; the residual add reads y too."""
    rows, k, name = a["M"], a["K"], e["name"]
    if name.startswith("gemm_qkv"):
        n = a["N0"] + a["N1"] + a["N2"]
        return _gemm(e, grid, rows, n, k, extra=4 * k + 4 * n, x_ops=3)
    if name.startswith("gemm_glu"):
        return _gemm(e, grid, rows, a["N"], k, weights=2, extra=4 * k, x_ops=3)
    return _gemm(e, grid, rows, a["N"], k, extra=4 * rows * a["N"])


def _matvec_fused(e: dict, a: dict, grid: tuple) -> Traffic:
    """`matvec_fused.py`: norm (+bias) reads g (and bias); glu streams two weights; add reads
    and writes the residual rows.  L2: every program reads all of its BLOCK_B x rows (and g);
    those are read-only and small (6-48 KB), so an SM's later programs find them in its L1:
    counted once per SM (an assumption, unverified on hardware)."""
    bb, rows, k = e["constexprs"]["BLOCK_B"], a["B"], a["K"]
    x_l2 = min(grid[0] * grid[1], H200.sms) * (4 * bb * k + 4 * k)
    if e["name"].startswith("matvec_qkv"):
        n = a["N0"] + a["N1"] + a["N2"]
        hbm = n * k * weight_bytes_per_element(e["qtype"]) + 4 * rows * k + 4 * k + 4 * n + 4 * rows * n
        return Traffic(hbm, 2.0 * rows * n * k, False, hbm + x_l2)
    n, mode = a["N"], e["constexprs"]["MODE"]
    w, x, y = n * k * weight_bytes_per_element(e["qtype"]), 4 * rows * k, 4 * rows * n
    if mode == 1:
        hbm = 2 * w + x + 4 * k + y
        return Traffic(hbm, 4.0 * rows * n * k, False, hbm + x_l2)
    if mode == 2:
        return Traffic(w + x + 2 * y, 2.0 * rows * n * k, False, w + 2 * y + x_l2)
    hbm = w + x + 4 * k + 4 * n + y
    return Traffic(hbm, 2.0 * rows * n * k, False, hbm + x_l2)


def _attn_prefill(e: dict, a: dict, grid: tuple) -> Traffic:
    d = e["constexprs"]["HEAD_DIM"]
    t, start, hq, hkv, window = a["T"], a["start"], a["Hq"], a["Hkv"], a["window"]
    keys = sum(min(start + i + 1, window) if window > 0 else start + i + 1 for i in range(t))
    kv = 2 * 2 * (start + t) * hkv * d  # f16 K and V rows of the slot, read once from HBM
    bm = e["constexprs"].get("BLOCK_M", 64)
    block_keys = sum(start + min(t, m0 + bm) for m0 in range(0, t, bm))  # keys each q block loads
    l2 = 2 * 2 * d * hq * block_keys + 2 * 4 * t * hq * d
    return Traffic(kv + 2 * 4 * t * hq * d, 4.0 * hq * d * keys, True, l2)


def _attn_decode(e: dict, a: dict, grid: tuple, lens: list[int]) -> Traffic:
    d, (b, hkv, s) = e["constexprs"]["HEAD_DIM"], grid
    hq, window = a["Hq"], a["window"]
    keys = sum(min(n, window) if window > 0 else n for n in lens)
    partials = b * hq * s * (d + 2) * 4
    return Traffic(2 * 2 * hkv * d * keys + 4 * b * hq * d + partials, 4.0 * hq * d * keys, False)


def _attn_decode_rope(e: dict, a: dict, grid: tuple, lens: list[int]) -> Traffic:
    """attn_decode's traffic plus the new q, k, v rows (f32), the norm weights, the f16 row store;
    the fp32 dots run on GROUP_PAD query rows per program (a group of 6 computes 8)."""
    c, (b, progs, s) = e["constexprs"], grid
    d, hq, hkv, window = c["HEAD_DIM"], a["Hq"], a["Hkv"], a["window"]
    keys = sum(min(n, window) if window > 0 else n for n in lens)
    kv = 2 * 2 * hkv * d * keys  # f16 K and V rows, once from HBM; each sub-group re-reads L2
    rows = 4 * b * (hq + 2 * hkv) * d + 2 * 2 * b * hkv * d + 8 * d
    partials = b * hq * s * (d + 2) * 4
    flops = 4.0 * progs * c["GROUP_PAD"] * d * keys + 8.0 * b * s * (hq + hkv) * d
    return Traffic(kv + rows + partials, flops, False, kv * progs // hkv + rows + partials)


def _argmax(e: dict, a: dict, grid: tuple) -> Traffic:
    if e["name"].startswith("argmax_reduce"):  # (value, index) of each part, one int per row
        return Traffic(8 * grid[0] * a["P"] + 4 * grid[0], grid[0] * a["P"], False)
    return Traffic(4 * grid[0] * a["V"] + 8 * grid[0] * grid[1], grid[0] * a["V"], False)


def _elementwise(e: dict, a: dict, grid: tuple) -> Traffic:
    name = e["name"]
    if name.startswith(("swiglu", "geglu")):
        return Traffic(12 * a["n"], 8 * a["n"], False)
    if name.startswith("add_bias"):
        return Traffic(8 * a["n"] + 4 * a["N"], a["n"], False)
    if name.startswith(("add", "scale")):
        return Traffic((12 if name.startswith("add") else 8) * a["n"], a["n"], False)
    if name.startswith("argmax"):
        return Traffic(4 * grid[0] * a["V"], grid[0] * a["V"], False)
    if name.startswith("store_rows"):
        return Traffic(6 * grid[0] * a["W"], 0, False)
    raise ValueError(f"cost model: no traffic rule for kernel {name!r}")


def traffic(e: dict, a: dict, grid: tuple, read_i32: ReadI32 | None = None) -> Traffic:
    """Bytes and flops of one node.  Decode attention reads its key counts (`lens`) from device
    memory: `read_i32` gives them; without it every row counts n_ctx keys (an upper bound)."""
    fam, name = e["family"], e["name"]
    if fam in ("matvec", "gemm"):
        return _matmul(e, a, grid)
    if fam == "matvec_fused":
        return _matvec_fused(e, a, grid)
    if fam == "gemm_fused":
        return _gemm_fused(e, a, grid)
    if fam == "matvec_split":  # y read and written, the partials written and read back (L2)
        n, k = a["N"], a["K"]
        w = n * k * weight_bytes_per_element(e["qtype"])
        return Traffic(w + 4 * k + 8 * n, 2.0 * n * k, False, w + 4 * k * grid[0] + 8 * n
                       + 8 * n * a["splits"])
    if name.startswith("attn_prefill"):
        return _attn_prefill(e, a, grid)
    if name.startswith("attn_decode"):
        lens = read_i32(a["lens"], grid[0]) if read_i32 else [a["n_ctx"]] * grid[0]
        fused = fam == "attention_fused"
        return (_attn_decode_rope if fused else _attn_decode)(e, a, grid, [int(n) for n in lens])
    if name.startswith("attn_combine"):
        d, rows = e["constexprs"]["HEAD_DIM"], grid[0] * grid[1]
        return Traffic(rows * a["S"] * (d + 2) * 4 + rows * d * 4, 3.0 * rows * a["S"] * d, False)
    if fam == "embedding":
        return Traffic(grid[0] * a["K"] * (weight_bytes_per_element(e["qtype"]) + 4), 0, False)
    if fam == "argmax":
        return _argmax(e, a, grid)
    if fam == "rmsnorm":
        return Traffic(8 * grid[0] * a["D"] + 4 * a["D"], 3.0 * grid[0] * a["D"], False)
    if fam == "rope":
        size = grid[0] * grid[1] * a["head_dim"]
        return Traffic(8 * size, 3.0 * size, False)
    if fam == "rope_kv":  # q heads read and written f32; k, v heads read f32, stored f16
        t, hd = grid[0], a["head_dim"]
        q, kv = t * a["Hq"] * hd, t * a["Hkv"] * hd
        return Traffic(8 * q + 12 * kv, 6.0 * (q + kv), False)
    return _elementwise(e, a, grid)


def resident_ctas_per_sm(e: dict, dev: Device) -> int:
    threads = e.get("threads_per_block") or 32 * e.get("num_warps", 4)
    shared = e.get("shared_bytes", 0)
    by_shared = dev.shared_per_sm // shared if shared else dev.ctas_per_sm
    return max(1, min(dev.ctas_per_sm, dev.threads_per_sm // threads, by_shared))


def node_cost(node: Node, dev: Device = H200, graph: bool = True,
              read_i32: ReadI32 | None = None, measured: dict | None = None) -> NodeCost:
    e, a, grid = node
    tr = traffic(e, a, grid, read_i32)
    for prefix, law in (measured or {}).items():
        if not e["name"].startswith(prefix):
            continue
        if callable(law):  # a law of the launch's shape (ROW_DOT_H200); None: not its kernel
            seconds = law(e, a, grid, tr, dev)
            if seconds is None:
                continue
            return NodeCost(e["name"], e["family"], seconds, seconds, tr.bytes, tr.flops, "measured")
        fixed, rate = law
        return NodeCost(e["name"], e["family"], fixed + tr.bytes / rate, tr.bytes / rate, tr.bytes,
                        tr.flops, "measured")
    ctas = grid[0] * grid[1] * grid[2]
    per_sm = resident_ctas_per_sm(e, dev)
    resident = min(ctas, dev.sms * per_sm)
    warps = (e.get("threads_per_block") or 32 * e.get("num_warps", 4)) // 32
    occupancy = min(1.0, resident * warps / (dev.sms * dev.warps_to_saturate))
    fill = ctas / (ceil(ctas / dev.sms) * dev.sms)  # SMs busy, last wave included
    mem_s = max(tr.bytes / (dev.hbm_bytes_s * dev.reach), tr.l2_bytes / dev.l2_bytes_s) / occupancy
    comp_s = max(tr.flops / (dev.tensor_flops if tr.tensor else dev.fp32_flops),
                 tr.alu_ops / (dev.fp32_flops / 2)) / fill  # tensor cores and ALUs overlap
    lat = dev.node_s if graph else dev.eager_node_s
    work = max(mem_s, comp_s)
    bound = "latency" if lat > work else ("memory" if mem_s >= comp_s else "compute")
    return NodeCost(e["name"], e["family"], lat + work, work, tr.bytes, tr.flops, bound)


def predict(trace: Iterable[Node], dev: Device = H200, graph: bool = True,
            read_i32: ReadI32 | None = None, measured: dict | None = None) -> Prediction:
    return Prediction([node_cost(n, dev, graph, read_i32, measured) for n in trace])


GEMM_OPTIONS = ("f16", "bf16", "f16_tile_scale", "f16_row_prepass", "tf32", "fp32")


def gemm_option(node: Node, option: str, dev: Device = H200) -> tuple[Node, Device]:
    """The same GEMM node as one of the prefill-precision options of issue 15 would run it:
    f16 / bf16 operands (one pass over x, tensor peak); f16 with power-of-two scaling of each
    row's x tile (ptx_kernels/gemm.py today: SIMT work only); f16 with a per-row scale from a
    first pass over the whole row in every program (x loaded twice); tf32 operands (half the
    tensor rate, f32 tiles in shared memory: fewer CTAs per SM); fp32 without tensor cores."""
    e, a, grid = node
    consts = {k: v for k, v in e.get("constexprs", {}).items() if k != "X_EXP_SHIFT"}
    if option in ("f16_tile_scale", "f16_row_prepass"):
        consts["X_EXP_SHIFT"] = 141
    entry = {k: v for k, v in e.items() if k != "cost_x_passes"} | {"constexprs": consts}
    if option == "f16_row_prepass":
        entry["cost_x_passes"] = 2
    if option == "tf32":  # f32 operand tiles: twice the shared memory a stage
        dev = replace(dev, tensor_flops=dev.tensor_flops / 2)
        entry["shared_bytes"] = 2 * e.get("shared_bytes", 0)
    elif option == "fp32":
        dev = replace(dev, tensor_flops=dev.fp32_flops)
    elif option not in GEMM_OPTIONS:
        raise ValueError(f"unknown GEMM option {option!r}; one of {', '.join(GEMM_OPTIONS)}")
    return (entry, a, grid), dev


def gemm_options(trace: Iterable[Node], dev: Device = H200, graph: bool = False,
                 read_i32: ReadI32 | None = None) -> dict[str, float]:
    """Device seconds of the whole trace under each GEMM option (other nodes unchanged)."""
    nodes = list(trace)
    out = {}
    for option in GEMM_OPTIONS:
        total = 0.0
        for n in nodes:
            node, d = gemm_option(n, option, dev) if n[0]["family"] in ("gemm", "gemm_fused") else (n, dev)
            total += node_cost(node, d, graph, read_i32).seconds
        out[option] = total
    return out


def eager_seconds(p: Prediction, dev: Device = H200) -> float:
    """An eager run: the host's launches overlap the device's work; the slower side wins."""
    return max(p.device_s, len(p.nodes) * dev.host_launch_s)


def summary(p: Prediction) -> dict[str, Any]:
    bounds: dict[str, int] = {}
    for n in p.nodes:
        bounds[n.bound] = bounds.get(n.bound, 0) + 1
    return {"nodes": len(p.nodes), "device_ms": round(p.device_s * 1e3, 4),
            "hbm_mb": round(p.bytes / 1e6, 2), "bound": bounds,
            "ms_by_family": {k: round(v * 1e3, 4) for k, v in sorted(p.by_family().items())}}
