"""Every shipped kernel configuration: the union of the family files' `specs()`."""

from __future__ import annotations

import importlib

from .spec import KernelSpec

FAMILIES = ("matvec", "matvec_fused", "matvec_split", "gemm", "gemm_fused", "embedding", "rmsnorm", "rope",
            "rope_kv", "attention", "attention_fused", "elementwise", "argmax")


def family_module(family: str):
    return importlib.import_module(f"ukgpu.ptx_kernels.{family}")


def all_specs() -> list[KernelSpec]:
    specs = [s for fam in FAMILIES for s in family_module(fam).specs()]
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate kernel entry names: {sorted(dupes)}")
    return specs


def kernel_fn(spec: KernelSpec):
    return getattr(family_module(spec.family), spec.fn)
