"""`ukgpu ptx check`: the committed artifacts are fresh, complete, assemble, and match the manifest.

Imports neither Triton nor CUDA: hashes, PTX text parsing and `ptxas` only (CI-safe, ~seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .loader import BUILD_DIR

PKG_DIR = Path(__file__).resolve().parent
EXPECTED_TARGETS = {"sm_80": False, "sm_90a": True}  # target -> ships a cubin
PTX_PARAM_TYPE = {"ptr": ".u64", "i32": ".u32", "fp32": ".f32"}
_ENTRY_RE = re.compile(r"\.visible\s+\.entry\s+(\w+)\s*\((.*?)\)", re.S)
_PARAM_RE = re.compile(r"\.param\s+(\.\w+)")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ptx_entry_params(ptx: str) -> tuple[str, list[str]]:
    """The first `.entry` of a PTX module -> (name, PTX types of its params in order)."""
    m = _ENTRY_RE.search(ptx)
    if not m:
        raise ValueError("no .visible .entry in the PTX")
    return m.group(1), _PARAM_RE.findall(m.group(2))


def _expected_ptx_type(ttype: str) -> str:
    return PTX_PARAM_TYPE["ptr" if ttype.startswith("*") else ttype]


def _header(ptx: str, key: str) -> str:
    m = re.search(rf"^\s*\.{key}\s+(\S+)", ptx, re.M)
    return m.group(1) if m else ""


def check_entry(target: str, man: dict, ent: dict, tdir: Path, wants_cubin: bool) -> list[str]:
    where = f"{target}/{ent['name']}"
    problems = []
    for rel, digest in ent["sources"].items():
        src = PKG_DIR / rel
        if not src.exists() or _sha(src) != digest:
            problems.append(f"{where}: stale: ptx_kernels/{rel} changed since the build "
                            "(run `ukgpu ptx build`)")
    arts = ent["artifacts"]
    if wants_cubin and "cubin" not in arts:
        problems.append(f"{where}: no cubin recorded")
    for kind, art in arts.items():
        path = tdir / art["file"]
        if not path.exists():
            problems.append(f"{where}: missing {kind} file {path.name}")
        elif _sha(path) != art["sha256"]:
            problems.append(f"{where}: {kind} sha256 differs from the manifest")
    ptx_path = tdir / arts.get("ptx", {}).get("file", "-")
    if not ptx_path.exists():
        return problems + ([] if "ptx" in arts else [f"{where}: no PTX recorded"])
    ptx = ptx_path.read_text()
    if _header(ptx, "version") != man["ptx_isa"] or _header(ptx, "target") != target:
        problems.append(f"{where}: PTX header .version {_header(ptx, 'version')} .target "
                        f"{_header(ptx, 'target')}, manifest says {man['ptx_isa']} {target}")
    try:
        name, ptx_types = ptx_entry_params(ptx)
    except ValueError as exc:
        return problems + [f"{where}: {exc}"]
    want = [_expected_ptx_type(p["type"]) for p in ent["params"]]
    if name != ent["kernel_name"]:
        problems.append(f"{where}: PTX entry is {name}, manifest says {ent['kernel_name']}")
    if ptx_types != want:
        problems.append(f"{where}: PTX params {ptx_types} != manifest params {want}")
    return problems


def find_ptxas() -> str | None:
    """`ptxas` on PATH (the CUDA toolkit), else the one bundled with Triton (found without
    importing Triton)."""
    on_path = shutil.which("ptxas")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("triton")
    for root in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(root) / "backends" / "nvidia" / "bin" / "ptxas"
        if bundled.is_file():
            return str(bundled)
    return None


def _ptxas(ptxas: str, target: str, ptx: Path) -> str | None:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as out:
        r = subprocess.run([ptxas, "-arch", target, str(ptx), "-o", out.name],
                           capture_output=True, text=True)
    if r.returncode:
        return f"{target}/{ptx.name}: ptxas -arch {target} failed: {r.stderr.strip()[:400]}"
    return None


def check_manifest(target: str, build_dir: Path, wants_cubin: bool) -> tuple[list[str], list]:
    tdir = build_dir / target
    path = tdir / "manifest.json"
    if not path.exists():
        return [f"{target}: no manifest at {path} (run `ukgpu ptx build`)"], []
    man = json.loads(path.read_text())
    problems = []
    for rel, key in (("generate.py", "generate.py"), ("catalog.py", "catalog.py")):
        if man["generator"].get(key) != _sha(PKG_DIR / rel):
            problems.append(f"{target}: stale: ptx_kernels/{rel} changed since the build")
    jobs = []
    for ent in man["entries"].values():
        problems += check_entry(target, man, ent, tdir, wants_cubin)
        if "ptx" in ent["artifacts"] and (tdir / ent["artifacts"]["ptx"]["file"]).exists():
            jobs.append((target, tdir / ent["artifacts"]["ptx"]["file"]))
    return problems, jobs


def check(build_dir: Path = BUILD_DIR, run_ptxas: bool = True) -> list[str]:
    """Every problem found, as one line each (empty list: all good)."""
    problems, jobs, names = [], [], {}
    for target, wants_cubin in EXPECTED_TARGETS.items():
        p, j = check_manifest(target, build_dir, wants_cubin)
        problems += p
        jobs += j
        mpath = build_dir / target / "manifest.json"
        if mpath.exists():
            names[target] = set(json.loads(mpath.read_text())["entries"])
    if len(names) == 2 and names["sm_80"] != names["sm_90a"]:
        problems.append(f"targets disagree on entries: {sorted(names['sm_80'] ^ names['sm_90a'])}")
    if run_ptxas:
        ptxas = find_ptxas()
        if ptxas is None:
            problems.append("ptxas not found: install the CUDA toolkit (ptxas on PATH) or "
                            "triton (pip install 'ukgpu[kernels]'), or pass --no-ptxas")
        else:
            with ThreadPoolExecutor(max_workers=2) as pool:
                problems += [r for r in pool.map(lambda a: _ptxas(ptxas, *a), jobs) if r]
    return problems
