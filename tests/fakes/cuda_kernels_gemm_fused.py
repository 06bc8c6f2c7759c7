"""numpy emulation of the fused prefill GEMMs (ptx_kernels/gemm_fused.py) for the stand-in
driver: the K loop of `gemm_<q>` (x*g scaled by powers of two and rounded to float16, the W tile
rounded to float16, float32 accumulation: `cuda_kernels._gemm_f16`), the norm applied as
(x*g) @ W.T * inv_rms with the sum of squares in float32, then the kernels' epilogues."""

from __future__ import annotations

import numpy as np

from ukgpu.ptx_kernels import reference as ref

from .cuda_kernels import EmulationError, Mem, _gemm_f16, _weight


def _x(mem: Mem, e: dict, a: dict) -> np.ndarray:
    m, k = a["M"], a["K"]
    if m < 1:
        raise EmulationError(f"{e['name']}: M={m}")
    return mem.view(a["x"], np.float32, m * k).reshape(m, k)


def _product(mem: Mem, e: dict, planes: dict, x: np.ndarray, n: int) -> np.ndarray:
    c = e["constexprs"]
    w16 = _weight(mem, planes, e["qtype"], n, x.shape[1], f16=True)
    return _gemm_f16(x, w16, c["X_EXP_SHIFT"], c["BLOCK_K"])


def _norm(mem: Mem, a: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x * g, 1 / rms of each row): what the kernels' loop multiplies and the epilogue scales by."""
    g = mem.view(a["g"], np.float32, x.shape[1])
    inv = 1.0 / np.sqrt((x * x).sum(-1, dtype=np.float32, keepdims=True) / np.float32(x.shape[1])
                        + np.float32(a["eps"]))
    return x * g, inv.astype(np.float32)


def _planes_of(a: dict, prefix: str) -> dict:
    return {f"w_{p[2:]}": v for p, v in a.items() if p.startswith(f"{prefix}_")}


def gemm_qkv(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    xg, inv = _norm(mem, a, _x(mem, e, a))
    for i, pre in enumerate("wuv"):
        n = a[f"N{i}"]
        if n == 0:
            continue
        y = _product(mem, e, _planes_of(a, pre), xg, n) * inv
        if a["has_bias"]:
            y = y + mem.view(a[f"bias{i}"], np.float32, n)
        mem.view(a[f"y{i}"], np.float32, y.size)[:] = y.reshape(-1)


def gemm_glu(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    (xg, inv), n = _norm(mem, a, _x(mem, e, a)), a["N"]
    gate = _product(mem, e, _planes_of(a, "w"), xg, n) * inv
    up = _product(mem, e, _planes_of(a, "u"), xg, n) * inv
    y = (ref.geglu if a["flag"] else ref.swiglu)(gate, up)
    mem.view(a["y"], np.float32, gate.size)[:] = np.asarray(y, np.float32).reshape(-1)


def gemm_add(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    x, n = _x(mem, e, a), a["N"]
    y = mem.view(a["y"], np.float32, a["M"] * n)
    y[:] = y + _product(mem, e, a, x, n).reshape(-1)


EMULATORS = {"gemm_qkv": gemm_qkv, "gemm_glu": gemm_glu, "gemm_add": gemm_add}
