"""The CPU backend (the reference): `CpuBackend` and the numpy/numba kernels on raw GGUF blocks."""
