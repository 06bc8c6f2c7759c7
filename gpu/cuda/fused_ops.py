"""The CUDA backend's fused steps: `Backend.norm_matmuls`, `norm_glu` and `matmul_add` as one
kernel each: the mat-vecs of `ptx_kernels/matvec_fused.py` for up to 8 rows (decode, batched
decode), the tensor-core GEMMs of `ptx_kernels/gemm_fused.py` for more (a prefill pass: 6-7
launches a layer instead of 14-17).  Weight types without a shipped fused entry and a GLU whose
two weights differ in type take the plain ops (`Backend`'s defaults: rmsnorm, mat-vec or GEMM,
...).  Consecutive q/k/v weights of one type (and all with or all without a bias) share one
launch, up to three; a lone weight takes the one-weight form.

Two one-row cases go another way, each for a matrix too lopsided for one program a row block:

- `matmul_add` of a weight with few rows and a long K (the down projection) splits K over
  `split_k` programs a row block (`ptx_kernels/matvec_split.py`: the last program of a block adds
  the partials to the residual, in split order: deterministic), so the GPU runs 4x the programs
  with a quarter of the serial steps each;
- the output matrix (a lone weight with more than `NORMED_INPUT_ROWS` rows, no bias) takes
  rmsnorm once, then the plain mat-vec on the normed row, instead of every one of its programs
  recomputing the norm and reading x and g.

The split is off by default (`UKGPU_SPLIT_K_COLUMNS` unset or 0) until an H200 run has checked
its cross-program ticket and measured it; `UKGPU_SPLIT_K_COLUMNS=2048` turns it on (each split at
least that many columns).  `UKGPU_NORMED_OUTPUT=0` gives back the fused norm, `UKGPU_FUSED_GEMM=0`
the plain prefill ops.  They choose paths for measurements (`tools/dev/kernel_sweep.py`).

A mixin of `CudaBackend`: it uses the backend's `new`, `upload`, `launch`, `capturing` and
`_manifest_names`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ukgpu.llama_core.backend import Backend
from ukgpu.llama_core.errors import UkgpuError
from ukgpu.ptx_kernels.loader import MATVEC_MAX_ROWS, fused_gemm_entry, fused_matvec_entry, split_add_entry

DeviceBuffer = Any  # gpu.cuda.arena.DeviceBuffer
DeviceWeight = Any  # gpu.cuda.backend.DeviceWeight

SPLIT_K_ROWS = 4  # rows a program of matvec_split_add owns (its BLOCK_N)
SPLIT_K_MAX = 4
SPLIT_K_PROGRAMS = 4 * 132  # below this many row blocks (4 a SM of an H200) K is split
SPLIT_K_COUNTERS = 8192  # ticket words: weights of up to 32,768 rows split
NORMED_INPUT_ROWS = 32768  # a lone weight with more rows (the output matrix) reads a normed x


def split_k(n: int, k: int) -> int:
    """Programs a row block of an (n, k) one-row residual mat-vec: 1 (no split) unless its row
    blocks are too few to fill the GPU and $UKGPU_SPLIT_K_COLUMNS is set (off by default, see
    above); then each split keeps at least that many columns, at most SPLIT_K_MAX splits."""
    cols = int(os.environ.get("UKGPU_SPLIT_K_COLUMNS") or 0)
    blocks = -(-n // SPLIT_K_ROWS)
    if cols <= 0 or blocks >= SPLIT_K_PROGRAMS or blocks > SPLIT_K_COUNTERS:
        return 1
    return max(1, min(SPLIT_K_MAX, k // cols))


def normed_input(n: int, rows: int) -> bool:
    """True when a lone (n, K) weight times rmsnorm(x) runs as rmsnorm then the plain mat-vec."""
    return rows == 1 and n > NORMED_INPUT_ROWS and os.environ.get("UKGPU_NORMED_OUTPUT", "1") != "0"


class FusedMatvecOps(Backend):
    _manifest_names: set[str]
    _split_counters: int = 0

    def split_counters(self) -> int:
        """The ticket words of `matvec_split_add` (zero between launches; one stream runs
        them in turn, so every launch shares them): allocated and zeroed on first use, which is
        an eager step (a decode graph is recorded after one)."""
        if not self._split_counters:
            if getattr(self, "capturing", False):
                raise UkgpuError("split-K counters first needed while recording a graph")
            self._split_counters = self.upload(np.zeros(SPLIT_K_COUNTERS, np.int32), "split-k")
        return self._split_counters

    def _fused_entry(self, kind: str, qtype: str, rows: int) -> str | None:
        if rows > MATVEC_MAX_ROWS:
            if os.environ.get("UKGPU_FUSED_GEMM", "1") == "0":
                return None
            name = fused_gemm_entry("qkv" if kind == "norm" else kind, qtype)
        else:
            name = fused_matvec_entry(kind, qtype, rows)
        return name if name in self._manifest_names else None

    def norm_matmuls(self, x: DeviceBuffer, norm: DeviceWeight, eps: float,
                     mats: Sequence[tuple[DeviceWeight, DeviceWeight | None]]) -> list[DeviceBuffer]:
        """Consecutive weights of one type (and all with or all without a bias) share one
        `matvec_qkv` / `gemm_qkv` launch, up to three; a lone weight takes `matvec_norm` (rows
        <= 8) or `gemm_qkv` with one weight."""
        groups: list[list[tuple[DeviceWeight, DeviceWeight | None]]] = []
        for w, b in mats:
            last = groups[-1] if groups else None
            if last and len(last) < 3 and last[0][0].qtype == w.qtype and (last[0][1] is None) == (b is None):
                last.append((w, b))
            else:
                groups.append([(w, b)])
        rows, gemm = x.shape[0], x.shape[0] > MATVEC_MAX_ROWS
        names = [self._fused_entry("norm" if len(g) == 1 else "qkv", g[0][0].qtype, rows) for g in groups]
        if None in names:
            return super().norm_matmuls(x, norm, eps, mats)
        if len(mats) == 1 and mats[0][1] is None and normed_input(mats[0][0].shape[0], rows):
            return super().norm_matmuls(x, norm, eps, mats)  # rmsnorm once, then the mat-vec
        out: list[DeviceBuffer] = []
        for name, group in zip(names, groups):
            ys = [self.new((rows, w.shape[0])) for w, _ in group]
            common = dict(x=x.ptr, g=norm.vec, K=group[0][0].shape[1], eps=eps)
            has_bias = int(group[0][1] is not None)
            if len(group) == 1 and not gemm:
                (w, bias), (y,) = group[0], ys
                self.launch(name, **w.planes, **common, bias=bias.vec if has_bias else 0, y=y.ptr,
                            N=w.shape[0], flag=has_bias, B=rows)
            else:
                self.launch(name, **_qkv_args(group, ys), **common, has_bias=has_bias,
                            **({"M": rows} if gemm else {"B": rows}))
            out += ys
        return out

    def norm_glu(self, x: DeviceBuffer, norm: DeviceWeight, eps: float, w_gate: DeviceWeight,
                 w_up: DeviceWeight, act: str) -> DeviceBuffer:
        rows = x.shape[0]
        name = self._fused_entry("glu", w_gate.qtype, rows)
        if name is None or w_up.qtype != w_gate.qtype:
            return super().norm_glu(x, norm, eps, w_gate, w_up, act)
        y = self.new((rows, w_gate.shape[0]))
        up = {f"u_{p[2:]}": ptr for p, ptr in w_up.planes.items()}
        common = dict(x=x.ptr, g=norm.vec, y=y.ptr, N=w_gate.shape[0], K=w_gate.shape[1], eps=eps,
                      flag=int(act == "gelu"))
        if rows > MATVEC_MAX_ROWS:
            self.launch(name, **w_gate.planes, **up, **common, M=rows)
        else:
            self.launch(name, **w_gate.planes, **up, **common, bias=0, B=rows)
        return y

    def matmul_add(self, x: DeviceBuffer, a: DeviceBuffer, weight: DeviceWeight) -> DeviceBuffer:
        rows = a.shape[0]
        name = self._fused_entry("add", weight.qtype, rows)
        if name is None:
            return super().matmul_add(x, a, weight)
        (n, k), split = weight.shape, split_add_entry(weight.qtype)
        if rows > MATVEC_MAX_ROWS:
            self.launch(name, **weight.planes, x=a.ptr, y=x.ptr, M=rows, N=n, K=k)
            return x
        splits = split_k(n, k) if rows == 1 and split in self._manifest_names else 1
        if splits > 1:
            part = self.new((splits, n))
            self.launch(split, **weight.planes, x=a.ptr, y=x.ptr, part=part.ptr,
                        count=self.split_counters(), N=n, K=k, splits=splits)
            return x
        self.launch(name, **weight.planes, x=a.ptr, g=0, bias=0, y=x.ptr, N=n, K=k, B=rows, eps=0.0,
                    flag=0)
        return x


def _qkv_args(group: Sequence[tuple[DeviceWeight, DeviceWeight | None]], ys: list[DeviceBuffer]
              ) -> dict[str, Any]:
    """The w_/u_/v_ planes, bias_i, y_i and N_i of up to three weights of one type (an absent
    one: null pointers and N_i = 0)."""
    args: dict[str, Any] = {}
    for i, pre in enumerate("wuv"):
        w, bias = group[i] if i < len(group) else (None, None)
        args |= {f"{pre}_{p[2:]}": w.planes[p] if w else 0 for p in group[0][0].planes}
        args |= {f"bias{i}": bias.vec if bias is not None else 0,
                 f"y{i}": ys[i].ptr if w else 0, f"N{i}": w.shape[0] if w else 0}
    return args
