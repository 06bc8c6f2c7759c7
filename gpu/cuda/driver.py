"""The CUDA driver API through cuda-python, with one checking helper.

Every driver call returns `(err, *values)`.  `Driver` wraps the binding module
so that `cu.cuMemAlloc(n)` returns the value(s) or raises `CudaError` naming
the call, the error and what to do about it.  `open_device` initializes the
driver, retains the device's primary context and creates the stream all work
runs on.  Any module with the same surface can stand in for the bindings (the test
suite's numpy device under tests/ does, on machines without a GPU).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ukgpu.llama_core.errors import DeviceError

HINTS = {
    "CUDA_ERROR_NO_DEVICE": "no CUDA device is visible: pass the GPU through (VFIO) and check "
                            "that the nvidia kernel module bound it (nvidia-smi)",
    "CUDA_ERROR_INVALID_DEVICE": "that device ordinal does not exist: pick one of `ukgpu pci` list",
    "CUDA_ERROR_NOT_INITIALIZED": "the driver is not initialized: cuInit failed earlier",
    "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH": "libcuda and the nvidia kernel module differ in version: "
                                         "install matching driver packages",
    "CUDA_ERROR_INSUFFICIENT_LOADER_VERSION": "the driver is older than cuda-python needs: upgrade "
                                              "the NVIDIA driver or install an older cuda-python",
    "CUDA_ERROR_INVALID_PTX": "PTX JIT compilation failed (see the JIT log): rebuild the kernels "
                              "with `ukgpu ptx build`",
    "CUDA_ERROR_JIT_COMPILER_NOT_FOUND": "the driver has no PTX JIT: ship a cubin for this GPU",
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION": "driver too old for this PTX ISA; use the cubin or "
                                          "rebuild with a lower ptx_version",
    "CUDA_ERROR_NO_BINARY_FOR_GPU": "no kernel image for this GPU's architecture: rebuild the "
                                    "kernels for it (`ukgpu ptx build`)",
    "CUDA_ERROR_INVALID_IMAGE": "the kernel image is corrupt: rebuild it with `ukgpu ptx build`",
    "CUDA_ERROR_OUT_OF_MEMORY": "device out of memory: lower n_ctx / the arena size, or use a "
                                "smaller model",
    "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES": "the launch asks for more registers/shared memory than "
                                          "the GPU has: rebuild the kernel with fewer warps",
    "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED": "a synchronous call was made while capturing a CUDA "
                                             "graph: this is a bug in the backend",
}
# Errors after which the context is lost ("sticky"): every later call of the process returns the
# same error, so nothing on the device (weights, caches, graphs) can be used again; only a new
# process gets a working context (cuda.h: "This leaves the process in an inconsistent state and
# any further CUDA work will return the same error", or "the context cannot be used anymore").
# A kernel's fault is reported by whatever call next waits for the stream (usually
# cuStreamSynchronize), with no kernel named: `SYNC_ENV` makes every eager launch wait.
STICKY = frozenset({
    "CUDA_ERROR_ECC_UNCORRECTABLE", "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_TIMEOUT", "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    "CUDA_ERROR_ASSERT", "CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS", "CUDA_ERROR_INVALID_ADDRESS_SPACE", "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_LAUNCH_FAILED", "CUDA_ERROR_TENSOR_MEMORY_LEAK",
})
SYNC_ENV = "UKGPU_CUDA_SYNC"
STICKY_HINT = (f"the GPU context is lost (a kernel faulted; the call that reports it is not the "
               f"kernel): rerun with {SYNC_ENV}=1 to name the kernel, and run `ukgpu verify "
               "--kernels` to find it")
NAMED_HINT = ("the GPU context is lost: run `ukgpu verify --kernels` and report the failing kernel "
              "with this message")
DRIVER_MISSING = "DRIVER_NOT_FOUND"
_current = threading.local()  # .ctx: the context this module made current in this thread


class CudaError(DeviceError):
    """A CUDA driver call failed (or the driver is not there at all).  `sticky`: the error is one
    of STICKY, the context is lost; other errors refuse that call and leave the device usable."""

    def __init__(self, call: str, name: str, hint: str = "", detail: str = ""):
        self.call, self.name, self.hint, self.detail = call, name, hint, detail
        msg = f"{call} failed: {name}"
        if detail:
            msg += f" ({detail})"
        if hint:
            msg += f": {hint}"
        super().__init__(msg)

    @property
    def sticky(self) -> bool:
        return self.name in STICKY


def load_bindings() -> Any:
    """The cuda-python driver module (cuda-python 12.8+: cuda.bindings; older: cuda.cuda)."""
    try:
        from cuda.bindings import driver
        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # type: ignore[no-redef]
        return driver
    except ImportError as exc:
        raise CudaError("import cuda-python", "CUDA_PYTHON_MISSING",
                        "install the GPU extra: pip install 'ukgpu[gpu]'") from exc


def error_name(mod: Any, err: Any) -> str:
    name = getattr(err, "name", None)
    if name:
        return name
    try:
        res, raw = mod.cuGetErrorName(err)
        return raw.decode() if isinstance(raw, bytes) else str(raw)
    except Exception:  # noqa: BLE001 - naming an error must never raise
        return f"CUresult {int(err)}"


def check(mod: Any, call: str, result: Any) -> Any:
    """`(err, *values)` -> None, the value, or the tuple of values; raise on err != 0."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        name = error_name(mod, err)
        raise CudaError(call, name, HINTS.get(name, STICKY_HINT if name in STICKY else ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class Driver:
    """Checked access to a driver binding module: `Driver(mod).cuInit(0)`."""

    def __init__(self, mod: Any):
        self.mod = mod

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("cu"):
            return getattr(self.mod, name)  # enums: CUresult, CUdevice_attribute, ...
        fn = getattr(self.mod, name)

        def call(*args: Any) -> Any:
            try:
                result = fn(*args)
            except RuntimeError as exc:  # the bindings raise when libcuda cannot be loaded
                raise CudaError(name, DRIVER_MISSING, "no NVIDIA driver (libcuda.so) on this "
                                "machine: install the driver or use the CPU backend",
                                detail=str(exc).splitlines()[0][:160]) from exc
            return check(self.mod, name, result)

        setattr(self, name, call)  # later lookups skip __getattr__
        return call


@dataclass
class DeviceInfo:
    ordinal: int
    name: str
    cc: tuple[int, int]
    pci_bus_id: str
    total_bytes: int
    driver_version: int  # e.g. 13000 for CUDA 13.0

    def line(self) -> str:
        return (f"GPU {self.ordinal}: {self.name} (sm_{self.cc[0]}{self.cc[1]}, "
                f"{self.total_bytes / 2**30:.0f} GiB, PCI {self.pci_bus_id}, driver CUDA "
                f"{self.driver_version // 1000}.{self.driver_version % 1000 // 10})")


@dataclass
class CudaContext:
    """An initialized device: its primary context is current and `stream` is ours."""

    cu: Driver
    device: Any
    ctx: Any
    stream: Any
    info: DeviceInfo

    def ensure_current(self) -> None:
        """Make the context current in the calling thread (a server calls from its own)."""
        if getattr(_current, "ctx", None) is not self.ctx:
            self.cu.cuCtxSetCurrent(self.ctx)
            _current.ctx = self.ctx

    def sync(self) -> None:
        self.cu.cuStreamSynchronize(self.stream)

    def free_bytes(self) -> int:
        free, _total = self.cu.cuMemGetInfo()
        return int(free)


def _text(raw: Any) -> str:
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
    return str(raw)


def device_info(cu: Driver, dev: Any, ordinal: int) -> DeviceInfo:
    attr = cu.CUdevice_attribute
    major = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return DeviceInfo(
        ordinal=ordinal,
        name=_text(cu.cuDeviceGetName(128, dev)),
        cc=(int(major), int(minor)),
        pci_bus_id=_text(cu.cuDeviceGetPCIBusId(32, dev)),
        total_bytes=int(cu.cuDeviceTotalMem(dev)),
        driver_version=int(cu.cuDriverGetVersion()),
    )


def open_device(ordinal: int = 0, mod: Any = None) -> CudaContext:
    """Initialize the driver, make device `ordinal`'s primary context current, make a stream."""
    cu = Driver(mod if mod is not None else load_bindings())
    cu.cuInit(0)
    count = int(cu.cuDeviceGetCount())
    if count == 0:
        raise CudaError("cuDeviceGetCount", "CUDA_ERROR_NO_DEVICE", HINTS["CUDA_ERROR_NO_DEVICE"])
    if not 0 <= ordinal < count:
        raise CudaError("cuDeviceGet", "CUDA_ERROR_INVALID_DEVICE",
                        f"there are {count} device(s): use an ordinal below {count}")
    dev = cu.cuDeviceGet(ordinal)
    info = device_info(cu, dev, ordinal)
    ctx = cu.cuDevicePrimaryCtxRetain(dev)
    cu.cuCtxSetCurrent(ctx)
    _current.ctx = ctx
    stream = cu.cuStreamCreate(int(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
    return CudaContext(cu, dev, ctx, stream, info)
