"""`grid_dependency`: the programmatic dependent launch (PDL) gate every kernel opens with.

On Hopper (sm_90+) a kernel launched with the PDL launch attribute may start while the kernel
before it in the stream is still running: the driver schedules its CTAs as soon as every CTA of
the previous grid has said `griddepcontrol.launch_dependents` (or exited), and
`griddepcontrol.wait` then blocks until that grid has finished and its memory is visible.  Each
kernel here says both before it touches global memory, so nothing it reads or writes can race
with the kernel before it; what overlaps is the launch, the CTA dispatch and the prologue (the
parameter loads and index arithmetic) of one kernel with the tail of the one before: the per-node
cost that bounds a batch-1 decode step.

The gate is a constexpr (`PDL`) the generator sets per target: True for sm_90a (the instructions
need sm_90), False for the portable sm_80 PTX, where it compiles to nothing.  Both instructions
are no-ops in a kernel launched without the attribute, so an sm_90a kernel is correct launched
either way.  The launcher (gpu/cuda/modules.py) adds the attribute only to kernels whose
manifest entry says `"pdl": true`; `tests/unit/ptx/test_ptx_pdl.py` checks that every such
entry's PTX waits before its first global load or store.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def grid_dependency(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (both only when PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
