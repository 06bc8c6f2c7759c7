"""The unikernel: PID-1 init, arena allocator, HTTP API, image builder and QEMU launcher."""
