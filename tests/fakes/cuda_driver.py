"""A fake of the cuda-python driver API surface ukgpu uses, for machines without a GPU.

`FakeDriver` is a drop-in for `cuda.bindings.driver` as `gpu.cuda.Driver` calls it: every
function returns `(CUresult, *values)`.  Device memory is host memory at fake addresses; modules
are recognized by their bytes against the kernel manifests, and launches run the numpy emulation
of `cuda_fake_kernels` after checking the argument list against the manifest (count, ctypes
type, hidden params 0), the block size and the dynamic shared memory opt-in.  Stream capture
records launches into graphs that `cuGraphLaunch` replays; synchronous calls during a capture
fail as on real hardware.  Knobs make the failure paths reachable: no driver library, no
device, a chosen call failing with a chosen error, an old driver's PTX ISA limit.

It stands in for the driver, not for the GPU's numerics: emulation is float64/float32 numpy.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ukgpu.ptx_kernels.loader import BUILD_DIR, STATIC_SHARED_LIMIT, param_ctype

from fakes import cuda_kernels as kernels

ALIGN = 256
BASE_ADDRESS = 0x7F00_0000_0000


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NOT_INITIALIZED = 3
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_INVALID_DEVICE = 101
    CUDA_ERROR_INVALID_IMAGE = 200
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209
    CUDA_ERROR_INVALID_PTX = 218
    CUDA_ERROR_JIT_COMPILER_NOT_FOUND = 221
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222
    CUDA_ERROR_INVALID_HANDLE = 400
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_ILLEGAL_ADDRESS = 700
    CUDA_ERROR_LAUNCH_FAILED = 719
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901


CUdevice_attribute = SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR=75,
                                     CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR=76)
CUfunction_attribute = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)
CUjit_option = SimpleNamespace(CU_JIT_ERROR_LOG_BUFFER=5, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES=6)
CUstreamCaptureMode = SimpleNamespace(CU_STREAM_CAPTURE_MODE_GLOBAL=0,
                                      CU_STREAM_CAPTURE_MODE_THREAD_LOCAL=1,
                                      CU_STREAM_CAPTURE_MODE_RELAXED=2)
CUstream_flags = SimpleNamespace(CU_STREAM_DEFAULT=0, CU_STREAM_NON_BLOCKING=1)
OK = CUresult.CUDA_SUCCESS


class DriverLibraryMissing(RuntimeError):
    """What the real bindings raise when libcuda.so cannot be loaded."""


@dataclass
class FakeDevice:
    name: str = "NVIDIA H100 80GB HBM3 (fake)"
    cc: tuple[int, int] = (9, 0)
    total_bytes: int = 4 << 30
    pci_bus_id: str = "0000:00:06.0"
    ptx_isa_max: tuple[int, int] = (9, 0)  # the newest PTX ISA this driver can JIT


@dataclass
class _Stream:
    capture: list | None = None  # recorded nodes while capturing


@dataclass
class _Function:
    entry: dict
    max_dynamic_shared: int = STATIC_SHARED_LIMIT


@dataclass
class _Graph:
    nodes: list = field(default_factory=list)


def _in_context(fn: Any) -> Any:
    """Calls that need a current context fail in a thread that has not made one current."""
    def call(self: FakeDriver, *args: Any) -> tuple:
        if getattr(self._thread, "ctx", None) is None:
            return (CUresult.CUDA_ERROR_INVALID_CONTEXT, None)
        return fn(self, *args)
    call.__name__, call.__wrapped__ = fn.__name__, fn
    return call


def _manifest_index(build_dir: Path) -> dict[str, tuple[str, str, list[dict]]]:
    """sha256 of each artifact's bytes -> (target, kind, entries).  Several entries can share one
    image (e.g. Q5_0 and Q8_0 repack to the same int8 layout and compile to the same code)."""
    index: dict[str, tuple[str, str, list[dict]]] = {}
    for man_path in sorted(build_dir.glob("*/manifest.json")):
        man = json.loads(man_path.read_text())
        for entry in man["entries"].values():
            for kind, art in entry["artifacts"].items():
                index.setdefault(art["sha256"], (man["target"], kind, []))[2].append(entry)
    return index


class FakeDriver:
    """See the module docstring.  `fail={"cuModuleLoadData": "CUDA_ERROR_INVALID_PTX"}` makes
    that call fail; `library_missing=True` makes every call raise like a machine without libcuda."""

    CUresult = CUresult
    CUdevice_attribute = CUdevice_attribute
    CUfunction_attribute = CUfunction_attribute
    CUjit_option = CUjit_option
    CUstreamCaptureMode = CUstreamCaptureMode
    CUstream_flags = CUstream_flags

    def __init__(self, devices: list[FakeDevice] | None = None, library_missing: bool = False,
                 fail: dict[str, str] | None = None, build_dir: Path = BUILD_DIR,
                 driver_version: int = 13000):
        self.devices = [FakeDevice()] if devices is None else devices
        self.library_missing = library_missing
        self.fail = dict(fail or {})
        self.driver_version = driver_version
        self.build_dir = Path(build_dir)
        self._index: dict | None = None
        self.allocs: dict[int, np.ndarray] = {}
        self._next = BASE_ADDRESS
        self.weight_cache: dict = {}
        self.initialized = False
        self.launches: list[str] = []  # entry names launched eagerly (not from graphs)
        self.graph_launches = 0
        self.graph_kernel_runs = 0
        self._thread = threading.local()  # .ctx: the context current in this thread
        self.loaded: list[tuple[str, str, str]] = []  # (entry, target, kind): entries whose image loaded

    # --- plumbing ----------------------------------------------------------
    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if name.startswith("cu") and object.__getattribute__(self, "library_missing"):
            def missing(*args: Any) -> Any:  # the real bindings fail at the first call
                raise DriverLibraryMissing('"cuda" is an NVIDIA driver library and can only be '
                                           "found via system search (fake: library_missing=True)")
            return missing
        return attr

    def _failing(self, call: str) -> CUresult | None:
        name = self.fail.get(call)
        return None if name is None else CUresult[name]

    def _capturing(self) -> bool:
        return any(s.capture is not None for s in self.streams)

    @property
    def streams(self) -> list[_Stream]:
        return self.__dict__.setdefault("_streams", [])

    def _bytes_used(self) -> int:
        return sum(a.nbytes for a in self.allocs.values())

    def view(self, ptr: int, dtype: Any, count: int) -> np.ndarray:
        """A writable view of `count` elements of `dtype` at device address `ptr`."""
        dtype = np.dtype(dtype)
        nbytes = int(count) * dtype.itemsize
        for base, buf in self.allocs.items():
            if base <= ptr and ptr + nbytes <= base + buf.nbytes:
                off = ptr - base
                if off % dtype.itemsize:
                    raise kernels.EmulationError(f"misaligned {dtype} access at {ptr:#x}")
                return buf[off:off + nbytes].view(dtype)
        raise kernels.EmulationError(f"access of {nbytes} bytes at {ptr:#x} outside every allocation")

    # --- init and device ---------------------------------------------------
    def cuGetErrorName(self, err: Any) -> tuple:
        return OK, CUresult(int(err)).name.encode()

    def cuInit(self, flags: int) -> tuple:
        bad = self._failing("cuInit")
        if bad is None:
            self.initialized = True
        return (bad or OK,)

    def cuDriverGetVersion(self) -> tuple:
        return OK, self.driver_version

    def cuDeviceGetCount(self) -> tuple:
        if not self.initialized:
            return CUresult.CUDA_ERROR_NOT_INITIALIZED, 0
        return OK, len(self.devices)

    def cuDeviceGet(self, ordinal: int) -> tuple:
        if not 0 <= ordinal < len(self.devices):
            return CUresult.CUDA_ERROR_INVALID_DEVICE, None
        return OK, ordinal

    def cuDeviceGetAttribute(self, attr: int, dev: int) -> tuple:
        cc = self.devices[dev].cc
        return OK, cc[0] if int(attr) == 75 else cc[1]

    def cuDeviceGetName(self, length: int, dev: int) -> tuple:
        return OK, self.devices[dev].name.encode()[:length]

    def cuDeviceGetPCIBusId(self, length: int, dev: int) -> tuple:
        return OK, self.devices[dev].pci_bus_id.encode()

    def cuDeviceTotalMem(self, dev: int) -> tuple:
        return OK, self.devices[dev].total_bytes

    def cuDevicePrimaryCtxRetain(self, dev: int) -> tuple:
        return OK, ("ctx", dev)

    def cuCtxSetCurrent(self, ctx: Any) -> tuple:
        self.device = self.devices[ctx[1]]
        self._thread.ctx = ctx
        return (OK,)

    @_in_context
    def cuStreamCreate(self, flags: int) -> tuple:
        stream = _Stream()
        self.streams.append(stream)
        return OK, stream

    @_in_context
    def cuMemGetInfo(self) -> tuple:
        total = self.device.total_bytes
        return OK, total - self._bytes_used(), total

    # --- memory ------------------------------------------------------------
    @_in_context
    def cuMemAlloc(self, nbytes: int) -> tuple:
        bad = self._failing("cuMemAlloc")
        if bad is not None:
            return bad, 0
        if self._capturing():  # ukgpu never allocates while capturing: catch it if it does
            return CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, 0
        if nbytes <= 0 or self._bytes_used() + nbytes > self.device.total_bytes:
            return CUresult.CUDA_ERROR_OUT_OF_MEMORY, 0
        ptr = self._next
        self.allocs[ptr] = np.zeros(int(nbytes), dtype=np.uint8)
        self._next += -(-int(nbytes) // ALIGN) * ALIGN + ALIGN
        return OK, ptr

    def cuMemFree(self, ptr: int) -> tuple:
        if self.allocs.pop(int(ptr), None) is None:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        return (OK,)

    def _copy(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def _device_address(self, ptr: int, nbytes: int) -> int:
        return self.view(ptr, np.uint8, nbytes).ctypes.data

    @_in_context
    def cuMemcpyHtoD(self, dst: int, src: int, nbytes: int) -> tuple:
        if self._capturing():
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        return self.cuMemcpyHtoDAsync(dst, src, nbytes, None)

    @_in_context
    def cuMemcpyHtoDAsync(self, dst: int, src: int, nbytes: int, stream: Any) -> tuple:
        if stream is not None and stream.capture is not None:
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)  # pageable host memory
        self._copy(self._device_address(int(dst), nbytes), int(src), nbytes)
        self._written(int(dst), nbytes)
        return (OK,)

    @_in_context
    def cuMemcpyDtoH(self, dst: int, src: int, nbytes: int) -> tuple:
        if self._capturing():
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        return self.cuMemcpyDtoHAsync(dst, src, nbytes, None)

    @_in_context
    def cuMemcpyDtoHAsync(self, dst: int, src: int, nbytes: int, stream: Any) -> tuple:
        if stream is not None and stream.capture is not None:
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        self._copy(int(dst), self._device_address(int(src), nbytes), nbytes)
        return (OK,)

    @_in_context
    def cuMemcpyDtoDAsync(self, dst: int, src: int, nbytes: int, stream: Any) -> tuple:
        if stream is not None and stream.capture is not None:
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)  # not needed inside a graph
        self._copy(self._device_address(int(dst), nbytes), self._device_address(int(src), nbytes), nbytes)
        self._written(int(dst), nbytes)
        return (OK,)

    @_in_context
    def cuMemsetD32Async(self, dst: int, value: int, count: int, stream: Any) -> tuple:
        if stream is not None and stream.capture is not None:
            stream.capture.append(("memset", int(dst), int(value), int(count)))
            return (OK,)
        self.view(int(dst), np.uint32, count)[:] = value
        self._written(int(dst), 4 * count)
        return (OK,)

    def _written(self, ptr: int, nbytes: int) -> None:
        """Drop cached dequantized weights whose planes a copy overwrote."""
        for key in [k for k in self.weight_cache if k[0] < ptr + nbytes and ptr < k[1]]:
            del self.weight_cache[key]

    # --- modules -----------------------------------------------------------
    @_in_context
    def cuModuleLoadData(self, image: bytes) -> tuple:
        return self._load("cuModuleLoadData", image)

    @_in_context
    def cuModuleLoadDataEx(self, image: bytes, n: int, options: Any, values: Any) -> tuple:
        return self._load("cuModuleLoadDataEx", image, values[0] if values else None)

    def _load(self, call: str, image: bytes, log: bytearray | None = None) -> tuple:
        bad = self._failing(call)
        if bad is not None:
            if log is not None:
                msg = b"ptxas fatal (fake driver): injected failure\0"
                log[:len(msg)] = msg
            return bad, None
        if self._index is None:
            self._index = _manifest_index(self.build_dir)
        image = bytes(image)
        found = self._index.get(hashlib.sha256(image).hexdigest())
        if found is None and image.endswith(b"\0"):  # PTX is passed NUL-terminated
            found = self._index.get(hashlib.sha256(image[:-1]).hexdigest())
        if found is None:
            return CUresult.CUDA_ERROR_INVALID_IMAGE, None
        target, kind, entries = found
        entry = entries[0]
        arch = tuple(int(c) for c in re.findall(r"\d", target)[:2])
        if kind == "cubin" and arch != self.device.cc:
            return CUresult.CUDA_ERROR_NO_BINARY_FOR_GPU, None
        if kind == "ptx":
            isa = re.search(rb"^\.version (\d+)\.(\d+)", bytes(image), re.M)
            if isa and (int(isa[1]), int(isa[2])) > self.device.ptx_isa_max:
                return CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION, None
        self.loaded += [(e["name"], target, kind) for e in entries]
        return OK, entry

    def cuModuleGetFunction(self, module: dict, name: bytes) -> tuple:
        if name.decode() != module["kernel_name"]:
            return CUresult.CUDA_ERROR_NOT_FOUND, None
        return OK, _Function(module)

    def cuFuncSetAttribute(self, fn: _Function, attr: int, value: int) -> tuple:
        if int(attr) == 8:
            fn.max_dynamic_shared = int(value)
        return (OK,)

    # --- launches and graphs -------------------------------------------------
    @_in_context
    def cuLaunchKernel(self, fn: _Function, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                       shared: int, stream: _Stream, params: Any, extra: Any) -> tuple:
        bad = self._failing("cuLaunchKernel")
        if bad is not None:
            return (bad,)
        if not (1 <= gx < 2**31 and 1 <= gy < 2**16 and 1 <= gz < 2**16):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)  # the hardware grid limits
        args, err = self._decode(fn, (bx, by, bz), shared, params)
        if err is not None:
            return (err,)
        node = ("kernel", fn.entry, args, (gx, gy, gz))
        if stream.capture is not None:
            stream.capture.append(node)
            return (OK,)
        self.launches.append(fn.entry["name"])
        return (self._run(node),)

    def _decode(self, fn: _Function, block: tuple, shared: int, params: Any) -> tuple:
        entry = fn.entry
        if tuple(block) != (entry["threads_per_block"], 1, 1) or shared != entry["shared_bytes"]:
            return None, CUresult.CUDA_ERROR_INVALID_VALUE
        if shared > fn.max_dynamic_shared:
            return None, CUresult.CUDA_ERROR_INVALID_VALUE
        values, types = params
        if len(values) != len(entry["params"]) or len(types) != len(values):
            return None, CUresult.CUDA_ERROR_INVALID_VALUE
        args = {}
        for p, v, t in zip(entry["params"], values, types):
            if t is not param_ctype(p["type"]) or (p["hidden"] and v != 0):
                return None, CUresult.CUDA_ERROR_INVALID_VALUE
            args[p["name"]] = v
        return args, None

    def _run(self, node: tuple) -> CUresult:
        if node[0] == "memset":
            self.view(node[1], np.uint32, node[3])[:] = node[2]
            return OK
        _, entry, args, grid = node
        try:
            kernels.emulator(entry)(self, entry, args, grid)
        except (kernels.EmulationError, ValueError, IndexError) as exc:
            self.last_fault = f"{entry['name']}: {exc}"
            return CUresult.CUDA_ERROR_ILLEGAL_ADDRESS
        return OK

    def cuStreamBeginCapture(self, stream: _Stream, mode: int) -> tuple:
        if stream.capture is not None:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        stream.capture = []
        return (OK,)

    def cuStreamEndCapture(self, stream: _Stream) -> tuple:
        if stream.capture is None:
            return CUresult.CUDA_ERROR_INVALID_VALUE, None
        graph, stream.capture = _Graph(stream.capture), None
        return OK, graph

    def cuGraphInstantiate(self, graph: _Graph, flags: int) -> tuple:
        return OK, _Graph(list(graph.nodes))

    @_in_context
    def cuGraphLaunch(self, exec_: _Graph, stream: _Stream) -> tuple:
        self.graph_launches += 1
        for node in exec_.nodes:
            self.graph_kernel_runs += node[0] == "kernel"
            err = self._run(node)
            if err != OK:
                return (err,)
        return (OK,)

    def cuGraphDestroy(self, graph: _Graph) -> tuple:
        return (OK,)

    def cuGraphExecDestroy(self, exec_: _Graph) -> tuple:
        return (OK,)

    @_in_context
    def cuStreamSynchronize(self, stream: _Stream) -> tuple:
        if stream.capture is not None:
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        return (OK,)
