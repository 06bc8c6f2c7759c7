"""Interpreter mode for the kernel tests: TRITON_INTERPRET must be set before triton is imported,
so it is set here, at collection of this folder, and checked."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

if "ukgpu.ptx_kernels.matvec" in sys.modules:  # a kernel module was imported compiled-mode first
    raise RuntimeError("run tests/unit/ptx in its own pytest process: kernels were imported "
                       "before TRITON_INTERPRET=1 could be set")
