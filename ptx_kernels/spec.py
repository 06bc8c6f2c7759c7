"""`KernelSpec`: one shipped kernel configuration, as each family file declares it.

A spec names the Triton function, its runtime parameters in order (Triton types), the constexpr
configuration, warps/stages, the launch grid as expressions over named sizes, and the limits the
launcher must enforce (the compiled code assumes them: divisibility hints, no masking on some axes).
The generator compiles every spec; the manifest records all of it so a launcher needs nothing else.
Every kernel takes a last constexpr `PDL`, its programmatic-dependent-launch gate (pdl.py): a spec
gets it (False) and the dependency on pdl.py without saying so, and the generator sets it per target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Triton pointer/scalar types used by the kernels -> numpy dtype name of what the pointer points at.
POINTEE = {
    "*fp32": "float32",
    "*fp16": "float16",
    "*u8": "uint8",
    "*i8": "int8",
    "*i32": "int32",
    "*fp64": "float64",
}
SCALARS = {"i32": "int32", "fp32": "float32"}

# head sizes the per-head kernels are compiled for (the launcher picks from these, no Triton import)
ROPE_DIMS = (64, 128, 256)  # rope_*_d<D>: rotates n_rot <= D dims of a head
ATTN_HEAD_DIMS = (32, 64, 96, 128, 256)  # attn_*_d<D>: head_dim == D


@dataclass(frozen=True)
class KernelSpec:
    name: str  # manifest entry name, unique, e.g. "matvec_q4_k_b1"
    family: str  # module file under ptx_kernels/, e.g. "matvec"
    fn: str  # the @triton.jit function in that module
    params: tuple[tuple[str, str], ...]  # (name, triton type) in launch order
    constexprs: dict
    grid: tuple[str, str, str]  # expressions over `sizes` and int params
    sizes: dict[str, str]  # every name the grid/limits use that is not a param -> meaning
    limits: tuple[str, ...]  # boolean expressions that must hold at launch
    reference: str  # "ptx_kernels.reference.<fn>"
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple[str, ...] = ()  # params compiled with a divisible-by-16 hint
    unused: tuple[str, ...] = ()  # pointer params this configuration never reads (pass 0)
    doc: str = ""
    qtype: str = ""  # weight type for the weight-reading families, else ""
    deps: tuple[str, ...] = field(default=())  # other module files the kernel calls into

    def __post_init__(self):
        if "PDL" not in self.constexprs:  # last, as the kernels' last argument (pdl.py)
            object.__setattr__(self, "constexprs", {**self.constexprs, "PDL": False})
        if "pdl" not in self.deps:
            object.__setattr__(self, "deps", self.deps + ("pdl",))
        for pname, ptype in self.params:
            if ptype not in POINTEE and ptype not in SCALARS:
                raise ValueError(f"{self.name}: param {pname} has unsupported type {ptype}")

    def signature(self, arg_names: list[str]) -> dict[str, str]:
        """Triton signature keyed by the kernel's own argument names (params are positional)."""
        n = len(self.params)
        if list(arg_names[n:]) != list(self.constexprs) or len(arg_names) != n + len(self.constexprs):
            raise ValueError(f"{self.name}: params + constexprs do not match kernel args {arg_names}")
        sig = {a: t for a, (_, t) in zip(arg_names, self.params)}
        sig.update(dict.fromkeys(self.constexprs, "constexpr"))
        return sig

    def attrs(self) -> dict:
        names = [p for p, _ in self.params]
        return {(names.index(p),): [["tt.divisibility", 16]] for p in self.aligned}
