"""Minimal driver-API runner for the manifest's kernels (cuda-python only, no Triton, no torch).

Used by the GPU tests and the benchmark; it shows the whole launch path a CUDA backend needs:

    run = CudaRunner()                            # cuInit, primary context of device 0
    buf = run.upload(np_array); out = run.empty(nbytes)
    run.launch("matvec_q8_0_b1", {"w_q": buf, ..., "N": n, "K": k, "B": 1})
    run.sync(); run.download(out, like=np_array)

`cuda.bindings` is imported when a runner is created, never at module import.
"""

from __future__ import annotations

import numpy as np

from ukgpu.llama_core.errors import UkgpuError

from .loader import Artifact, Manifests


class CudaLaunchError(UkgpuError):
    """A CUDA driver call failed while loading or launching a kernel artifact."""


class CudaRunner:
    def __init__(self, device: int = 0, manifests: Manifests | None = None,
                 ptx_target: str | None = None, driver=None):
        """ptx_target: force that target's PTX (driver JIT) instead of the best artifact;
        driver: a stand-in for `cuda.bindings.driver` (hardware-free tests)."""
        if driver is None:
            from cuda.bindings import driver

        self.cu = driver
        self._ok(driver.cuInit(0), "cuInit (is the NVIDIA driver loaded?)")
        self.dev = self._ok(driver.cuDeviceGet(device), "cuDeviceGet")
        self.ctx = self._ok(driver.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self._ok(driver.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        attr = driver.CUdevice_attribute
        self.cc = tuple(
            self._ok(driver.cuDeviceGetAttribute(a, self.dev), "cuDeviceGetAttribute(compute capability)")
            for a in (attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                      attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
        self.manifests = manifests or Manifests.load()
        self._functions: dict[str, object] = {}
        self.loaded_kinds: dict[str, str] = {}  # entry -> "sm_90a/cubin" | "sm_80/ptx"
        self._allocs: list = []
        self.ptx_target = ptx_target

    def _ok(self, result, what: str):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.cu.cuGetErrorName(err)[1] if hasattr(self.cu, "cuGetErrorName") else err
            raise CudaLaunchError(f"{what} failed: {name}")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    # memory ------------------------------------------------------------------------------
    def empty(self, nbytes: int) -> int:
        ptr = self._ok(self.cu.cuMemAlloc(max(int(nbytes), 1)), f"cuMemAlloc({nbytes})")
        self._allocs.append(ptr)
        return int(ptr)

    def upload(self, arr: np.ndarray) -> int:
        arr = np.ascontiguousarray(arr)
        ptr = self.empty(arr.nbytes)
        self._ok(self.cu.cuMemcpyHtoD(ptr, arr, arr.nbytes), "cuMemcpyHtoD")
        return ptr

    def download(self, ptr: int, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        self._ok(self.cu.cuMemcpyDtoH(out, ptr, out.nbytes), "cuMemcpyDtoH")
        return out

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._ok(self.cu.cuMemcpyDtoD(dst, src, nbytes), "cuMemcpyDtoD")

    def free_all(self) -> None:
        for ptr in self._allocs:
            self.cu.cuMemFree(ptr)
        self._allocs.clear()

    # kernels -----------------------------------------------------------------------------
    def function(self, name: str):
        if name not in self._functions:
            art = self.manifests.select(name, self.cc)
            if self.ptx_target:
                entry = self.manifests.entry(name, self.ptx_target)
                ptx_file = entry.data["artifacts"]["ptx"]["file"]
                art = Artifact(self.ptx_target, "ptx", entry.build_dir / ptx_file)
            entry = self.manifests.entry(name, art.target)
            data = art.path.read_bytes() + (b"\0" if art.kind == "ptx" else b"")  # PTX: C string
            image = np.frombuffer(data, np.uint8)  # kept alive across the call; passed by address
            module = self._ok(self.cu.cuModuleLoadData(image.ctypes.data),
                              f"cuModuleLoadData({art.path.name})")
            fn = self._ok(self.cu.cuModuleGetFunction(module, entry.kernel_name.encode()),
                          f"cuModuleGetFunction({entry.kernel_name})")
            if entry.shared_bytes > 48 * 1024:
                attr = self.cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                self._ok(self.cu.cuFuncSetAttribute(fn, attr, entry.shared_bytes),
                         f"cuFuncSetAttribute({name}, {entry.shared_bytes} B shared)")
            self._functions[name] = (fn, entry)
            self.loaded_kinds[name] = f"{art.target}/{art.kind}"
        return self._functions[name]

    def launch(self, name: str, values: dict, stream=0) -> None:
        fn, entry = self.function(name)
        spec = entry.launch(values)
        self._ok(self.cu.cuLaunchKernel(fn, *spec.grid, *spec.block, spec.shared_bytes, stream,
                                        spec.ctypes_args(), 0), f"cuLaunchKernel({name})")

    def sync(self) -> None:
        self._ok(self.cu.cuCtxSynchronize(), "cuCtxSynchronize")

    # timing ------------------------------------------------------------------------------
    def time_ms(self, fn, iters: int = 20, warmup: int = 3) -> float:
        """Mean milliseconds per call of fn() (which enqueues work on the default stream)."""
        for _ in range(warmup):
            fn()
        start = self._ok(self.cu.cuEventCreate(0), "cuEventCreate")
        end = self._ok(self.cu.cuEventCreate(0), "cuEventCreate")
        self._ok(self.cu.cuEventRecord(start, 0), "cuEventRecord")
        for _ in range(iters):
            fn()
        self._ok(self.cu.cuEventRecord(end, 0), "cuEventRecord")
        self._ok(self.cu.cuEventSynchronize(end), "cuEventSynchronize")
        return self._ok(self.cu.cuEventElapsedTime(start, end), "cuEventElapsedTime") / iters
