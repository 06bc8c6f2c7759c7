"""A fake of the cuda-python driver API surface ukgpu uses, for machines without a GPU.

`FakeDriver` is a drop-in for `cuda.bindings.driver` as `gpu.cuda.Driver` calls it: every
function returns `(CUresult, *values)`.  Device memory is host memory at fake addresses (never
reused after a free, so a use of freed memory is caught); modules are recognized by their bytes
against the kernel manifests, and a launch checks the argument list against the manifest (count,
ctypes type, hidden params 0), the block size, the grid limits and the dynamic shared memory
opt-in -- those errors are the launch's own, as on hardware.  The launch is then queued: streams,
syncs, faults (reported at the next sync, sticky, like a lost context), pageable copies, capture
invalidation and graph bookkeeping follow the rules written in `cuda_streams`.  Kernels run as
the numpy emulations of `cuda_kernels`, which round operands where the PTX does (f16 GEMM and
prefill attention; fp32 mat-vec).  Knobs make the failure paths reachable: no driver library, no
device, a chosen call failing with a chosen error, an old driver's PTX ISA limit;
`pinned_sources=True` gives async host sources DMA semantics; `emulate=False` checks and records
launches (`trace`) without computing them, for cost models on large shapes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ukgpu.ptx_kernels.loader import BUILD_DIR, STATIC_SHARED_LIMIT, param_ctype

from fakes import cuda_kernels as kernels
from fakes.cuda_launch_ex import LaunchEx
from fakes.cuda_streams import (
    NO_CONTEXT,
    OK,
    CUresult,
    Fault,
    SourceChange,
    StreamsAndGraphs,
    _Graph,
    _Stream,
    host_bytes,
    in_context,
    read_host,
)

__all__ = ["CUresult", "DriverLibraryMissing", "FakeDevice", "FakeDriver", "SourceChange",
           "_Graph", "_Stream"]

ALIGN = 256
BASE_ADDRESS = 0x7F00_0000_0000
TRACE_LIMIT = 200_000  # kernel nodes kept in `trace` (a tuple each); later ones are counted only
_in_context = in_context

CUdevice_attribute = SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR=75,
                                     CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR=76)
CUfunction_attribute = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)
CUjit_option = SimpleNamespace(CU_JIT_ERROR_LOG_BUFFER=5, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES=6)
CUstreamCaptureMode = SimpleNamespace(CU_STREAM_CAPTURE_MODE_GLOBAL=0,
                                      CU_STREAM_CAPTURE_MODE_THREAD_LOCAL=1,
                                      CU_STREAM_CAPTURE_MODE_RELAXED=2)
CUstream_flags = SimpleNamespace(CU_STREAM_DEFAULT=0, CU_STREAM_NON_BLOCKING=1)


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
class _Function:
    entry: dict
    max_dynamic_shared: int = STATIC_SHARED_LIMIT


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


class FakeDriver(LaunchEx, StreamsAndGraphs):
    """See the module docstring.  `fail={"cuModuleLoadData": "CUDA_ERROR_INVALID_PTX"}` makes
    that call fail; `library_missing=True` makes every call raise like a machine without libcuda."""

    CUresult = CUresult
    CUdevice_attribute = CUdevice_attribute
    CUfunction_attribute = CUfunction_attribute
    CUjit_option = CUjit_option
    CUstreamCaptureMode = CUstreamCaptureMode
    CUstream_flags = CUstream_flags

    def __init__(self, devices: list[FakeDevice] | None = None, library_missing: bool = False,
                 fail: dict[str, str] | None = None, build_dir: Path | None = None,
                 driver_version: int = 13000, pinned_sources: bool = False,
                 emulate: bool = True):
        self.devices = [FakeDevice()] if devices is None else devices
        self.library_missing = library_missing
        self.fail = dict(fail or {})
        self.driver_version = driver_version
        # the images the loader reads: the same build (a tuning variant's through UKGPU_KERNELS_DIR)
        self.build_dir = Path(build_dir or os.environ.get("UKGPU_KERNELS_DIR") or BUILD_DIR)
        self.pinned_sources = pinned_sources
        self.emulate = emulate
        self._index: dict | None = None
        self.allocs: dict[int, np.ndarray] = {}
        self.freed: list[tuple[int, int]] = []  # (start, end) of freed allocations
        self._next = BASE_ADDRESS
        self.weight_cache: dict = {}
        self.initialized = False
        self.launches: list[str] = []  # entry names launched eagerly (not from graphs)
        self.trace: list[tuple[dict, dict, tuple]] = []  # (entry, args, grid) of each kernel run
        self.trace_dropped = 0
        self._thread = threading.local()  # .ctx: the context current in this thread
        self.loaded: list[tuple[str, str, str]] = []  # (entry, target, kind): entries whose image loaded
        self._init_streams()
        self._init_launch_ex()

    # --- plumbing ----------------------------------------------------------
    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if not name.startswith("cu"):
            return attr
        if object.__getattribute__(self, "library_missing"):
            def missing(*args: Any) -> Any:  # the real bindings fail at the first call
                raise DriverLibraryMissing('"cuda" is an NVIDIA driver library and can only be '
                                           "found via system search (fake: library_missing=True)")
            return missing
        if name in NO_CONTEXT or not callable(attr):
            return attr
        return object.__getattribute__(self, "guarded")(name, attr)

    def _failing(self, call: str) -> CUresult | None:
        name = self.fail.get(call)
        return None if name is None else CUresult[name]

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
                    raise kernels.MisalignedAccess(f"misaligned {dtype} access at {ptr:#x}")
                return buf[off:off + nbytes].view(dtype)
        if any(lo <= ptr < hi for lo, hi in self.freed):
            raise kernels.EmulationError(f"use of freed memory: {nbytes} bytes at {ptr:#x}")
        raise kernels.EmulationError(f"access of {nbytes} bytes at {ptr:#x} outside every allocation")

    def _device_ok(self, ptr: int, nbytes: int) -> bool:
        try:
            self.view(int(ptr), np.uint8, nbytes)
        except kernels.EmulationError:
            return False
        return True

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

    @in_context
    def cuMemGetInfo(self) -> tuple:
        total = self.device.total_bytes
        return OK, total - self._bytes_used(), total

    # --- memory ------------------------------------------------------------
    @in_context
    def cuMemAlloc(self, nbytes: int) -> tuple:
        bad = self._failing("cuMemAlloc") or self._unsafe()
        if bad is not None:
            return bad, 0
        if nbytes <= 0 or self._bytes_used() + nbytes > self.device.total_bytes:
            return CUresult.CUDA_ERROR_OUT_OF_MEMORY, 0
        ptr = self._next
        self.allocs[ptr] = np.zeros(int(nbytes), dtype=np.uint8)
        self._next += -(-int(nbytes) // ALIGN) * ALIGN + ALIGN
        return OK, ptr

    def cuMemFree(self, ptr: int) -> tuple:
        bad = self._unsafe()
        if bad is not None:
            return (bad,)
        err = self._flush(None)  # the driver waits for the device before it frees
        buf = self.allocs.pop(int(ptr), None)
        if buf is None:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.freed.append((int(ptr), int(ptr) + buf.nbytes))
        self._written(int(ptr), buf.nbytes)
        return (err,)

    @in_context
    def cuMemcpyHtoD(self, dst: int, src: int, nbytes: int) -> tuple:
        bad = self._unsafe(self.null_stream) or self._flush(self.null_stream)
        if bad:
            return (bad,)
        if not self._device_ok(dst, nbytes):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self._store(int(dst), host_bytes(int(src), nbytes))
        return (OK,)

    @in_context
    def cuMemcpyHtoDAsync(self, dst: int, src: int, nbytes: int, stream: Any) -> tuple:
        s = self._stream(stream)
        if s.capture is not None and not self.pinned_sources:
            s.capture_invalid = True  # pageable host memory cannot be a graph's copy source
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        if not self._device_ok(dst, nbytes):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        staged = host_bytes(int(src), nbytes)  # the staging buffer (kept for the comparison)
        return (self._enqueue(s, ("htod", int(dst), int(src), int(nbytes), staged)),)

    @in_context
    def cuMemcpyDtoH(self, dst: int, src: int, nbytes: int) -> tuple:
        return self._copy_out(self.null_stream, dst, src, nbytes)

    @in_context
    def cuMemcpyDtoHAsync(self, dst: int, src: int, nbytes: int, stream: Any) -> tuple:
        return self._copy_out(self._stream(stream), dst, src, nbytes)

    def _copy_out(self, s: _Stream, dst: int, src: int, nbytes: int) -> tuple:
        """Into pageable memory: wait for the stream, then copy before returning."""
        bad = self._unsafe(s) or self._flush(s)
        if bad:
            return (bad,)
        if not self._device_ok(src, nbytes):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        ctypes.memmove(int(dst), self.view(int(src), np.uint8, nbytes).ctypes.data, nbytes)
        return (OK,)

    @in_context
    def cuMemcpyDtoDAsync(self, dst: int, src: int, nbytes: int, stream: Any) -> tuple:
        if not (self._device_ok(dst, nbytes) and self._device_ok(src, nbytes)):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        return (self._enqueue(stream, ("dtod", int(dst), int(src), int(nbytes))),)

    @in_context
    def cuMemsetD32Async(self, dst: int, value: int, count: int, stream: Any) -> tuple:
        if not self._device_ok(dst, 4 * int(count)):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        return (self._enqueue(stream, ("memset", int(dst), int(value), int(count))),)

    def _store(self, dst: int, data: bytes) -> None:
        self.view(dst, np.uint8, len(data))[:] = np.frombuffer(data, np.uint8)
        self._written(dst, len(data))

    def _written(self, ptr: int, nbytes: int) -> None:
        """Drop cached dequantized weights whose planes a copy overwrote."""
        for key in [k for k in self.weight_cache if k[0] < ptr + nbytes and ptr < k[1]]:
            del self.weight_cache[key]

    # --- modules -----------------------------------------------------------
    @in_context
    def cuModuleLoadData(self, image: bytes) -> tuple:
        return self._load("cuModuleLoadData", image)

    @in_context
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

    # --- launches and execution ------------------------------------------------
    @in_context
    def cuLaunchKernel(self, fn: _Function, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                       shared: int, stream: Any, params: Any, extra: Any) -> tuple:
        s = self._stream(stream)
        if s.capture is not None and s.capture_invalid:
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,)
        bad = self._failing("cuLaunchKernel")
        args = None
        if bad is None and not (1 <= gx < 2**31 and 1 <= gy < 2**16 and 1 <= gz < 2**16):
            bad = CUresult.CUDA_ERROR_INVALID_VALUE  # the hardware grid limits
        if bad is None:
            args, bad = self._decode(fn, (bx, by, bz), shared, params)
        if bad is not None:
            if s.capture is not None:
                s.capture_invalid = True  # a failed call inside a capture invalidates it
            return (bad,)
        if s.capture is None:
            self.launches.append(fn.entry["name"])
        return (self._enqueue(s, ("kernel", fn.entry, args, (gx, gy, gz))),)

    def _decode(self, fn: _Function, block: tuple, shared: int, params: Any) -> tuple:
        entry = fn.entry
        if tuple(block) != (entry["threads_per_block"], 1, 1) or shared != entry["shared_bytes"]:
            return None, CUresult.CUDA_ERROR_INVALID_VALUE
        if shared > fn.max_dynamic_shared:
            return None, CUresult.CUDA_ERROR_INVALID_VALUE
        if isinstance(params, int):  # a packed `void **` array, as the real driver reads it
            params = read_param_array(params, entry["params"])
        values, types = params
        if len(values) != len(entry["params"]) or len(types) != len(values):
            return None, CUresult.CUDA_ERROR_INVALID_VALUE
        args = {}
        for p, v, t in zip(entry["params"], values, types):
            if t is not param_ctype(p["type"]) or (p["hidden"] and v != 0):
                return None, CUresult.CUDA_ERROR_INVALID_VALUE
            args[p["name"]] = v
        return args, None

    def _run(self, node: tuple) -> None:
        """Execute one queued node; a fault raises `Fault` (see cuda_streams._flush)."""
        kind = node[0]
        if kind == "graph":
            self.graph_kernel_runs += node[1][0] == "kernel"
            return self._run(node[1])
        if kind == "kernel":
            return self._run_kernel(node[1], node[2], node[3])
        if kind == "memset":
            self.view(node[1], np.uint32, node[3])[:] = node[2]
            self._written(node[1], 4 * node[3])
        elif kind == "dtod":
            self._store(node[1], self.view(node[2], np.uint8, node[3]).tobytes())
        elif kind == "htod":
            self._run_htod(*node[1:])
        elif kind == "host":
            node[1]()
        return None

    def _run_htod(self, dst: int, src: int, nbytes: int, staged: bytes) -> None:
        now = read_host(src, nbytes)
        if now != staged:
            self.async_source_changes.append(SourceChange(dst, src, nbytes, now is not None))
        if not self.pinned_sources:
            return self._store(dst, staged)
        if now is None:
            raise Fault(CUresult.CUDA_ERROR_ILLEGAL_ADDRESS,
                        f"cuMemcpyHtoDAsync: host source {src:#x} unmapped at execution")
        return self._store(dst, now)

    def _run_kernel(self, entry: dict, args: dict, grid: tuple) -> None:
        if len(self.trace) < TRACE_LIMIT:
            self.trace.append((entry, args, grid))
        else:
            self.trace_dropped += 1
        try:
            for p in entry["params"]:  # vector loads assume the manifest's pointer divisibility
                v, div = args[p["name"]], p.get("divisibility", 0)
                if p["type"].startswith("*") and v and div and v % div:
                    raise kernels.MisalignedAccess(f"{p['name']}={v:#x} is not {div}-byte aligned")
            if self.emulate:
                with np.errstate(all="ignore"):  # f16 overflow is the point, not a warning
                    kernels.emulator(entry)(self, entry, args, grid)
        except kernels.MisalignedAccess as exc:
            raise Fault(CUresult.CUDA_ERROR_MISALIGNED_ADDRESS, f"{entry['name']}: {exc}") from exc
        except (kernels.EmulationError, ValueError, IndexError) as exc:
            raise Fault(CUresult.CUDA_ERROR_ILLEGAL_ADDRESS, f"{entry['name']}: {exc}") from exc


def read_param_array(address: int, params: list[dict]) -> tuple[tuple, tuple]:
    """(values, ctypes types) of a `void **kernelParams` array at `address`, decoded with the
    manifest's parameter list (one pointer per parameter, each to its value)."""
    if not address:
        raise ValueError("kernelParams is NULL")
    values, types = [], []
    for i, p in enumerate(params):
        ctype = param_ctype(p["type"])
        at = ctypes.c_void_p.from_address(address + 8 * i).value
        raw = ctypes.string_at(at, ctypes.sizeof(ctype))
        values.append(int.from_bytes(raw, "little") if ctype is ctypes.c_void_p
                      else ctype.from_buffer_copy(raw).value)
        types.append(ctype)
    return tuple(values), tuple(types)
