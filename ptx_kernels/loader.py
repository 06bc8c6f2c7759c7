"""Launch descriptions from a manifest alone (no CUDA, no Triton import: runs on any machine).

    m = Manifests.load()                       # build/sm_80 + build/sm_90a manifests
    art = m.select("matvec_q4_k_b1", (9, 0))   # exact cubin for sm_90a, else PTX
    launch = m.entry("matvec_q4_k_b1").launch({"w_q": dptr, ..., "N": 4096, "K": 4096, "B": 1})
    launch.grid, launch.block, launch.shared_bytes, launch.ctypes_args()

`launch` checks every limit and alignment the kernel was compiled for and appends the hidden
trailing scratch pointers (0: every shipped kernel has zero-sized scratch).

Two facts of the launch contract live here and nowhere else: `param_ctype` (the ctypes type
cuLaunchKernel takes for each manifest parameter type: pointers are 64-bit device addresses,
`i32` a 4-byte int, `fp32` a 4-byte float) and `STATIC_SHARED_LIMIT` (48 KiB: a kernel that
needs more dynamic shared memory must raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
which the generator records as `needs_opt_in_shared`).  The launcher, the generator and the
test doubles of the driver all import them.
"""

from __future__ import annotations

import ast
import ctypes
import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.ptx_kernels.spec import ATTN_HEAD_DIMS, ROPE_DIMS

BUILD_DIR = Path(__file__).resolve().parent / "build"
TARGETS = ("sm_90a", "sm_80")  # preference order when several fit
STATIC_SHARED_LIMIT = 48 * 1024  # bytes of shared memory a kernel gets without the opt-in
SCALAR_CTYPES = {"i32": ctypes.c_int32, "fp32": ctypes.c_float}  # pointers ("*...") are c_void_p


class KernelManifestError(UkgpuError):
    """The kernel manifest is missing, inconsistent, or a launch breaks a kernel's limits."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge}
_FUNCS = {"cdiv": lambda a, b: -(-a // b), "min": min, "max": max}


def param_ctype(type_: str) -> type:
    """The ctypes type cuLaunchKernel takes for a manifest parameter of Triton type `type_`."""
    if type_.startswith("*"):
        return ctypes.c_void_p
    if type_ not in SCALAR_CTYPES:
        raise KernelManifestError(f"parameter type {type_!r} has no launch type (known: *ptr, "
                                  f"{', '.join(SCALAR_CTYPES)}): extend SCALAR_CTYPES or the kernel")
    return SCALAR_CTYPES[type_]


def _eval(node: ast.AST, env: dict[str, int]):
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise KernelManifestError(f"size {node.id!r} is needed (pass it in the launch values)")
        return int(env[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.Compare):
        left, ok = _eval(node.left, env), True
        for op, right in zip(node.ops, node.comparators):
            r = _eval(right, env)
            ok = ok and _CMPOPS[type(op)](left, r)
            left = r
        return ok
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        return _FUNCS[node.func.id](*(_eval(a, env) for a in node.args))
    raise KernelManifestError(f"unsupported expression element {ast.dump(node)}")


def evaluate(expr: str, env: dict[str, int]):
    """Evaluate a grid or limit expression (ints, names, + - * // %, comparisons, cdiv/min/max)."""
    return _eval(ast.parse(expr, mode="eval"), env)


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # triton type: "*fp32", "i32", "fp32", ...
    hidden: bool
    divisibility: int  # 16 where the kernel was compiled assuming it (bytes for pointers)
    unused: bool

    @property
    def is_pointer(self) -> bool:
        return self.type.startswith("*")

    @property
    def ctype(self) -> type:
        return param_ctype(self.type)


@dataclass(frozen=True)
class Launch:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    args: tuple[tuple[str, int | float], ...]  # (triton type, value) in parameter order

    def ctypes_args(self) -> tuple[tuple, tuple]:
        """(values, ctypes types) as cuda-python's cuLaunchKernel takes `kernelParams`."""
        return tuple(v for _, v in self.args), tuple(param_ctype(t) for t, _ in self.args)


@dataclass(frozen=True)
class Artifact:
    target: str  # "sm_90a" | "sm_80"
    kind: str  # "cubin" | "ptx"
    path: Path


class Entry:
    """One kernel configuration as a manifest records it."""

    def __init__(self, data: dict, build_dir: Path):
        self.data = data
        self.name: str = data["name"]
        self.kernel_name: str = data["kernel_name"]
        self.params = tuple(Param(p["name"], p["type"], p["hidden"], p["divisibility"], p["unused"])
                            for p in data["params"])
        self.block = (data["threads_per_block"], 1, 1)
        self.shared_bytes: int = data["shared_bytes"]
        self.grid_exprs: list[str] = data["grid"]
        self.limits: list[str] = data["limits"]
        self.constexprs: dict = data["constexprs"]
        # compiled with the PDL gate (ptx_kernels/pdl.py): may be launched with the attribute
        self.pdl: bool = bool(data.get("pdl", False))
        self.build_dir = build_dir

    def grid(self, values: dict) -> tuple[int, int, int]:
        g = tuple(evaluate(e, values) for e in self.grid_exprs)
        if min(g) < 1:
            raise KernelManifestError(f"{self.name}: empty grid {g} for {values}")
        return g  # type: ignore[return-value]

    def check(self, values: dict) -> None:
        bad = [lim for lim in self.limits if not evaluate(lim, values)]
        for p in self.params:
            if not p.hidden and p.divisibility and values.get(p.name, 0) % p.divisibility:
                bad.append(f"{p.name} % {p.divisibility} == 0 (got {values[p.name]})")
        if bad:
            raise KernelManifestError(f"{self.name}: launch breaks the kernel's limits: {'; '.join(bad)}")

    def launch(self, values: dict) -> Launch:
        """values: every visible param by name (device pointers as ints) plus grid-only sizes."""
        missing = [p.name for p in self.params if not p.hidden and p.name not in values and not p.unused]
        if missing:
            raise KernelManifestError(f"{self.name}: missing launch values {missing}")
        self.check(values)
        args = tuple((p.type, 0 if p.hidden else values.get(p.name, 0)) for p in self.params)
        return Launch(self.grid(values), self.block, self.shared_bytes, args)


class Manifests:
    """The per-target manifests of one build directory."""

    def __init__(self, per_target: dict[str, dict], build_dir: Path):
        self.per_target = per_target
        self.build_dir = build_dir

    @classmethod
    def load(cls, build_dir: Path | str | None = None) -> Manifests:
        """The manifests of build_dir, else of $UKGPU_KERNELS_DIR (another build of the same
        entries, e.g. a tuning variant), else of the build shipped with the package."""
        build_dir = Path(build_dir or os.environ.get("UKGPU_KERNELS_DIR") or BUILD_DIR)
        found = {}
        for target in TARGETS:
            path = build_dir / target / "manifest.json"
            if path.exists():
                found[target] = json.loads(path.read_text())
        if not found:
            raise KernelManifestError(f"no manifest under {build_dir}: run `ukgpu ptx build`")
        return cls(found, build_dir)

    def names(self) -> list[str]:
        return sorted({e for m in self.per_target.values() for e in m["entries"]})

    def entry(self, name: str, target: str | None = None) -> Entry:
        for t in ([target] if target else list(self.per_target)):
            entries = self.per_target.get(t, {}).get("entries", {})
            if name in entries:
                return Entry(entries[name], self.build_dir / t)
        raise KernelManifestError(f"no kernel entry {name!r}; known: {', '.join(self.names()[:8])}...")

    def select(self, name: str, cc: tuple[int, int]) -> Artifact:
        """Exact cubin for the device's compute capability, else PTX the driver can JIT."""
        return self.candidates(name, cc)[0]

    def candidates(self, name: str, cc: tuple[int, int]) -> list[Artifact]:
        """Every artifact of `name` that can run on `cc`, best first: the exact cubin, then the
        PTX of the arch-specific target ("sm_90a"), then portable PTX ("sm_80")."""
        options = []
        for target, man in self.per_target.items():
            ent = man["entries"].get(name)
            if ent is None:
                continue
            arch = man["arch"]  # e.g. [9, 0]
            arts = ent["artifacts"]
            if "cubin" in arts and tuple(arch) == tuple(cc):
                options.append((0, target, "cubin", arts["cubin"]["file"]))
            if "ptx" in arts and _ptx_runs_on(target, tuple(arch), tuple(cc)):
                options.append((1 if target.endswith("a") else 2, target, "ptx", arts["ptx"]["file"]))
        if not options:
            raise KernelManifestError(
                f"no artifact of {name!r} runs on compute capability {cc[0]}.{cc[1]}: "
                f"builds exist for {', '.join(self.per_target)} (needs sm_80 or newer)")
        return [Artifact(target, kind, self.build_dir / target / file)
                for _, target, kind, file in sorted(options)]


MATVEC_MAX_ROWS = 8  # the mat-vec kernels' largest batch (`b8`); more rows take the GEMM


def matvec_entry(qtype: str, batch: int) -> str:
    """Mat-vec entry for a weight type and decode batch (1..8)."""
    if not 1 <= batch <= MATVEC_MAX_ROWS:
        raise KernelManifestError(f"mat-vec batch must be 1..8, got {batch}: use the GEMM entry")
    return f"matvec_{qtype.lower()}_{'b1' if batch == 1 else 'b8'}"


def fused_matvec_entry(kind: str, qtype: str, batch: int) -> str:
    """Fused decode mat-vec entry (`matvec_fused.py`): kind "norm" | "qkv" | "glu" | "add"."""
    return f"matvec_{kind}_{matvec_entry(qtype, batch)[len('matvec_'):]}"


def fused_gemm_entry(kind: str, qtype: str) -> str:
    """Fused prefill GEMM entry (`gemm_fused.py`): kind "qkv" (also a lone normed weight) |
    "glu" | "add"."""
    return f"gemm_{kind}_{qtype.lower()}"


def split_add_entry(qtype: str) -> str:
    """The one-row split-K residual mat-vec (`matvec_split.py`)."""
    return f"matvec_split_add_{qtype.lower()}_b1"


def rope_kv_entry(neox: bool, head_dim: int) -> str:
    """The fused norm/rope/cache-store entry (`rope_kv.py`) for heads of head_dim dims."""
    d = next((d for d in ROPE_DIMS if head_dim <= d), None)
    if d is None:
        raise KernelManifestError(f"no rope_kv kernel for {head_dim}-dim heads (sizes {ROPE_DIMS})")
    return f"rope_kv_{'neox' if neox else 'norm'}_d{d}"


def gemm_entry(qtype: str) -> str:
    return f"gemm_{qtype.lower()}"


def embedding_entry(qtype: str) -> str:
    return f"embedding_{qtype.lower()}"


def rope_entry(neox: bool, n_rot: int) -> str:
    """The rope entry that rotates n_rot dims of a head: the smallest compiled size >= n_rot."""
    fits = [d for d in ROPE_DIMS if n_rot <= d]
    if n_rot < 2 or n_rot % 2 or not fits:
        raise KernelManifestError(f"no rope kernel rotates {n_rot} dims (even, 2..{ROPE_DIMS[-1]})")
    return f"rope_{'neox' if neox else 'norm'}_d{fits[0]}"


def attention_entries(head_dim: int) -> dict[str, str]:
    """{"prefill", "decode", "combine"} entry names for a head size (one of ATTN_HEAD_DIMS)."""
    if head_dim not in ATTN_HEAD_DIMS:
        raise KernelManifestError(f"no attention kernels for head_dim {head_dim} "
                                  f"(compiled: {', '.join(map(str, ATTN_HEAD_DIMS))})")
    return {k: f"attn_{k}_d{head_dim}" for k in ("prefill", "decode", "combine")}


def fused_decode_entry(neox: bool, head_dim: int) -> str:
    """attn_decode_rope_<norm|neox>_d<head_dim>: norm, rope, KV store and split-K decode in one
    launch (then attention_entries(head_dim)["combine"])."""
    attention_entries(head_dim)  # the same head sizes
    return f"attn_decode_rope_{'neox' if neox else 'norm'}_d{head_dim}"


def argmax_split(vocab: int) -> tuple[int, int]:
    """(span, parts) of argmax_part_f32 for rows of `vocab` logits: about 160 parts of a
    multiple of 1024 columns (151,936 -> 149 parts of 1024)."""
    span = 1024 * max(1, -(-vocab // (1024 * 160)))
    return span, -(-vocab // span)


def _ptx_runs_on(target: str, arch: tuple[int, int], cc: tuple[int, int]) -> bool:
    """Arch-specific ("a") PTX runs only on its exact arch; plain PTX on that arch or newer."""
    return cc == arch if target.endswith("a") else cc >= arch
