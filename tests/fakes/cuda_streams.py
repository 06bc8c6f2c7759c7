"""Streams, graphs and the lost context of the stand-in driver (`cuda_driver.FakeDriver`).

The rules, as the CUDA driver documents them and as hardware behaves:

- Queued execution.  Kernel launches, memsets, device-to-device copies, host-to-device async
  copies and the nodes of a launched graph are appended to their stream's queue and run only when
  something waits for them: `cuStreamSynchronize` (the legacy NULL stream's sync also waits for
  every blocking stream), `cuCtxSynchronize` (all streams), `cuMemFree` (the driver waits for the
  device before it frees), and a blocking copy: `cuMemcpyHtoD`/`cuMemcpyDtoH` wait for the legacy
  NULL stream and the blocking streams (flags 0) but NOT for a CU_STREAM_NON_BLOCKING stream;
  `cuMemcpyDtoHAsync` into pageable memory (all host memory here is pageable) waits for its own
  stream, then copies before returning.  Launch-time argument errors (block size, parameter
  types, grid limits, shared memory opt-in) are returned by the launch itself.
- Faults.  A kernel that reads or writes outside every allocation, inside a freed one, or at an
  address its vector loads cannot use (a pointer parameter off its manifest `divisibility`, an
  element off its type's alignment) does not fail its launch: the sync that runs it returns
  CUDA_ERROR_ILLEGAL_ADDRESS (CUDA_ERROR_MISALIGNED_ADDRESS for alignment), the queued work of
  every stream is dropped, and from then on every call that touches the context returns the
  same error (calls that release something still release it), as a lost context does.  The
  error carries no kernel name; `last_fault` names it for tests.  `reset()` (or a new driver) is
  the fresh context (cuDevicePrimaryCtxReset).
- Host sources of async copies.  `cuMemcpyHtoDAsync` from pageable memory stages the source at
  the call ("host memory is copied to a staging buffer immediately") and the device gets the
  staged bytes.  When the copy runs, the source is read again through /proc/self/mem (freed
  memory cannot crash the reader: an unmapped page is an EIO) and every difference is appended to
  `async_source_changes`: on a pinned-memory path that copy would have moved other bytes.  With
  `pinned_sources=True` the copy moves the bytes it reads at execution (DMA semantics; an
  unreadable source is a fault), so a test can show that the product keeps a source alive and
  unchanged until its copy ran.  The staging default is what the product gets from numpy arrays.
- Capture.  A call a real driver refuses while a stream captures (synchronizing the capturing
  stream, a pageable copy on the capturing stream, and -- in GLOBAL mode from any thread, in
  THREAD_LOCAL mode from the capturing thread -- a blocking copy, cuMemAlloc/cuMemFree,
  cuCtxSynchronize; a sync of another stream only in GLOBAL mode) returns
  CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates the capture, as does a failed launch
  into it: later work on that stream returns CUDA_ERROR_STREAM_CAPTURE_INVALIDATED and
  `cuStreamEndCapture` returns that error and no graph.  Graphs and executable graphs stay in
  `live_graphs` / `live_execs` until destroyed, so a test can assert that nothing leaked.
  Module loading inside a capture is allowed here (unverified on hardware).
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any


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
    CUDA_ERROR_ILLEGAL_STATE = 401
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_NOT_READY = 600
    CUDA_ERROR_ILLEGAL_ADDRESS = 700
    CUDA_ERROR_MISALIGNED_ADDRESS = 716
    CUDA_ERROR_LAUNCH_FAILED = 719
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901


OK = CUresult.CUDA_SUCCESS
GLOBAL, THREAD_LOCAL, RELAXED = 0, 1, 2  # CUstreamCaptureMode
# Calls that still answer after the context is lost (they do not touch it), and the number of
# values each other call returns besides its error (for the error tuple of a lost context).
NO_CONTEXT = frozenset({"cuGetErrorName", "cuGetErrorString", "cuInit", "cuDriverGetVersion",
                        "cuDeviceGet", "cuDeviceGetCount", "cuDeviceGetAttribute",
                        "cuDeviceGetName", "cuDeviceGetPCIBusId", "cuDeviceTotalMem",
                        "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease", "cuCtxSetCurrent"})
RELEASES = frozenset({"cuMemFree", "cuGraphDestroy", "cuGraphExecDestroy", "cuStreamDestroy"})
N_VALUES = {"cuMemAlloc": 1, "cuMemGetInfo": 2, "cuStreamCreate": 1, "cuModuleLoadData": 1,
            "cuModuleLoadDataEx": 1, "cuModuleGetFunction": 1, "cuStreamEndCapture": 1,
            "cuGraphInstantiate": 1}


@dataclass(eq=False)
class _Stream:
    flags: int = 0  # 0: blocking (waits for the legacy NULL stream), 1: non-blocking
    null: bool = False  # the legacy NULL stream (handle 0)
    capture: list | None = None  # recorded nodes while capturing
    capture_mode: int = THREAD_LOCAL
    capture_thread: int = 0
    capture_invalid: bool = False


@dataclass(eq=False)
class _Graph:
    nodes: list = field(default_factory=list)


@dataclass
class SourceChange:
    """A pageable host source whose bytes differed at execution from those staged at the call."""

    dst: int
    src: int
    nbytes: int
    readable: bool  # False: the source page was unmapped (freed) when the copy ran


class Fault(Exception):
    """A node that faults at execution: the context is lost with `code`."""

    def __init__(self, code: CUresult, what: str):
        super().__init__(what)
        self.code = code


def in_context(fn: Any) -> Any:
    """Calls that need a current context fail in a thread that has not made one current."""
    def call(self: Any, *args: Any) -> tuple:
        if getattr(self._thread, "ctx", None) is None:
            return (CUresult.CUDA_ERROR_INVALID_CONTEXT, None)
        return fn(self, *args)
    call.__name__, call.__wrapped__ = fn.__name__, fn
    return call


_MEM_FD: list[int] = []


def read_host(addr: int, nbytes: int) -> bytes | None:
    """`nbytes` of this process's memory at `addr`, or None where a page is unmapped."""
    if not _MEM_FD:
        _MEM_FD.append(os.open("/proc/self/mem", os.O_RDONLY))
    try:
        data = os.pread(_MEM_FD[0], nbytes, addr)
    except (OSError, OverflowError):
        return None
    return data if len(data) == nbytes else None


class StreamsAndGraphs:
    """The queue, capture and lost-context half of FakeDriver (see the module docstring)."""

    pinned_sources: bool
    _thread: threading.local

    def _init_streams(self) -> None:
        self.null_stream = _Stream(null=True)
        self.streams: list[_Stream] = []
        self._pending: list[tuple[_Stream, tuple]] = []  # (stream, node) in issue order
        self.sticky: CUresult | None = None
        self.last_fault = ""
        self.live_graphs: set[_Graph] = set()
        self.live_execs: set[_Graph] = set()
        self.async_source_changes: list[SourceChange] = []
        self.graph_launches = 0
        self.graph_kernel_runs = 0

    def _run(self, node: tuple) -> None:  # FakeDriver: runs one node, raising Fault
        raise NotImplementedError

    # --- queue -----------------------------------------------------------------
    def _stream(self, stream: Any) -> _Stream:
        return self.null_stream if stream is None else stream

    def _enqueue(self, stream: Any, node: tuple) -> CUresult:
        s = self._stream(stream)
        if s.capture is not None:
            if s.capture_invalid:
                return CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            s.capture.append(node)
        else:
            self._pending.append((s, node))
        return OK

    def _waited_by(self, stream: _Stream | None) -> set[_Stream]:
        """The streams whose queued work a wait on `stream` covers (None: every stream)."""
        if stream is None:
            return {self.null_stream, *self.streams}
        if stream.null:
            return {self.null_stream, *(s for s in self.streams if s.flags == 0)}
        return {stream, self.null_stream} if stream.flags == 0 else {stream}

    def _flush(self, stream: _Stream | None) -> CUresult:
        """Run the queued work a wait on `stream` covers; a fault loses the context."""
        if self.sticky is not None:
            return self.sticky
        covered = self._waited_by(stream)
        due = [node for s, node in self._pending if s in covered]
        self._pending = [(s, node) for s, node in self._pending if s not in covered]
        for node in due:  # running a node never queues another
            try:
                self._run(node)
            except Fault as fault:
                self.last_fault = str(fault)
                self.sticky = fault.code
                self._pending.clear()
                return fault.code
        return OK

    def _unsafe(self, stream: _Stream | None = None, wait: bool = False) -> CUresult | None:
        """A call a capture forbids: invalidate the captures it offends and return the error.
        `stream`: the stream the call waits on or copies through (None: no stream).  `wait`: a
        stream sync, which only a GLOBAL capture forbids on a stream other than its own;
        allocations and blocking copies offend THREAD_LOCAL captures of the calling thread too."""
        me, bad = threading.get_ident(), None
        for s in [self.null_stream, *self.streams]:
            if s.capture is None:
                continue
            offends = (s is stream or s.capture_mode == GLOBAL
                       or (not wait and s.capture_mode == THREAD_LOCAL and s.capture_thread == me))
            if offends:
                s.capture_invalid = True
                bad = CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
        return bad

    def guarded(self, name: str, fn: Any) -> Any:
        """Call `name` (the bound `fn`), or, once the context is lost, return the loss (see
        NO_CONTEXT, RELEASES).  Checked at each call: callers may keep the function."""
        @functools.wraps(fn)
        def call(*args: Any) -> tuple:
            sticky = self.sticky
            if sticky is None:
                return fn(*args)
            if name in RELEASES:
                self.sticky = None  # release the handle, then report the loss
                try:
                    fn(*args)
                finally:
                    self.sticky = sticky
            return (sticky,) + (None,) * N_VALUES.get(name, 0)
        return call

    def reset(self) -> None:
        """A fresh context (cuDevicePrimaryCtxReset): queues, captures, loss and memory cleared."""
        self._pending.clear()
        self.sticky = None
        for s in [self.null_stream, *self.streams]:
            s.capture, s.capture_invalid = None, False
        self.live_graphs.clear()
        self.live_execs.clear()
        self.allocs.clear()  # type: ignore[attr-defined]
        self.weight_cache.clear()  # type: ignore[attr-defined]

    # --- streams and syncs ---------------------------------------------------------
    @in_context
    def cuStreamCreate(self, flags: int) -> tuple:
        stream = _Stream(flags=int(flags) & 1)
        self.streams.append(stream)
        return OK, stream

    @in_context
    def cuStreamDestroy(self, stream: _Stream) -> tuple:
        if stream not in self.streams:
            return (CUresult.CUDA_ERROR_INVALID_HANDLE,)
        err = self._flush(stream)  # its queued work still completes
        self.streams.remove(stream)
        return (err,)

    @in_context
    def cuStreamSynchronize(self, stream: Any) -> tuple:
        s = self._stream(stream)
        bad = self._unsafe(s, wait=True)
        return (bad,) if bad is not None else (self._flush(s),)

    @in_context
    def cuCtxSynchronize(self) -> tuple:
        bad = self._unsafe(None)
        if bad is None and any(s.capture is not None for s in self.streams):
            bad = CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED  # waits on a capturing stream
        return (bad,) if bad is not None else (self._flush(None),)

    def enqueue_host(self, stream: Any, fn: Any) -> CUresult:
        """A host callback in stream order (cuLaunchHostFunc; the libcuda stub's events)."""
        return self._enqueue(stream, ("host", fn))

    # --- capture and graphs --------------------------------------------------------
    @in_context
    def cuStreamBeginCapture(self, stream: Any, mode: int) -> tuple:
        s = self._stream(stream)
        if s.null:
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        if s.capture is not None:
            return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
        s.capture, s.capture_mode, s.capture_invalid = [], int(mode), False
        s.capture_thread = threading.get_ident()
        return (OK,)

    @in_context
    def cuStreamEndCapture(self, stream: Any) -> tuple:
        s = self._stream(stream)
        if s.capture is None:
            return CUresult.CUDA_ERROR_ILLEGAL_STATE, None
        nodes, invalid = s.capture, s.capture_invalid
        s.capture, s.capture_invalid = None, False
        if invalid:
            return CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, None
        graph = _Graph(nodes)
        self.live_graphs.add(graph)
        return OK, graph

    @in_context
    def cuGraphInstantiate(self, graph: _Graph, flags: int) -> tuple:
        if graph not in self.live_graphs:
            return CUresult.CUDA_ERROR_INVALID_VALUE, None
        exec_ = _Graph(list(graph.nodes))
        self.live_execs.add(exec_)
        return OK, exec_

    @in_context
    def cuGraphLaunch(self, exec_: _Graph, stream: Any) -> tuple:
        if exec_ not in self.live_execs:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        s = self._stream(stream)
        if s.capture is not None and s.capture_invalid:
            return (CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,)
        self.graph_launches += s.capture is None
        for node in exec_.nodes:
            self._enqueue(s, ("graph", node))
        return (OK,)

    def cuGraphDestroy(self, graph: _Graph) -> tuple:
        if graph not in self.live_graphs:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.live_graphs.discard(graph)
        return (OK,)

    def cuGraphExecDestroy(self, exec_: _Graph) -> tuple:
        if exec_ not in self.live_execs:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.live_execs.discard(exec_)  # launches already queued keep their nodes
        return (OK,)


def host_bytes(addr: int, nbytes: int) -> bytes:
    """Bytes of a live host buffer at the call (the caller vouches that it is mapped)."""
    return ctypes.string_at(addr, nbytes)
