"""With this folder on PYTHONPATH and UKGPU_CUDA_STUB=DIR (LD_LIBRARY_PATH=DIR) set, every Python
process -- benchmarks and subprocesses included -- drives the stand-in libcuda.so.1."""

import os
import sys

if os.environ.get("UKGPU_CUDA_STUB"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from libcuda_stub import install

    install()
