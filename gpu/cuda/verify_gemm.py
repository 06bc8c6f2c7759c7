"""`ukgpu verify`'s checks of the fused prefill GEMMs (`ptx_kernels/gemm_fused.py`), every
shipped weight type: normed q/k/v with biases in one launch, one normed weight without a bias,
the SiLU GLU of two weights and the residual add, 70 rows (two row tiles, the second ragged)
against the float64 references, at the f16-operand GEMM bound."""

from __future__ import annotations

import numpy as np

from ukgpu.gpu.cuda.verify_checks import Check, Device, bound, nmse_check, weight_args
from ukgpu.ptx_kernels import reference as ref
from ukgpu.ptx_kernels.loader import fused_gemm_entry
from ukgpu.ptx_kernels.repack import FORMATS

ROWS, N, K, EPS = 70, 200, 512, 1e-6


def check_fused_gemm(dev: Device, rng: np.random.Generator) -> list[Check]:
    shipped, checks = set(dev.kernels.manifests.names()), []
    for qtype in [q for q in FORMATS if fused_gemm_entry("qkv", q) in shipped]:
        ws = [ref.random_repacked(qtype, N, K, rng) for _ in range(3)]
        args = [weight_args(dev, w) for w in ws]
        planes = {f"{pre}_{p[2:]}": ptr for pre, a in zip("wuv", args) for p, ptr in a.items()}
        x = (rng.standard_normal((ROWS, K)) * 3).astype(np.float32)
        g = rng.uniform(0.5, 1.5, K).astype(np.float32)
        biases = [rng.standard_normal(N).astype(np.float32) for _ in range(3)]
        resid = rng.standard_normal((ROWS, N)).astype(np.float32)
        xp, gp = dev.put(x), dev.put(g)
        name = fused_gemm_entry("qkv", qtype)
        ys = [dev.poisoned(ROWS * N) for _ in range(3)]
        dev.run(name, **planes, x=xp, g=gp, **{f"bias{i}": dev.put(b) for i, b in enumerate(biases)},
                y0=ys[0], y1=ys[1], y2=ys[2], M=ROWS, N0=N, N1=N, N2=N, K=K, eps=EPS, has_bias=1)
        got = np.concatenate([dev.get(y, (ROWS, N), np.float32) for y in ys])
        checks.append(nmse_check("kernel", name, got, np.concatenate(ref.matvec_qkv(ws, x, g, EPS, biases)),
                                 bound(name)))
        y = dev.poisoned(ROWS * N)
        dev.run(name, **planes, x=xp, g=gp, bias0=0, bias1=0, bias2=0, y0=y, y1=0, y2=0, M=ROWS, N0=N,
                N1=0, N2=0, K=K, eps=EPS, has_bias=0)
        checks.append(nmse_check("kernel", f"{name} one weight", dev.get(y, (ROWS, N), np.float32),
                                 ref.matvec_norm(ws[0], x, g, EPS), bound(name)))
        glu, add = fused_gemm_entry("glu", qtype), fused_gemm_entry("add", qtype)
        if glu in shipped:
            y = dev.poisoned(ROWS * N)
            up = {k: v for k, v in planes.items() if k[0] in "wu"}
            dev.run(glu, **up, x=xp, g=gp, y=y, M=ROWS, N=N, K=K, eps=EPS, flag=0)
            with np.errstate(over="ignore"):  # exp(-gate) of a large negative gate: SiLU -> 0
                want = ref.matvec_glu(ws[0], ws[1], x, g, EPS, 0)
            checks.append(nmse_check("kernel", glu, dev.get(y, (ROWS, N), np.float32), want, bound(glu)))
        if add in shipped:
            y = dev.put(resid)
            dev.run(add, **args[0], x=xp, y=y, M=ROWS, N=N, K=K)
            checks.append(nmse_check("kernel", add, dev.get(y, (ROWS, N), np.float32),
                                     ref.matvec_add(ws[0], x, resid), bound(add)))
    return checks
