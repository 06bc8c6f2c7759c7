"""numpy emulation of the fused decode mat-vecs (ptx_kernels/matvec_fused.py) for the stand-in
driver: float32 products and sums as the kernels compute them, the norm applied as
(x*g) @ W.T * inv_rms as the kernels do."""

from __future__ import annotations

import numpy as np

from ukgpu.ptx_kernels import reference as ref

from .cuda_kernels import EmulationError, Mem, _weight


def _rows(mem: Mem, e: dict, a: dict) -> tuple[int, int, int, np.ndarray]:
    b, n, k = a["B"], a["N"], a["K"]
    if not 1 <= b <= 8:
        raise EmulationError(f"{e['name']}: B={b} outside 1..8")
    return b, n, k, mem.view(a["x"], np.float32, b * k).reshape(b, k)


def _normed_dot(mem: Mem, e: dict, a: dict, planes: dict, x: np.ndarray, n: int, k: int) -> np.ndarray:
    g = mem.view(a["g"], np.float32, k)
    inv = (1.0 / np.sqrt((x.astype(np.float32) ** 2).mean(-1, keepdims=True) + np.float32(a["eps"])))
    return ((x * g) @ _weight(mem, planes, e["qtype"], n, k).T) * inv.astype(np.float32)


def matvec_norm(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    b, n, k, x = _rows(mem, e, a)
    y = _normed_dot(mem, e, a, a, x, n, k)
    if a["flag"]:
        y = y + mem.view(a["bias"], np.float32, n)
    mem.view(a["y"], np.float32, b * n)[:] = y.reshape(-1)


def matvec_qkv(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    b, k = a["B"], a["K"]
    if not 1 <= b <= 8:
        raise EmulationError(f"{e['name']}: B={b} outside 1..8")
    x = mem.view(a["x"], np.float32, b * k).reshape(b, k)
    for i, pre in enumerate("wuv"):
        n = a[f"N{i}"]
        if n == 0:
            continue
        planes = {f"w_{p[2:]}": v for p, v in a.items() if p.startswith(f"{pre}_")}
        y = _normed_dot(mem, e, a, planes, x, n, k)
        if a["has_bias"]:
            y = y + mem.view(a[f"bias{i}"], np.float32, n)
        mem.view(a[f"y{i}"], np.float32, b * n)[:] = y.reshape(-1)


def matvec_glu(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    b, n, k, x = _rows(mem, e, a)
    up_planes = {f"w_{p[2:]}": v for p, v in a.items() if p.startswith("u_")}
    gate = _normed_dot(mem, e, a, a, x, n, k)
    up = _normed_dot(mem, e, a, up_planes, x, n, k)
    y = (ref.geglu if a["flag"] else ref.swiglu)(gate, up)
    mem.view(a["y"], np.float32, b * n)[:] = np.asarray(y, np.float32).reshape(-1)


def matvec_add(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    b, n, k, x = _rows(mem, e, a)
    y = mem.view(a["y"], np.float32, b * n)
    y[:] = y + (x @ _weight(mem, a, e["qtype"], n, k).T).reshape(-1)


EMULATORS = {"matvec_norm": matvec_norm, "matvec_qkv": matvec_qkv, "matvec_glu": matvec_glu, "matvec_add": matvec_add}
