"""Kernel modules from the `ptx_kernels` manifests, loaded and launched as the manifest says.

`KernelSet.kernel(name)` picks the artifact for the device (the cubin built for its exact
architecture, else PTX the driver JITs; `ptx_kernels.loader.Manifests.candidates`; or one
target's PTX when `force_ptx` asks for it), loads it once, and raises the dynamic shared memory
limit when the kernel needs more than `loader.STATIC_SHARED_LIMIT` (48 KiB).  A PTX JIT failure
carries the JIT's error log.  `launch(name, values)` packs the arguments in the manifest's
parameter order with the loader's parameter types (hidden trailing scratch pointers = 0), checks
the kernel's limits and launches on the context's stream: nothing about a kernel is written down
twice.  The manifest's grid and limit expressions are evaluated once per distinct set of scalar
arguments.  The backend, `ukgpu verify`, the GPU tests and the kernel benchmarks all launch
through this one class.

Faults: a kernel that faults does not fail its launch; the next call that waits for the stream
reports it, names no kernel, and the context is lost (`driver.STICKY`).  With `UKGPU_CUDA_SYNC=1`
in the environment when the set is made (or `sync=True`), every eager launch waits for the
stream, so a fault is raised as a `CudaError` naming the kernel and its grid (slow: a debugging
mode; launches recorded into a graph never wait).  `ukgpu verify` always launches this way.

Programmatic dependent launch (PDL): on sm_90 and newer, a kernel whose manifest entry says
`pdl` (compiled with the gate of `ptx_kernels/pdl.py`) is launched with `cuLaunchKernelEx` and
the programmatic-stream-serialization attribute, so its launch and prologue overlap the tail of
the kernel before it; a graph captured from such launches keeps the overlap (programmatic edges).
`UKGPU_PDL=0` in the environment when the set is made launches every kernel plainly.  A driver
that refuses the attribute turns it off for the set (said once on stderr, `pdl_off` says why) and
the launch is made again without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from ukgpu.gpu.cuda.driver import NAMED_HINT, STICKY_HINT, SYNC_ENV, CudaContext, CudaError
from ukgpu.ptx_kernels.loader import STATIC_SHARED_LIMIT, Artifact, Entry, KernelManifestError, Manifests

JIT_LOG_BYTES = 8192
PDL_ENV = "UKGPU_PDL"
# what a driver says of an image it cannot use (too new, wrong arch, no JIT): try the next one
REFUSED_IMAGE = frozenset({"CUDA_ERROR_NO_BINARY_FOR_GPU", "CUDA_ERROR_INVALID_IMAGE",
                           "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "CUDA_ERROR_INVALID_PTX",
                           "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "CUDA_ERROR_INVALID_SOURCE"})


@dataclass
class LoadedKernel:
    entry: Entry
    artifact: Artifact
    function: Any
    plans: dict = field(default_factory=dict)  # scalar values -> (grid, block, shared bytes)
    configs: dict = field(default_factory=dict)  # scalar values -> (stream, CUlaunchConfig), PDL

    def __post_init__(self) -> None:
        params = self.entry.params
        self.pointers = [p for p in params if p.is_pointer and not p.hidden]
        self.checked = [(p.name, p.divisibility) for p in self.pointers if p.divisibility]
        self.required = [p.name for p in self.pointers if not p.unused]
        self.pointer_names = frozenset(p.name for p in self.pointers)
        self.visible = [p.name for p in params if not p.hidden]
        self.hidden = (0,) * sum(p.hidden for p in params)  # trailing scratch pointers: 0
        # plan key: the scalar params' values in order (pointers never change a grid or limit)
        self.scalars = [p.name for p in params if not p.is_pointer]
        self.names = frozenset(p.name for p in params)
        self.pdl = self.entry.pdl  # this artifact's code opens with the PDL gate


class PackedParams:
    """One kernel's `void **kernelParams` for cuLaunchKernel, filled by one `struct.pack_into`:
    each parameter in its own 8-byte slot of `data`, `ptrs` pointing at the slots.  The driver
    copies the values at the launch (a graph capture copies them into the node), so a thread's
    one array serves all its launches of the kernel.  cuda-python packs a (values, types) tuple
    itself on every call: slower (tests/perf/launch_host_cost.py)."""

    SLOT = {"ptr": "Q", "i32": "i4x", "fp32": "f4x"}  # little-endian, as the GPU's ABI

    def __init__(self, entry: Entry):
        n = len(entry.params)
        self.struct = struct.Struct("<" + "".join(
            self.SLOT["ptr" if p.is_pointer else p.type] for p in entry.params))
        self.data = ctypes.create_string_buffer(8 * max(n, 1))
        base = ctypes.addressof(self.data)
        self.ptrs = (ctypes.c_void_p * max(n, 1))(*[base + 8 * i for i in range(n)])
        self.address = ctypes.addressof(self.ptrs)

    def pack(self, args: tuple) -> int:
        self.struct.pack_into(self.data, 0, *args)
        return self.address


def _read_image(art: Artifact) -> bytes:
    try:
        data = art.path.read_bytes()
    except OSError as exc:
        raise CudaError("read kernel image", "KERNEL_FILE_MISSING",
                        f"{art.path} is missing: run `ukgpu ptx build`", detail=str(exc)) from exc
    return data + b"\0" if art.kind == "ptx" else data  # PTX must be NUL-terminated


class KernelSet:
    """Loaded kernels of one device, by manifest entry name."""

    def __init__(self, ctx: CudaContext, manifests: Manifests | None = None,
                 force_ptx: str | None = None, sync: bool | None = None):
        """force_ptx: a target ("sm_80") whose PTX is JIT-compiled instead of the best artifact
        (verify uses it to check the portable fallback on a GPU that has a cubin).  sync: wait
        after every eager launch (None: as the environment's UKGPU_CUDA_SYNC says, read here)."""
        self.ctx = ctx
        self.sync = os.environ.get(SYNC_ENV, "") not in ("", "0") if sync is None else sync
        self.cu = ctx.cu
        self.manifests = manifests or Manifests.load()
        self.force_ptx = force_ptx
        self.loaded: dict[str, LoadedKernel] = {}
        self._packed = threading.local()  # per thread: entry name -> PackedParams
        self.fell_back = False  # some kernel's best artifact was refused (said once on stderr)
        self.pdl_off = self._pdl_off()  # why kernels are not launched with PDL ("" when they are)

    @property
    def pdl(self) -> bool:
        return not self.pdl_off

    def _pdl_off(self) -> str:
        if os.environ.get(PDL_ENV, "") == "0":
            return f"{PDL_ENV}=0"
        if tuple(self.ctx.info.cc) < (9, 0):
            return f"sm_{self.ctx.info.cc[0]}{self.ctx.info.cc[1]} has no programmatic dependent launch"
        if not hasattr(self.cu, "cuLaunchKernelEx"):
            return "the driver bindings lack cuLaunchKernelEx"
        return ""

    @contextlib.contextmanager
    def plain_launches(self, reason: str) -> Any:
        """Every launch inside the block is plain (`pdl_off` says `reason`); PDL is as it was
        after it."""
        before, self.pdl_off = self.pdl_off, self.pdl_off or reason
        try:
            yield
        finally:
            self.pdl_off = before

    def disable_pdl(self, reason: str) -> None:
        """Launch every kernel plainly from now on (a driver refused the attribute)."""
        if self.pdl:
            self.pdl_off = reason
            print(f"ukgpu: programmatic dependent launch off ({reason}); kernels launch one after "
                  "another", file=sys.stderr)

    def kernel(self, name: str) -> LoadedKernel:
        if name not in self.loaded:
            self.ctx.ensure_current()
            self.loaded[name] = self._load(name)
        return self.loaded[name]

    def preload(self, names: list[str]) -> None:
        for name in names:
            self.kernel(name)

    def _load(self, name: str) -> LoadedKernel:
        """The first artifact of `name` the driver accepts, best first (exact cubin, then PTX):
        a cubin or PTX the driver refuses falls through to the next one, once, with a line on
        stderr; every other failure (memory, a lost context) is raised at once."""
        if self.force_ptx:
            forced = self.manifests.entry(name, self.force_ptx)
            arts = [Artifact(self.force_ptx, "ptx",
                             forced.build_dir / forced.data["artifacts"]["ptx"]["file"])]
        else:
            arts = self.manifests.candidates(name, self.ctx.info.cc)
        refused: list[CudaError] = []
        for art in arts:
            try:
                module = self._load_module(art)
            except CudaError as exc:
                if exc.name in REFUSED_IMAGE and art is not arts[-1]:
                    refused.append(exc)
                    continue
                if not refused:
                    raise
                before = "; ".join(f"{e.detail}: {e.name}" for e in refused)
                raise CudaError(exc.call, exc.name, exc.hint,
                                detail=f"{exc.detail}; refused before it: {before}") from exc
            if refused and not self.fell_back:
                self.fell_back = True
                print(f"ukgpu: the driver refused {refused[0].detail} ({refused[0].name}); using "
                      f"{art.target} {art.kind} instead (first seen for {name})", file=sys.stderr)
            return self._function(name, art, module)
        raise AssertionError("unreachable: the last artifact raises")

    def _load_module(self, art: Artifact) -> Any:
        image = _read_image(art)
        if art.kind == "ptx":
            return self._load_ptx(image, art)
        try:
            return self.cu.cuModuleLoadData(image)
        except CudaError as exc:
            raise CudaError(exc.call, exc.name, exc.hint, detail=f"{art.target} cubin") from exc

    def _function(self, name: str, art: Artifact, module: Any) -> LoadedKernel:
        entry = self.manifests.entry(name, art.target)
        fn = self.cu.cuModuleGetFunction(module, entry.kernel_name.encode())
        if entry.shared_bytes > STATIC_SHARED_LIMIT:
            attr = self.cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.cu.cuFuncSetAttribute(fn, attr, entry.shared_bytes)
        return LoadedKernel(entry, art, fn)

    def _load_ptx(self, image: bytes, art: Artifact) -> Any:
        """JIT the PTX with an error log buffer, so a failure says what ptxas said."""
        opt = self.cu.CUjit_option
        log = bytearray(JIT_LOG_BYTES)
        try:
            return self.cu.cuModuleLoadDataEx(
                image, 2, [opt.CU_JIT_ERROR_LOG_BUFFER, opt.CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES],
                [log, JIT_LOG_BYTES])
        except TypeError:  # bindings that will not take a writable log buffer: load without it
            return self.cu.cuModuleLoadData(image)
        except CudaError as exc:
            text = bytes(log).split(b"\0", 1)[0].decode(errors="replace").strip()
            raise CudaError(exc.call, exc.name, exc.hint,
                            detail=f"{art.path.name}" + (f"; JIT log: {text[:600]}" if text else "")
                            ) from exc

    def launch(self, name: str, values: dict, stream: Any = None, sync: bool | None = None
               ) -> None:
        """Launch entry `name` with `values` (every visible param by name + grid-only sizes).

        Grid and limits depend only on the scalar values: the manifest's expressions are
        evaluated once per distinct set of them; pointers are checked on every launch.
        sync: wait for the kernel and name it if it faulted (None: the set's `sync`; a launch
        recorded into a graph must pass False)."""
        self.ctx.ensure_current()
        k = self.loaded.get(name) or self.kernel(name)
        key = tuple([values.get(n) for n in k.scalars])
        if not k.names.issuperset(values):  # grid-only sizes too
            key += tuple(sorted((n, v) for n, v in values.items() if n not in k.pointer_names))
        plan = k.plans.get(key)
        if plan is None:
            launch = k.entry.launch(values)  # every limit, alignment and missing value
            plan = k.plans[key] = (launch.grid, launch.block, launch.shared_bytes)
        else:
            self._check_pointers(k, values)
        grid, block, shared = plan
        try:
            args = tuple([values.get(n, 0) for n in k.visible]) + k.hidden
            params = self._packer(k).pack(args)
        except struct.error as exc:  # a value its slot cannot hold (caught by the limits first)
            raise KernelManifestError(f"{name}: launch values do not fit the parameters: {exc}") from exc
        stream = stream if stream is not None else self.ctx.stream
        try:
            if k.pdl and not self.pdl_off:
                try:
                    self._launch_pdl(k, key, plan, stream, params)
                except CudaError as exc:
                    if exc.sticky:
                        raise
                    # the attribute or the launch? the same launch without it tells (inside a
                    # graph capture the refusal ended the capture: that is reported as it is)
                    try:
                        self.cu.cuLaunchKernel(k.function, *grid, *block, shared, stream, params, 0)
                    except CudaError:
                        raise exc from None
                    self.disable_pdl(f"{exc.call} refused {name}: {exc.name}")
            else:
                self.cu.cuLaunchKernel(k.function, *grid, *block, shared, stream, params, 0)
        except CudaError as exc:
            if not exc.sticky:  # this launch was refused (grid, arguments, resources)
                raise CudaError(exc.call, exc.name, exc.hint,
                                detail=f"kernel {name}, grid {grid}") from exc
            raise CudaError(exc.call, exc.name, STICKY_HINT,  # earlier work faulted
                            detail=f"reported at the launch of {name}; the fault is in work "
                                   "queued before it") from exc
        if self.sync if sync is None else sync:
            self._wait(name, grid, stream)

    def _launch_pdl(self, k: LoadedKernel, key: tuple, plan: tuple, stream: Any, params: int) -> None:
        """cuLaunchKernelEx with the programmatic-stream-serialization attribute; one launch
        config per plan and stream, made once."""
        made = k.configs.get(key)
        if made is None or made[0] is not stream:
            made = k.configs[key] = (stream, self._config(plan, stream))
        self.cu.cuLaunchKernelEx(made[1], k.function, params, 0)

    def _config(self, plan: tuple, stream: Any) -> Any:
        cu = self.cu
        (gx, gy, gz), (bx, by, bz), shared = plan
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg = cu.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = gx, gy, gz
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = bx, by, bz
        cfg.sharedMemBytes, cfg.hStream = shared, stream
        cfg.attrs, cfg.numAttrs = [attr], 1
        return cfg

    def _packer(self, k: LoadedKernel) -> PackedParams:
        packed = self._packed.__dict__
        p = packed.get(k.entry.name)
        if p is None:
            p = packed[k.entry.name] = PackedParams(k.entry)
        return p

    def _wait(self, name: str, grid: tuple, stream: Any) -> None:
        """Wait for the kernel just launched; a fault is raised naming it."""
        try:
            self.cu.cuStreamSynchronize(stream)
        except CudaError as exc:
            raise CudaError(exc.call, exc.name, NAMED_HINT if exc.sticky else exc.hint,
                            detail=f"kernel {name}, grid {grid}, waited for right after its "
                                   "launch") from exc

    @staticmethod
    def _check_pointers(k: LoadedKernel, values: dict) -> None:
        for n in k.required:
            if n not in values:
                raise KernelManifestError(f"{k.entry.name}: missing launch value {n!r}")
        for n, div in k.checked:
            if values.get(n, 0) % div:
                raise KernelManifestError(f"{k.entry.name}: {n} % {div} == 0 (got {values[n]:#x})")

    def describe(self) -> list[dict]:
        """What was loaded: entry, target, cubin or PTX."""
        return [{"entry": n, "target": k.artifact.target, "kind": k.artifact.kind,
                 "pdl": k.pdl and not self.pdl_off} for n, k in sorted(self.loaded.items())]
