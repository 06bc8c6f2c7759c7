"""GPU kernels written in Python, their generator, and the generated PTX/cubin artifacts."""
