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


def target_constexprs(spec: KernelSpec, target: Target) -> dict:
    """The spec's constexprs as compiled for `target`: the PDL gate (pdl.py) is on where the
    target has `griddepcontrol` (sm_90 and newer)."""
    return {**spec.constexprs, "PDL": target.arch >= 90}


def _compile(spec: KernelSpec, target: Target):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_fn(spec)
    src = ASTSource(fn=fn, signature=spec.signature(fn.arg_names), constexprs=target_constexprs(spec, target),
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
    """The launcher does a plain launch, with the PDL attribute where the manifest's `pdl` says
    (not Triton's own `launch_pdl` option, which stays off): no clusters or cooperative launches."""
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
        "constexprs": target_constexprs(spec, target),
        "pdl": target_constexprs(spec, target)["PDL"],  # launch with the PDL attribute (pdl.py)
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


def build_target(target: Target, specs: list[KernelSpec], out_dir: Path,
                 keep: dict | None = None) -> dict:
    """Compile `specs` into out_dir; `keep`: entries of an earlier build carried over as they are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = dict(keep or {}) | {s.name: build_entry(s, target, out_dir) for s in specs}
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
        "entries": dict(sorted(entries.items())),
    }


def fresh_entries(specs: list[KernelSpec], out_dir: Path) -> dict:
    """The entries of out_dir's manifest that a rebuild would reproduce byte for byte: same
    sources, same generator and Triton, artifacts on disk with their recorded sha256.  Nothing
    when the manifest is missing or was made by another generate.py or Triton."""
    path = out_dir / "manifest.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    gen = old.get("generator", {})
    if gen.get("generate.py") != sha256_bytes((PKG_DIR / "generate.py").read_bytes()) \
            or gen.get("triton") != versions()["triton"]:
        return {}
    fresh = {}
    for spec in specs:
        ent = old["entries"].get(spec.name)
        if ent is None or ent["sources"] != source_hashes(spec):
            continue
        arts = ent["artifacts"].values()
        if all((out_dir / a["file"]).exists() and sha256_bytes((out_dir / a["file"]).read_bytes())
               == a["sha256"] for a in arts):
            fresh[spec.name] = ent
    return fresh


def build(out_root: Path = BUILD_DIR, only: list[str] | None = None, stale: bool = False
          ) -> dict[str, Path]:
    """Regenerate every artifact under out_root/<target>/ (old files there are removed).
    stale: compile only the entries whose sources changed since out_root's build (or that it
    lacks), keep the fresh ones, and drop what the catalog no longer has: the same bytes as a
    full build, in the time of the changed entries."""
    specs = [s for s in all_specs() if not only or s.name in only]
    written = {}
    with tempfile.TemporaryDirectory(prefix="ukgpu-triton-") as cache:
        prev = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DISABLE_LINE_INFO")}
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DISABLE_LINE_INFO="1")
        try:
            for target in TARGETS:
                out_dir = out_root / target.name
                keep = fresh_entries(specs, out_dir) if stale else {}
                if not stale:
                    shutil.rmtree(out_dir, ignore_errors=True)
                todo = [s for s in specs if s.name not in keep]
                print(f"{target.name}: compiling {len(todo)} entries, {len(keep)} fresh", flush=True)
                manifest = build_target(target, todo, out_dir, keep)
                if stale:  # files no entry names any more
                    named = {a["file"] for e in manifest["entries"].values() for a in e["artifacts"].values()}
                    for f in out_dir.iterdir():
                        if f.name != "manifest.json" and f.name not in named:
                            f.unlink()
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
