"""What runs inside the VM: PID-1 init, its system calls, the host memory arena and the engine setup."""
