"""numpy emulation of `rope_kv_*` (ptx_kernels/rope_kv.py) for the stand-in driver: per-head
norms (has_norm), rope of q in place and of k, k and v stored as float16 cache rows."""

from __future__ import annotations

import numpy as np

from ukgpu.ptx_kernels import reference as ref

from .cuda_kernels import EmulationError, Mem


def rope_kv(mem: Mem, e: dict, a: dict, grid: tuple) -> None:
    t, hq, hkv, hd, n_rot = grid[0], a["Hq"], a["Hkv"], a["head_dim"], a["n_rot"]
    if grid[1] != hq + hkv or not 2 <= n_rot <= hd <= e["constexprs"]["D"] or n_rot % 2:
        raise EmulationError(f"{e['name']}: grid {grid}, head_dim {hd}, n_rot {n_rot} break its limits")
    q = mem.view(a["q"], np.float32, t * hq * hd).reshape(t, hq, hd)
    k = mem.view(a["k"], np.float32, t * hkv * hd).reshape(t, hkv, hd)
    v = mem.view(a["v"], np.float32, t * hkv * hd).reshape(t, hkv, hd)
    pos, rows = mem.view(a["pos"], np.int32, t).copy(), mem.view(a["rows"], np.int32, t).copy()
    if (pos < 0).any() or (rows < 0).any():
        raise EmulationError(f"{e['name']}: negative position or cache row {pos} {rows}")
    norms = (mem.view(a["q_norm"], np.float32, hd), mem.view(a["k_norm"], np.float32, hd)) \
        if a["has_norm"] else (None, None)
    freqs = mem.view(a["freqs"], np.float64, n_rot // 2).copy()
    rq, rk, _ = ref.rope_kv(q, k, v, pos, freqs, bool(e["constexprs"]["NEOX"]), n_rot, a["mscale"],
                            *norms, eps=a["eps"])
    q[:] = rq
    for i in range(t):
        at = int(rows[i]) * hkv * hd * 2
        mem.view(a["k_cache"] + at, np.float16, hkv * hd)[:] = rk[i].reshape(-1).astype(np.float16)
        mem.view(a["v_cache"] + at, np.float16, hkv * hd)[:] = v[i].reshape(-1).astype(np.float16)


EMULATORS = {"rope_kv": rope_kv}
