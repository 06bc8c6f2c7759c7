"""`cuLaunchKernelEx` and its launch-config types for the fake driver (a mixin of `FakeDriver`).

Only the attribute the launcher sets is understood: programmatic stream serialization (PDL).  A
launch with it is checked against the contract of `ptx_kernels/pdl.py`: the kernel's image must
be one compiled with the PDL gate (its manifest entry says `"pdl": true`: it waits for the kernel
before it ahead of any global access).  Hardware would run an ungated kernel early and race with
the one before it, silently; here the launch is refused with CUDA_ERROR_INVALID_VALUE and named
in `unsafe_pdl`, so a test sees it.  A device older than sm_90 refuses the attribute with
CUDA_ERROR_NOT_SUPPORTED (what a real driver does there is unverified).  The kernel then runs as
a `cuLaunchKernel` would: the emulation executes launches in stream order, so an early start
changes nothing it computes.  `fail={"cuLaunchKernelEx": ...}` makes a PDL launch fail, as a
driver that refuses the attribute would.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from fakes.cuda_streams import CUresult

PROGRAMMATIC_STREAM_SERIALIZATION = 6  # cuda.h's CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
CUlaunchAttributeID = SimpleNamespace(
    CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION=PROGRAMMATIC_STREAM_SERIALIZATION)


class CUlaunchAttribute:
    def __init__(self) -> None:
        self.id = 0
        self.value = SimpleNamespace(programmaticStreamSerializationAllowed=0)


class CUlaunchConfig:
    def __init__(self) -> None:
        self.gridDimX = self.gridDimY = self.gridDimZ = 0
        self.blockDimX = self.blockDimY = self.blockDimZ = 0
        self.sharedMemBytes = 0
        self.hStream: Any = None
        self.attrs: list = []
        self.numAttrs = 0


class LaunchEx:
    CUlaunchAttributeID = CUlaunchAttributeID
    CUlaunchAttribute = CUlaunchAttribute
    CUlaunchConfig = CUlaunchConfig

    def _init_launch_ex(self) -> None:
        self.pdl_launches = 0  # launches (eager or recorded into a graph) with the PDL attribute
        self.unsafe_pdl: list[str] = []  # entries launched with PDL whose code has no gate

    def cuLaunchKernelEx(self, config: Any, fn: Any, params: Any, extra: Any) -> tuple:
        attrs = list(config.attrs)[:config.numAttrs]
        pdl = any(int(a.id) == PROGRAMMATIC_STREAM_SERIALIZATION
                  and a.value.programmaticStreamSerializationAllowed for a in attrs)
        grid = (config.gridDimX, config.gridDimY, config.gridDimZ)
        block = (config.blockDimX, config.blockDimY, config.blockDimZ)
        return self.launch_ex(fn, grid, block, config.sharedMemBytes, config.hStream, params,
                              extra, pdl)

    def launch_ex(self, fn: Any, grid: tuple, block: tuple, shared: int, stream: Any,
                  params: Any, extra: Any, pdl: bool) -> tuple:
        if pdl:
            bad = self._failing("cuLaunchKernelEx")  # type: ignore[attr-defined]
            if bad is not None:
                return (bad,)
            if tuple(self.device.cc) < (9, 0):  # type: ignore[attr-defined]
                return (CUresult.CUDA_ERROR_NOT_SUPPORTED,)
            if not fn.entry.get("pdl"):
                self.unsafe_pdl.append(fn.entry["name"])
                return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        result = self.cuLaunchKernel(fn, *grid, *block, shared, stream, params, extra)  # type: ignore[attr-defined]
        if pdl and result[0] == CUresult.CUDA_SUCCESS:
            self.pdl_launches += 1
        return result
