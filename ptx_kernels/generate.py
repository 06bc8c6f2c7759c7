"""Compile every kernel spec ahead of time, with no GPU, into build/<target>/ + manifest.json.

Targets: sm_80 (PTX only, the portable fallback the driver JITs) and sm_90a (PTX + cubin for
H100/H200).  PTX ISA is pinned to 8.0 (accepted by CUDA 12.0+ drivers, 580 included); line info
is off and the Triton cache is a fresh temporary directory, so the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .catalog import all_specs, kernel_fn
from .loader import STATIC_SHARED_LIMIT
from .spec import POINTEE, KernelSpec

PKG_DIR = Path(__file__).resolve().parent
BUILD_DIR = PKG_DIR / "build"
PTX_VERSION = 80  # PTX ISA 8.0


@dataclass(frozen=True)
class Target:
    name: str
    arch: int  # compute capability major*10 + minor
    cubin: bool


TARGETS = (Target("sm_80", 80, False), Target("sm_90a", 90, True))
HIDDEN_PARAMS = (("global_scratch", "*i8"), ("profile_scratch", "*i8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_hashes(spec: KernelSpec) -> dict[str, str]:
    """sha256 of the family file and every module it depends on (paths relative to the package)."""
    files = (spec.family,) + spec.deps
    return {f"{f}.py": sha256_bytes((PKG_DIR / f"{f}.py").read_bytes()) for f in sorted(set(files))}


def _compile(spec: KernelSpec, target: Target):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_fn(spec)
    src = ASTSource(fn=fn, signature=spec.signature(fn.arg_names), constexprs=spec.constexprs,
                    attrs=spec.attrs())
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages,
               "ptx_version": PTX_VERSION, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", target.arch, 32), options=options)


def _params(spec: KernelSpec, md) -> list[dict]:
    out = [{"name": n, "type": t, "hidden": False, "divisibility": 16 if n in spec.aligned else 0,
            "unused": n in spec.unused, "pointee": POINTEE.get(t, "")} for n, t in spec.params]
    sizes = {"global_scratch": md.global_scratch_size, "profile_scratch": md.profile_scratch_size}
    for n, t in HIDDEN_PARAMS:
        if sizes[n]:
            raise RuntimeError(f"{spec.name}: {n} of {sizes[n]} bytes is not supported by the launcher")
        out.append({"name": n, "type": t, "hidden": True, "divisibility": 0, "unused": True,
                    "pointee": "int8", "bytes": sizes[n], "pass": "0 (size 0)"})
    return out


def _plain_launch(spec: KernelSpec, md) -> None:
    """The launcher does a plain cuLaunchKernel: no clusters, cooperative or PDL launches."""
    special = {"num_ctas": md.num_ctas != 1, "launch_cooperative_grid": md.launch_cooperative_grid,
               "launch_pdl": md.launch_pdl, "tmem_size": getattr(md, "tmem_size", 0)}
    bad = [k for k, v in special.items() if v]
    if bad:
        raise RuntimeError(f"{spec.name}: compiled kernel needs {bad}, which the launcher lacks")


def build_entry(spec: KernelSpec, target: Target, out_dir: Path) -> dict:
    kernel = _compile(spec, target)
    md = kernel.metadata
    _plain_launch(spec, md)
    artifacts = {}
    files = {"ptx": kernel.asm["ptx"].encode()}
    if target.cubin:
        files["cubin"] = kernel.asm["cubin"]
    for kind, data in files.items():
        fname = f"{spec.name}.{kind}"
        (out_dir / fname).write_bytes(data)
        artifacts[kind] = {"file": fname, "sha256": sha256_bytes(data), "bytes": len(data)}
    return {
        "name": spec.name,
        "kernel_name": md.name,
        "family": spec.family,
        "target": target.name,
        "ptx_isa": f"{PTX_VERSION // 10}.{PTX_VERSION % 10}",
        "doc": spec.doc,
        "qtype": spec.qtype,
        "params": _params(spec, md),
        "num_warps": md.num_warps,
        "threads_per_block": md.num_warps * 32,
        "cluster_dims": [1, 1, 1],
        "num_stages": spec.num_stages,
        "shared_bytes": md.shared,
        "needs_opt_in_shared": md.shared > STATIC_SHARED_LIMIT,
        "constexprs": spec.constexprs,
        "grid": list(spec.grid),
        "sizes": spec.sizes,
        "limits": list(spec.limits),
        "reference": f"ptx_kernels/reference.py:{spec.reference.split('.')[-1]}",
        "sources": source_hashes(spec),
        "artifacts": artifacts,
    }


def versions() -> dict:
    import triton
    from triton import knobs

    return {"triton": triton.__version__, "python": platform.python_version(),
            "cubin_ptxas": f"CUDA {knobs.nvidia.ptxas.version} (bundled with triton)"}


def build_target(target: Target, specs: list[KernelSpec], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = {s.name: build_entry(s, target, out_dir) for s in specs}
    return {
        "format": 1,
        "target": target.name,
        "arch": [target.arch // 10, target.arch % 10],
        "ptx_isa": f"{PTX_VERSION // 10}.{PTX_VERSION % 10}",
        "generator": versions() | {f: sha256_bytes((PKG_DIR / f).read_bytes())
                                   for f in ("generate.py", "catalog.py")},
        "launch_notes": "args in `params` order; pointers are 64-bit device addresses; hidden "
                        "trailing params get 0; shared memory is all dynamic: pass shared_bytes "
                        "and set MAX_DYNAMIC_SHARED_SIZE_BYTES when it exceeds 48 KiB",
        "entries": entries,
    }


def build(out_root: Path = BUILD_DIR, only: list[str] | None = None) -> dict[str, Path]:
    """Regenerate every artifact under out_root/<target>/ (old files there are removed)."""
    specs = [s for s in all_specs() if not only or s.name in only]
    written = {}
    with tempfile.TemporaryDirectory(prefix="ukgpu-triton-") as cache:
        prev = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DISABLE_LINE_INFO")}
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DISABLE_LINE_INFO="1")
        try:
            for target in TARGETS:
                out_dir = out_root / target.name
                shutil.rmtree(out_dir, ignore_errors=True)
                manifest = build_target(target, specs, out_dir)
                path = out_dir / "manifest.json"
                path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                written[target.name] = path
        finally:
            for k, v in prev.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return written
