"""PCI enumeration, the VFIO ioctl layer, the CUDA driver layer and the CUDA backend."""
