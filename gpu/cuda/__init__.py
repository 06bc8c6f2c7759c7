"""The CUDA driver layer (cuda-python), the kernel modules, the device arena, the CUDA backend and `verify`."""
