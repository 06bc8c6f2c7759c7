"""The VFIO layer: the user ABI, the container/group/device API, and host-side passthrough setup."""
