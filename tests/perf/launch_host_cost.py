"""What one eager kernel launch costs the host, through cuda-python's real bindings, no GPU needed.

    .venv/bin/python tests/perf/launch_host_cost.py [--model smollm2-135m] [--rows 512] [--reps 5]

The script re-executes itself over the stand-in libcuda.so.1 (tests/cuda_stub, built into a
temporary folder), records one prefill pass of `--rows` prompt tokens on the CUDA backend (the
stand-in checks every launch, computes nothing), then switches the stand-in's `cuLaunchKernel`
to return at once (`ukgpu_stub_set_null_launch`) and times, per launch of that pass:

- `forward`: the whole prefill forward (Model, backend ops, buffer pool, the launcher, the
  bindings) divided by its launches; the wait for the logits and the two uploads go to the
  stand-in (~0.1 ms a forward here); `forward_without_launcher_ms` is the same forward with
  `KernelSet.launch` doing nothing (the model's and the backend's own Python);
- `KernelSet.launch`: the recorded launches replayed through the launcher (plan lookup, pointer
  checks, packing, the bindings' call);
- `cuLaunchKernel (values, types)`: the bindings alone with the argument tuples the launcher
  builds (cuda-python packs them into a parameter array each call);
- `cuLaunchKernel (packed)`: the bindings given an already packed `void**` array;
- `PackedParams.pack + cuLaunchKernel`: the launcher's own packing (one `struct.pack_into`)
  then the bindings (where the code measured has it);
- `PackedParams.pack + cuLaunchKernelEx (PDL)`: the same with the launch config the launcher
  makes once per plan for programmatic dependent launch (where the code measured has it).
  `KernelSet.launch` and `forward` launch that way when `pdl` says so (the stand-in is an sm_90
  device; `UKGPU_PDL=0` turns it off).

The real driver adds its own few microseconds a launch on top of every figure (not measured
here).  On a GPU the eager prefill takes max(device time, launches x host cost): these figures
say how many launches a prefill can afford (docs/benchmarks/cuda.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUB_DIR = ROOT / "tests" / "cuda_stub"


def _reexec() -> None:
    sys.path.insert(0, str(STUB_DIR))
    from libcuda_stub import build

    lib_dir = Path(tempfile.mkdtemp(prefix="ukgpu-stub-"))
    build(lib_dir)
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib_dir), UKGPU_CUDA_STUB=str(lib_dir),
               UKGPU_CUDA_STUB_EMULATE="0", UKGPU_CUDA_STUB_MEM_MIB="16384")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _us(seconds: float, count: int) -> float:
    return round(seconds / count * 1e6, 2)


def measure(model_name: str, rows: int, reps: int) -> dict:
    sys.path.insert(0, str(STUB_DIR))
    import numpy as np

    from ukgpu.gpu.cuda.select import create_backend
    from ukgpu.llama_core.gguf.file import open_gguf
    from ukgpu.llama_core.gguf.synthetic import build_synthetic
    from ukgpu.llama_core.model import Model

    import libcuda_stub

    libcuda_stub.install()
    lib = libcuda_stub._installed[0]
    gguf = open_gguf(build_synthetic(model_name))
    be = create_backend(gguf=gguf, n_ctx=rows + 16)
    model = Model(gguf, be)
    kv = model.new_kv(rows + 16)
    tokens = np.arange(1, rows + 1) % gguf.config.vocab_size
    recorded: list[tuple[str, dict]] = []
    launch = be.kernels.launch

    def record(name: str, values: dict, stream=None, sync=None) -> None:
        recorded.append((name, dict(values)))
        launch(name, values, stream, sync)

    be.kernels.launch = record
    model.forward(tokens, 0, kv, all_logits=False)  # checked by the stand-in, plans made
    be.kernels.launch = launch
    lib.ukgpu_stub_set_null_launch(1)
    try:
        return _timings(model, be, kv, tokens, recorded, reps) | {
            "model": model_name, "rows": rows, "launches": len(recorded),
            "launches_by_kind": _kinds(recorded)}
    finally:
        lib.ukgpu_stub_set_null_launch(0)


def _kinds(recorded: list) -> dict:
    out: dict[str, int] = {}
    for name, _ in recorded:
        kind = name.split("_")[0] + ("_" + name.split("_")[1] if name.startswith(("gemm_", "matvec_")) and
                                     name.split("_")[1] in ("qkv", "glu", "add", "norm") else "")
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def _packer_class():
    """The launcher's parameter packer, where the code measured has one."""
    try:
        from ukgpu.gpu.cuda.modules import PackedParams
    except ImportError:  # a build before the launcher packed its own parameters
        return None
    return PackedParams


def _timings(model, be, kv, tokens, recorded: list, reps: int) -> dict:
    PackedParams = _packer_class()  # noqa: N806 - the class, or None
    ks, n = be.kernels, len(recorded)
    forward, bare = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.forward(tokens, 0, kv, all_logits=False)
        forward.append(time.perf_counter() - t0)
    ks.launch = lambda name, values, stream=None, sync=None: None  # the forward without the launcher
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            model.forward(tokens, 0, kv, all_logits=False)
            bare.append(time.perf_counter() - t0)
    finally:
        del ks.launch  # the set's own method again
    replay, raw, packed, pack_then_launch, pack_then_ex = [], [], [], [], []
    make_config = getattr(ks, "_config", None)  # a build before PDL has none
    stream = be.ctx.stream
    calls = []
    for name, values in recorded:
        k = ks.kernel(name)
        plan = next(iter(k.plans.values()))
        args = tuple(0 if p.hidden else values.get(p.name, 0) for p in k.entry.params)
        types = tuple(p.ctype for p in k.entry.params)
        cargs = [t(v) for v, t in zip(args, types)]
        ptrs = (ctypes.c_void_p * len(cargs))(*[ctypes.addressof(c) for c in cargs])
        calls.append((k.function, plan, args, types, cargs, ptrs, PackedParams and PackedParams(k.entry),
                      make_config and make_config(plan, stream)))
    cu = be.cu
    for _ in range(reps):
        t0 = time.perf_counter()
        for name, values in recorded:
            ks.launch(name, values, stream, False)
        replay.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for fn, (grid, block, shared), args, types, _, _, _, _ in calls:
            cu.cuLaunchKernel(fn, *grid, *block, shared, stream, (args, types), 0)
        raw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for fn, (grid, block, shared), _, _, _, ptrs, _, _ in calls:
            cu.cuLaunchKernel(fn, *grid, *block, shared, stream, ctypes.addressof(ptrs), 0)
        packed.append(time.perf_counter() - t0)
        if PackedParams is not None:
            t0 = time.perf_counter()
            for fn, (grid, block, shared), args, _, _, _, packer, _ in calls:
                cu.cuLaunchKernel(fn, *grid, *block, shared, stream, packer.pack(args), 0)
            pack_then_launch.append(time.perf_counter() - t0)
        if make_config is not None:
            t0 = time.perf_counter()
            for fn, _, args, _, _, _, packer, cfg in calls:
                cu.cuLaunchKernelEx(cfg, fn, packer.pack(args), 0)
            pack_then_ex.append(time.perf_counter() - t0)
    med = statistics.median
    return {"us_per_launch": {"forward": _us(med(forward), n), "KernelSet.launch": _us(med(replay), n),
                              "cuLaunchKernel (values, types)": _us(med(raw), n),
                              "cuLaunchKernel (packed)": _us(med(packed), n)}
            | ({"PackedParams.pack + cuLaunchKernel": _us(med(pack_then_launch), n)} if pack_then_launch else {})
            | ({"PackedParams.pack + cuLaunchKernelEx (PDL)": _us(med(pack_then_ex), n)} if pack_then_ex else {}),
            "pdl": bool(getattr(ks, "pdl", False)),
            "forward_ms": round(med(forward) * 1e3, 3),
            "forward_without_launcher_ms": round(med(bare) * 1e3, 3)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not os.environ.get("UKGPU_CUDA_STUB"):
        _reexec()
    result = measure(args.model, args.rows, args.reps)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
