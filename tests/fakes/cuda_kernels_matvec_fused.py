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


def matvec_split_add(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    """y += x @ W.T from per-split float32 partials added in split order (as the kernel); the
    ticket words must be zero on entry (the host's contract) and are left zero."""
    n, k, splits = a["N"], a["K"], a["splits"]
    if not 1 <= splits <= 8:
        raise EmulationError(f"{e['name']}: splits={splits} outside 1..8")
    count = mem.view(a["count"], np.int32, -(-n // e["constexprs"]["BLOCK_N"]))
    if count.any():
        raise EmulationError(f"{e['name']}: ticket counters not zero at launch")
    x = mem.view(a["x"], np.float32, k)
    w = _weight(mem, a, e["qtype"], n, k)
    blocks = -(-k // 256)
    chunk = -(-blocks // splits) * 256  # cdiv(cdiv(K, 256), splits) whole 256-column blocks
    part = mem.view(a["part"], np.float32, splits * n).reshape(splits, n)
    for s in range(splits):
        lo, hi = s * chunk, min(k, (s + 1) * chunk)
        part[s] = (w[:, lo:hi] @ x[lo:hi]) if lo < hi else 0
    y = mem.view(a["y"], np.float32, n)
    total = np.zeros(n, np.float32)
    for s in range(splits):
        total += part[s]
    y[:] = y + total


EMULATORS = {"matvec_norm": matvec_norm, "matvec_qkv": matvec_qkv, "matvec_glu": matvec_glu, "matvec_add": matvec_add,
             "matvec_split_add": matvec_split_add}
