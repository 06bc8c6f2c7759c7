"""The Python side of the stand-in libcuda.so.1 (libcuda_stub.c): the fake device below the C ABI.

`install()` builds the library if needed, loads it and registers `StubDispatch.__call__` as its
dispatch function; from then on every driver call that cuda-python's real bindings make arrives
here as (entry point name, 64-bit words) and is carried out by `tests/fakes/cuda_driver.FakeDriver`:
handles become small integers, output parameters are written through the pointers the bindings
passed, kernel parameter arrays are decoded with the manifest's parameter types, JIT logs are
written into the caller's buffer.  Stream order, faults, capture and graph rules are the fake's
(tests/fakes/cuda_streams.py): work is queued and runs at a sync, a fault is reported at the next
sync and is sticky; events are recorded when the stream reaches them.  The process must have been started with LD_LIBRARY_PATH
pointing at the library's folder, so that the bindings' dlopen("libcuda.so.1") finds it.

An exception in here never turns into success: it is printed, remembered in `errors`, and
the call returns CUDA_ERROR_UNKNOWN.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent  # the test doubles live in tests/fakes
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


from fakes.cuda_driver import CUresult, FakeDevice, FakeDriver, _Stream, read_param_array  # noqa: E402

CUDA_ERROR_UNKNOWN = 999
DISPATCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                            ctypes.POINTER(ctypes.c_uint64))


def build(out_dir: Path) -> Path:
    """Compile libcuda_stub.c into out_dir/libcuda.so.1 (skipped when it is up to date)."""
    import subprocess

    src = HERE / "libcuda_stub.c"
    lib = Path(out_dir) / "libcuda.so.1"
    if lib.exists() and lib.stat().st_mtime >= src.stat().st_mtime:
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    tmp = lib.with_suffix(f".tmp{os.getpid()}")
    subprocess.run([cc, "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    "-fvisibility=hidden", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)],
                   check=True, capture_output=True, text=True)
    tmp.replace(lib)
    return lib


def _put(addr: int, fmt: str, value: Any) -> None:
    if addr == 0:
        raise ValueError("NULL output pointer")
    data = struct.pack(fmt, value)
    ctypes.memmove(addr, data, len(data))


def _get(addr: int, fmt: str) -> Any:
    return struct.unpack(fmt, ctypes.string_at(addr, struct.calcsize(fmt)))[0]


def _image_bytes(addr: int) -> bytes:
    """A module image passed by address: an ELF cubin (its size is in its header) or PTX text
    (NUL-terminated, as the driver requires)."""
    head = ctypes.string_at(addr, 64)
    if head[:4] != b"\x7fELF":
        return ctypes.string_at(addr)
    phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    for i in range(shnum):  # section data may lie past both header tables
        sh = ctypes.string_at(addr + shoff + i * shentsize, shentsize)
        kind, = struct.unpack_from("<I", sh, 4)
        offset, size = struct.unpack_from("<QQ", sh, 0x18)
        if kind != 8:  # SHT_NOBITS occupies no file bytes
            end = max(end, offset + size)
    return ctypes.string_at(addr, end)


class StubDispatch:
    """Routes the C entry points to a FakeDriver; see the module docstring."""

    def __init__(self, fake: FakeDriver | None = None):
        self.fake = fake or FakeDriver()
        self.handles: dict[int, Any] = {}
        self._next = 0x1000
        self.default_stream: _Stream = self.fake.null_stream
        self.calls: dict[str, int] = {}
        self.errors: list[str] = []
        self._strings: dict[int, ctypes.Array] = {}  # error names handed out as const char*
        self.events: dict[int, float] = {}
        self.fail_from: dict[str, tuple[int, int]] = {}  # call -> (nth call that fails, CUresult)
        self.sticky: int | None = None  # a context-losing error every later call returns

    STICKY = {CUresult.CUDA_ERROR_ILLEGAL_ADDRESS, CUresult.CUDA_ERROR_LAUNCH_FAILED}

    # --- plumbing ------------------------------------------------------------
    def __call__(self, name: bytes, nargs: int, args: Any) -> int:
        call = name.decode()
        words = [args[i] for i in range(nargs)]
        self.calls[call] = self.calls.get(call, 0) + 1
        if self.sticky is not None and call not in ("cuGetErrorName", "cuGetErrorString"):
            return self.sticky  # as on hardware: the context is lost for good
        nth, err = self.fail_from.get(call, (0, 0))
        if nth and self.calls[call] >= nth:
            self.sticky = err if err in self.STICKY else None
            return err
        try:
            return int(getattr(self, call)(*words))
        except Exception:  # noqa: BLE001 - must never unwind into C
            msg = f"{call}{tuple(hex(w) for w in words)}: {traceback.format_exc()}"
            self.errors.append(msg)
            print(f"libcuda stub: {msg}", file=sys.stderr)
            return CUDA_ERROR_UNKNOWN

    def _handle(self, obj: Any) -> int:
        h = self._next
        self._next += 0x10
        self.handles[h] = obj
        return h

    def _handle_out(self, pout: int, result: tuple) -> int:
        """(err, object) from the fake -> err, the object's new handle written to *pout on success."""
        err, obj = result[0], result[1]
        if err == 0:
            _put(pout, "<Q", self._handle(obj))
        return err

    def _obj(self, handle: int) -> Any:
        if handle not in self.handles:
            raise KeyError(f"unknown handle {handle:#x}")
        return self.handles[handle]

    def _stream(self, handle: int) -> _Stream:
        return self.default_stream if handle == 0 else self._obj(handle)

    # --- errors, init, device ----------------------------------------------
    def _error_text(self, err: int, pstr: int, text: str) -> int:
        if err not in self._strings:
            self._strings[err] = ctypes.create_string_buffer(text.encode())
        _put(pstr, "<Q", ctypes.addressof(self._strings[err]))
        return 0

    def cuGetErrorName(self, err: int, pstr: int) -> int:
        try:
            return self._error_text(err, pstr, CUresult(err).name)
        except ValueError:
            return CUresult.CUDA_ERROR_INVALID_VALUE

    def cuGetErrorString(self, err: int, pstr: int) -> int:
        return self.cuGetErrorName(err, pstr)

    def cuInit(self, flags: int) -> int:
        return self.fake.cuInit(flags)[0]

    def cuDeviceGet(self, pdev: int, ordinal: int) -> int:
        err, dev = self.fake.cuDeviceGet(ctypes.c_int32(ordinal).value)
        if err == 0:
            _put(pdev, "<i", dev)
        return err

    def cuDeviceGetCount(self, pcount: int) -> int:
        err, n = self.fake.cuDeviceGetCount()
        _put(pcount, "<i", n)
        return err

    def _text_out(self, buf: int, length: int, text: bytes) -> int:
        if length <= 0:
            return CUresult.CUDA_ERROR_INVALID_VALUE
        data = text[:length - 1] + b"\0"
        ctypes.memmove(buf, data, len(data))
        return 0

    def cuDeviceGetName(self, buf: int, length: int, dev: int) -> int:
        err, name = self.fake.cuDeviceGetName(length, dev)
        return err or self._text_out(buf, ctypes.c_int32(length).value, name)

    def cuDeviceGetPCIBusId(self, buf: int, length: int, dev: int) -> int:
        err, bus = self.fake.cuDeviceGetPCIBusId(length, dev)
        return err or self._text_out(buf, ctypes.c_int32(length).value, bus)

    def cuDeviceTotalMem(self, pbytes: int, dev: int) -> int:
        err, total = self.fake.cuDeviceTotalMem(dev)
        _put(pbytes, "<Q", total)
        return err

    def cuDeviceGetAttribute(self, pvalue: int, attr: int, dev: int) -> int:
        if attr not in (75, 76):  # compute capability major/minor: all ukgpu asks
            return CUresult.CUDA_ERROR_INVALID_VALUE
        err, value = self.fake.cuDeviceGetAttribute(attr, dev)
        _put(pvalue, "<i", value)
        return err

    def cuDevicePrimaryCtxRetain(self, pctx: int, dev: int) -> int:
        return self._handle_out(pctx, self.fake.cuDevicePrimaryCtxRetain(dev))

    def cuDevicePrimaryCtxRelease(self, dev: int) -> int:
        return 0

    def cuCtxSetCurrent(self, ctx: int) -> int:
        return self.fake.cuCtxSetCurrent(self._obj(ctx))[0]

    def cuMemGetInfo(self, pfree: int, ptotal: int) -> int:
        err, free, total = self.fake.cuMemGetInfo()
        if err == 0:
            _put(pfree, "<Q", free)
            _put(ptotal, "<Q", total)
        return err

    # --- memory ------------------------------------------------------------
    def cuMemAlloc(self, pptr: int, nbytes: int) -> int:
        err, ptr = self.fake.cuMemAlloc(nbytes)
        _put(pptr, "<Q", ptr or 0)
        return err

    def cuMemFree(self, ptr: int) -> int:
        return self.fake.cuMemFree(ptr)[0]

    def cuMemcpyHtoD(self, dst: int, src: int, n: int) -> int:
        return self.fake.cuMemcpyHtoD(dst, src, n)[0]

    def cuMemcpyDtoH(self, dst: int, src: int, n: int) -> int:
        return self.fake.cuMemcpyDtoH(dst, src, n)[0]

    def cuMemcpyDtoDAsync(self, dst: int, src: int, n: int, stream: int) -> int:
        return self.fake.cuMemcpyDtoDAsync(dst, src, n, self._stream(stream))[0]

    def cuMemcpyHtoDAsync(self, dst: int, src: int, n: int, stream: int) -> int:
        return self.fake.cuMemcpyHtoDAsync(dst, src, n, self._stream(stream))[0]

    def cuMemcpyDtoHAsync(self, dst: int, src: int, n: int, stream: int) -> int:
        return self.fake.cuMemcpyDtoHAsync(dst, src, n, self._stream(stream))[0]

    def cuMemsetD32Async(self, dst: int, value: int, n: int, stream: int) -> int:
        return self.fake.cuMemsetD32Async(dst, value, n, self._stream(stream))[0]

    # --- modules -----------------------------------------------------------
    def cuModuleLoadData(self, pmod: int, image: int) -> int:
        return self._handle_out(pmod, self.fake.cuModuleLoadData(_image_bytes(image)))

    def cuModuleLoadDataEx(self, pmod: int, image: int, n: int, options: int, values: int) -> int:
        opts = [_get(options + 4 * i, "<i") for i in range(n)]
        vals = [_get(values + 8 * i, "<Q") for i in range(n)]
        given = dict(zip(opts, vals))
        log_addr, log_size = given.get(5), given.get(6)  # CU_JIT_ERROR_LOG_BUFFER(_SIZE_BYTES)
        if (log_addr is None) != (log_size is None):
            return CUresult.CUDA_ERROR_INVALID_VALUE
        log = bytearray(log_size or 0)
        result = self.fake._load("cuModuleLoadDataEx", _image_bytes(image),
                                 log if log_addr else None)
        if log_addr and log_size:
            log[-1:] = b"\0"
            ctypes.memmove(log_addr, bytes(log), log_size)
        return self._handle_out(pmod, result)

    def cuModuleUnload(self, mod: int) -> int:
        self._obj(mod)
        return 0

    def cuModuleGetFunction(self, pfn: int, mod: int, name: int) -> int:
        return self._handle_out(pfn, self.fake.cuModuleGetFunction(self._obj(mod), ctypes.string_at(name)))

    def cuFuncSetAttribute(self, fn: int, attr: int, value: int) -> int:
        return self.fake.cuFuncSetAttribute(self._obj(fn), attr, ctypes.c_int64(value).value)[0]

    # --- launches, streams, graphs, events -----------------------------------
    def cuLaunchKernel(self, fn: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                       shared: int, stream: int, params: int, extra: int) -> int:
        """Decode the `void **kernelParams` array with the manifest's parameter list."""
        func = self._obj(fn)
        if extra != 0 or params == 0:
            return CUresult.CUDA_ERROR_INVALID_VALUE
        return self.fake.cuLaunchKernel(func, gx, gy, gz, bx, by, bz, shared, self._stream(stream),
                                        read_param_array(params, func.entry["params"]), None)[0]

    def cuLaunchKernelEx(self, fn: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                         shared: int, stream: int, params: int, extra: int, pdl: int) -> int:
        """The C side read the launch config and its attributes (PDL only)."""
        func = self._obj(fn)
        if extra != 0 or params == 0:
            return CUresult.CUDA_ERROR_INVALID_VALUE
        return self.fake.launch_ex(func, (gx, gy, gz), (bx, by, bz), shared, self._stream(stream),
                                   read_param_array(params, func.entry["params"]), None, bool(pdl))[0]

    def cuStreamCreate(self, pstream: int, flags: int) -> int:
        return self._handle_out(pstream, self.fake.cuStreamCreate(flags))

    def cuStreamDestroy(self, stream: int) -> int:
        return self.fake.cuStreamDestroy(self.handles.pop(stream))[0]

    def cuStreamSynchronize(self, stream: int) -> int:
        return self.fake.cuStreamSynchronize(self._stream(stream))[0]

    def cuCtxSynchronize(self) -> int:
        return self.fake.cuCtxSynchronize()[0]

    def cuStreamBeginCapture(self, stream: int, mode: int) -> int:
        if mode not in (0, 1, 2):
            return CUresult.CUDA_ERROR_INVALID_VALUE
        return self.fake.cuStreamBeginCapture(self._stream(stream), mode)[0]

    def cuStreamEndCapture(self, stream: int, pgraph: int) -> int:
        return self._handle_out(pgraph, self.fake.cuStreamEndCapture(self._stream(stream)))

    def cuGraphInstantiate(self, pexec: int, graph: int, flags: int) -> int:
        return self._handle_out(pexec, self.fake.cuGraphInstantiate(self._obj(graph), flags))

    def cuGraphLaunch(self, exec_: int, stream: int) -> int:
        return self.fake.cuGraphLaunch(self._obj(exec_), self._stream(stream))[0]

    def cuGraphExecDestroy(self, exec_: int) -> int:
        return self.fake.cuGraphExecDestroy(self.handles.pop(exec_))[0]

    def cuGraphDestroy(self, graph: int) -> int:
        return self.fake.cuGraphDestroy(self.handles.pop(graph))[0]

    def cuEventCreate(self, pevent: int, flags: int) -> int:
        h = self._handle("event")
        self.events[h] = 0.0
        _put(pevent, "<Q", h)
        return 0

    def cuEventRecord(self, event: int, stream: int) -> int:
        """The event completes when the stream's queued work before it has run."""
        if event not in self.events:
            return CUresult.CUDA_ERROR_INVALID_HANDLE
        if self.fake.sticky is not None:
            return self.fake.sticky

        def reached() -> None:
            self.events[event] = time.perf_counter()
        return self.fake.enqueue_host(self._stream(stream), reached)

    def cuEventSynchronize(self, event: int) -> int:
        if event not in self.events:
            return CUresult.CUDA_ERROR_INVALID_HANDLE
        return self.fake.cuCtxSynchronize()[0]

    def cuEventDestroy(self, event: int) -> int:
        self.events.pop(event)
        return 0

    def cuEventElapsedTime(self, pms: int, start: int, end: int) -> int:
        _put(pms, "<f", (self.events[end] - self.events[start]) * 1e3)
        return 0


_installed: tuple | None = None


def fake_from_env(env: dict | None = None) -> FakeDriver:
    """The fake device the environment asks for:

    UKGPU_CUDA_STUB_FAIL="cuModuleLoadData=CUDA_ERROR_INVALID_IMAGE,..."  calls that fail;
        "cuGraphLaunch=CUDA_ERROR_LAUNCH_FAILED@3": from its 3rd call on (a launch failure or an
        illegal address then fails every later call, as a lost context does)
    UKGPU_CUDA_STUB_CC="8.0"            the device's compute capability (default 9.0)
    UKGPU_CUDA_STUB_DEVICES="0"         how many devices the driver sees (default 1)
    UKGPU_CUDA_STUB_MEM_MIB="512"       device memory (default 4096)
    UKGPU_CUDA_STUB_DRIVER="12080"      the version cuDriverGetVersion reports (default 13000)
    UKGPU_CUDA_STUB_PINNED="1"          async host sources are read when the copy runs (DMA)
    UKGPU_CUDA_STUB_EMULATE="0"         launches are checked and traced, not computed
    """
    env = os.environ if env is None else env
    spec = dict(item.split("=", 1) for item in env.get("UKGPU_CUDA_STUB_FAIL", "").split(",") if item)
    fail = {call: err for call, err in spec.items() if "@" not in err}
    major, minor = (int(x) for x in env.get("UKGPU_CUDA_STUB_CC", "9.0").split("."))
    count = int(env.get("UKGPU_CUDA_STUB_DEVICES", "1"))
    mem = int(env.get("UKGPU_CUDA_STUB_MEM_MIB", "4096")) << 20
    name = f"NVIDIA stand-in sm_{major}{minor} (libcuda stub)"
    devices = [FakeDevice(name=name, cc=(major, minor), total_bytes=mem) for _ in range(count)]
    return FakeDriver(devices=devices, fail=fail,
                      driver_version=int(env.get("UKGPU_CUDA_STUB_DRIVER", "13000")),
                      pinned_sources=env.get("UKGPU_CUDA_STUB_PINNED", "0") == "1",
                      emulate=env.get("UKGPU_CUDA_STUB_EMULATE", "1") != "0")


def install(lib_dir: Path | None = None, fake: FakeDriver | None = None) -> StubDispatch:
    """Load the stub libcuda.so.1 (the one on LD_LIBRARY_PATH) and route it to a FakeDriver."""
    global _installed
    if _installed is not None and fake is None:
        return _installed[1]  # once per process (sitecustomize may have done it already)
    lib_dir = Path(lib_dir or os.environ["UKGPU_CUDA_STUB"])
    lib = ctypes.CDLL(str(build(lib_dir)))
    fake = fake or fake_from_env()
    lib.ukgpu_stub_set_driver_version(fake.driver_version)
    dispatch = StubDispatch(fake)
    for item in os.environ.get("UKGPU_CUDA_STUB_FAIL", "").split(","):
        call, _, err = item.partition("=")
        if "@" in err:
            name, nth = err.split("@")
            dispatch.fail_from[call] = (int(nth), int(CUresult[name]))
    callback = DISPATCH(dispatch)
    lib.ukgpu_stub_set_dispatch(callback)
    _installed = (lib, dispatch, callback)  # the callback must outlive every driver call
    return dispatch
