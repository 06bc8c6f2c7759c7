"""The CUDA backend's fused decode steps: `Backend.norm_matmuls`, `norm_glu` and `matmul_add`
as one kernel each (`ptx_kernels/matvec_fused.py`) for up to 8 rows (decode, batched decode);
prefill-sized inputs, weight types without a shipped fused entry, and a GLU whose two weights
differ in type take the plain ops (`Backend`'s defaults: rmsnorm, mat-vec or GEMM, ...).

A mixin of `CudaBackend`: it uses the backend's `new`, `launch` and `_manifest_names`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ukgpu.llama_core.backend import Backend
from ukgpu.ptx_kernels.loader import MATVEC_MAX_ROWS, fused_matvec_entry

DeviceBuffer = Any  # gpu.cuda.arena.DeviceBuffer
DeviceWeight = Any  # gpu.cuda.backend.DeviceWeight


class FusedMatvecOps(Backend):
    _manifest_names: set[str]

    def _fused_entry(self, kind: str, qtype: str, rows: int) -> str | None:
        if rows > MATVEC_MAX_ROWS:
            return None
        name = fused_matvec_entry(kind, qtype, rows)
        return name if name in self._manifest_names else None

    def norm_matmuls(self, x: DeviceBuffer, norm: DeviceWeight, eps: float,
                     mats: Sequence[tuple[DeviceWeight, DeviceWeight | None]]) -> list[DeviceBuffer]:
        """Consecutive weights of one type (and all with or all without a bias) share one
        `matvec_qkv` launch, up to three; a lone weight takes `matvec_norm`."""
        groups: list[list[tuple[DeviceWeight, DeviceWeight | None]]] = []
        for w, b in mats:
            last = groups[-1] if groups else None
            if last and len(last) < 3 and last[0][0].qtype == w.qtype and (last[0][1] is None) == (b is None):
                last.append((w, b))
            else:
                groups.append([(w, b)])
        names = [self._fused_entry("norm" if len(g) == 1 else "qkv", g[0][0].qtype, x.shape[0]) for g in groups]
        if None in names:
            return super().norm_matmuls(x, norm, eps, mats)
        out: list[DeviceBuffer] = []
        for name, group in zip(names, groups):
            ys = [self.new((x.shape[0], w.shape[0])) for w, _ in group]
            common = dict(x=x.ptr, g=norm.vec, K=group[0][0].shape[1], B=x.shape[0], eps=eps)
            has_bias = int(group[0][1] is not None)
            if len(group) == 1:
                (w, bias), (y,) = group[0], ys
                self.launch(name, **w.planes, **common, bias=bias.vec if has_bias else 0, y=y.ptr,
                            N=w.shape[0], flag=has_bias)
            else:
                args: dict[str, Any] = {"has_bias": has_bias}
                for i, pre in enumerate("wuv"):
                    w, bias = group[i] if i < len(group) else (None, None)
                    args |= {f"{pre}_{p[2:]}": w.planes[p] if w else 0 for p in group[0][0].planes}
                    args |= {f"bias{i}": bias.vec if bias is not None else 0,
                             f"y{i}": ys[i].ptr if w else 0, f"N{i}": w.shape[0] if w else 0}
                self.launch(name, **args, **common)
            out += ys
        return out

    def norm_glu(self, x: DeviceBuffer, norm: DeviceWeight, eps: float, w_gate: DeviceWeight,
                 w_up: DeviceWeight, act: str) -> DeviceBuffer:
        name = self._fused_entry("glu", w_gate.qtype, x.shape[0])
        if name is None or w_up.qtype != w_gate.qtype:
            return super().norm_glu(x, norm, eps, w_gate, w_up, act)
        y = self.new((x.shape[0], w_gate.shape[0]))
        up = {f"u_{p[2:]}": ptr for p, ptr in w_up.planes.items()}
        self.launch(name, **w_gate.planes, **up, x=x.ptr, g=norm.vec, bias=0, y=y.ptr,
                    N=w_gate.shape[0], K=w_gate.shape[1], B=x.shape[0], eps=eps,
                    flag=int(act == "gelu"))
        return y

    def matmul_add(self, x: DeviceBuffer, a: DeviceBuffer, weight: DeviceWeight) -> DeviceBuffer:
        name = self._fused_entry("add", weight.qtype, a.shape[0])
        if name is None:
            return super().matmul_add(x, a, weight)
        self.launch(name, **weight.planes, x=a.ptr, g=0, bias=0, y=x.ptr, N=weight.shape[0],
                    K=weight.shape[1], B=a.shape[0], eps=0.0, flag=0)
        return x
