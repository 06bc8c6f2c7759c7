"""Interpreter mode for the kernel tests: TRITON_INTERPRET must be set before triton is imported,
so it is set here, at collection of this folder, and checked.

`run_spec(name, arrays, values)` launches one shipped configuration exactly as the manifest will
describe it (same constexprs, same grid expressions, limits asserted) on CPU torch tensors.
"""

import os
import sys
import zlib

os.environ["TRITON_INTERPRET"] = "1"

if "ukgpu.ptx_kernels.matvec" in sys.modules:  # a kernel module was imported compiled-mode first
    raise RuntimeError("run tests/unit/ptx in its own pytest process: kernels were imported "
                       "before TRITON_INTERPRET=1 could be set")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ukgpu.ptx_kernels.catalog import all_specs, kernel_fn  # noqa: E402
from ukgpu.ptx_kernels.loader import evaluate  # noqa: E402
from ukgpu.ptx_kernels.repack import dequantize_repacked, get_format  # noqa: E402

SPECS = {s.name: s for s in all_specs()}


def run_spec(name: str, arrays: dict, values: dict, aliases: dict | None = None) -> dict:
    """arrays: pointer params (numpy; outputs are returned as numpy after the run);
    values: int/float params and grid sizes; aliases: param -> array name it shares memory with.
    Unused pointer params may be omitted."""
    spec = SPECS[name]
    for lim in spec.limits:
        assert evaluate(lim, values), f"test shape breaks {name} limit {lim}: {values}"
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    tensors.update({k: tensors[v] for k, v in (aliases or {}).items()})
    dummy = torch.zeros(1, dtype=torch.float32)
    args = []
    for pname, ptype in spec.params:
        if ptype.startswith("*"):
            assert pname in tensors or pname in spec.unused, f"{name}: array {pname} missing"
            args.append(tensors.get(pname, dummy))
        else:
            args.append(values[pname])
    grid = tuple(evaluate(e, values) for e in spec.grid)
    kernel_fn(spec)[grid](*args, **spec.constexprs)
    return {k: t.numpy() for k, t in tensors.items()}


def three_blocks(qtype: str) -> int:
    """K of three quant blocks (96 for the 32-element types): more than one K step of the fused
    kernels' loops, and a partial last one."""
    unit = max(get_format(qtype).block_elems, 32)
    return unit * 3 if unit == 256 else 96


def weight_arrays(w, prefix: str = "w") -> dict:
    """The launch arrays of a repacked weight: its planes as `<prefix>_q`, `_s`, `_m`."""
    return {f"{prefix}_{k}": v for k, v in w.planes().items()}


def abs_product(h, w):
    """|h| @ |W|.T in float64: the scale of each output's rounding error."""
    return np.abs(h).astype(np.float64) @ np.abs(dequantize_repacked(w)).astype(np.float64).T


def check_qkv(name: str, qtype: str, widths: tuple, x, g, eps: float, rel: float, sizes: dict, rng) -> None:
    """Launch q/k/v entry `name` (`matvec_qkv_*`, `gemm_qkv_*`) on random weights of `widths` rows
    (0: absent) with biases, over x (rows, K) and norm weight g, with the row count in `sizes`;
    each output within rel * (|h| @ |W|.T) + 1e-6 of `reference.matvec_qkv` (h the normed x), an
    absent weight's output never written."""
    from ukgpu.ptx_kernels import reference as R

    k = x.shape[1]
    ws = [R.random_repacked(qtype, max(n, 1), k, rng) for n in widths]
    biases = [rng.standard_normal(max(n, 1)).astype(np.float32) for n in widths]
    arrays = {"x": x, "g": g}
    for i, (pre, w) in enumerate(zip("wuv", ws)):
        arrays |= weight_arrays(w, pre) | {f"bias{i}": biases[i],
                                           f"y{i}": np.full((x.shape[0], max(widths[i], 1)), np.nan, np.float32)}
    values = {"N0": widths[0], "N1": widths[1], "N2": widths[2], "K": k, "eps": eps, "has_bias": 1} | sizes
    out = run_spec(name, arrays, values)
    want = R.matvec_qkv(ws, x, g, eps, biases)
    h = R.rmsnorm(x, g, eps)
    for i, n in enumerate(widths):
        if n == 0:
            assert np.isnan(out[f"y{i}"]).all()  # an absent weight's output is never written
            continue
        err = np.abs(out[f"y{i}"] - want[i])
        assert np.all(err <= rel * abs_product(h, ws[i]) + 1e-6), f"y{i} max err {np.nanmax(err)}"


SEED = int(os.environ.get("UKGPU_PTX_SEED", np.random.SeedSequence().entropy % 2**32))


@pytest.fixture
def rng(request):
    """Fresh inputs every session; a failure's captured output names the seed to replay it."""
    print(f"UKGPU_PTX_SEED={SEED} ({request.node.name})")
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])
