/*
 * A stand-in libcuda.so.1 for machines without an NVIDIA driver.
 *
 * cuda-python's bindings dlopen("libcuda.so.1"), call cuDriverGetVersion and then resolve
 * every entry point through cuGetProcAddress_v2(name, version).  This library answers those
 * lookups with the C ABI of exactly the (name, version) pairs the bindings ask for, and each
 * entry point forwards its arguments, as 64-bit words, to one dispatch function that the test
 * process installs with ukgpu_stub_set_dispatch() (tests/cuda_stub/libcuda_stub.py, which runs
 * the fake device of tests/fakes/cuda_driver.py).  So the real bindings do all of their own argument
 * conversion and marshalling -- handles, buffers, kernel parameter arrays, JIT options -- and
 * only what happens below the C ABI is fake.
 *
 * Any entry point the bindings resolve that is not listed here is reported as not found, so a
 * call to it raises in Python instead of doing something silently.
 */
#include <stdint.h>
#include <string.h>

typedef int CUresult;
typedef int (*ukgpu_dispatch_fn)(const char *name, int nargs, const uint64_t *args);

static ukgpu_dispatch_fn dispatch_fn;
static int driver_version = 13000;

#define EXPORT __attribute__((visibility("default")))
#define W(x) ((uint64_t)(uintptr_t)(x))
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_NOT_FOUND 500

EXPORT void ukgpu_stub_set_dispatch(ukgpu_dispatch_fn fn) { dispatch_fn = fn; }
EXPORT void ukgpu_stub_set_driver_version(int version) { driver_version = version; }
/* null launches: cuLaunchKernel returns success at once without reaching the fake, so a timed
 * launch is what it costs the host above the driver (tests/perf/launch_host_cost.py); nothing
 * runs */
static int null_launch;
EXPORT void ukgpu_stub_set_null_launch(int on) { null_launch = on; }

static CUresult forward(const char *name, int nargs, const uint64_t *args) {
    if (!dispatch_fn) return CUDA_ERROR_NOT_INITIALIZED;
    return dispatch_fn(name, nargs, args);
}

#define FWD(name, ...)                                                  \
    do {                                                                \
        const uint64_t a_[] = {__VA_ARGS__};                            \
        return forward(name, (int)(sizeof(a_) / sizeof(a_[0])), a_);    \
    } while (0)

EXPORT CUresult cuDriverGetVersion(int *v) {
    if (!v) return 1;
    *v = driver_version;
    return 0;
}

static CUresult s_cuGetErrorName(int e, const char **s) { FWD("cuGetErrorName", W(e), W(s)); }
static CUresult s_cuGetErrorString(int e, const char **s) { FWD("cuGetErrorString", W(e), W(s)); }
static CUresult s_cuInit(unsigned flags) { FWD("cuInit", W(flags)); }
static CUresult s_cuDeviceGet(int *dev, int ordinal) { FWD("cuDeviceGet", W(dev), W(ordinal)); }
static CUresult s_cuDeviceGetCount(int *count) { FWD("cuDeviceGetCount", W(count)); }
static CUresult s_cuDeviceGetName(char *name, int len, int dev) {
    FWD("cuDeviceGetName", W(name), W(len), W(dev));
}
static CUresult s_cuDeviceTotalMem_v2(size_t *bytes, int dev) {
    FWD("cuDeviceTotalMem", W(bytes), W(dev));
}
static CUresult s_cuDeviceGetAttribute(int *value, int attr, int dev) {
    FWD("cuDeviceGetAttribute", W(value), W(attr), W(dev));
}
static CUresult s_cuDeviceGetPCIBusId(char *bus, int len, int dev) {
    FWD("cuDeviceGetPCIBusId", W(bus), W(len), W(dev));
}
static CUresult s_cuDevicePrimaryCtxRetain(void **ctx, int dev) {
    FWD("cuDevicePrimaryCtxRetain", W(ctx), W(dev));
}
static CUresult s_cuDevicePrimaryCtxRelease_v2(int dev) { FWD("cuDevicePrimaryCtxRelease", W(dev)); }
static CUresult s_cuCtxSetCurrent(void *ctx) { FWD("cuCtxSetCurrent", W(ctx)); }
static CUresult s_cuModuleLoadData(void **mod, const void *image) {
    FWD("cuModuleLoadData", W(mod), W(image));
}
static CUresult s_cuModuleLoadDataEx(void **mod, const void *image, unsigned n, int *options,
                                     void **values) {
    FWD("cuModuleLoadDataEx", W(mod), W(image), W(n), W(options), W(values));
}
static CUresult s_cuModuleUnload(void *mod) { FWD("cuModuleUnload", W(mod)); }
static CUresult s_cuModuleGetFunction(void **fn, void *mod, const char *name) {
    FWD("cuModuleGetFunction", W(fn), W(mod), W(name));
}
static CUresult s_cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    FWD("cuMemGetInfo", W(free_bytes), W(total));
}
static CUresult s_cuMemAlloc_v2(uint64_t *ptr, size_t bytes) { FWD("cuMemAlloc", W(ptr), W(bytes)); }
static CUresult s_cuMemFree_v2(uint64_t ptr) { FWD("cuMemFree", ptr); }
static CUresult s_cuMemcpyHtoD_v2(uint64_t dst, const void *src, size_t n) {
    FWD("cuMemcpyHtoD", dst, W(src), W(n));
}
static CUresult s_cuMemcpyDtoH_v2(void *dst, uint64_t src, size_t n) {
    FWD("cuMemcpyDtoH", W(dst), src, W(n));
}
static CUresult s_cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t n, void *stream) {
    FWD("cuMemcpyHtoDAsync", dst, W(src), W(n), W(stream));
}
static CUresult s_cuMemcpyDtoHAsync_v2(void *dst, uint64_t src, size_t n, void *stream) {
    FWD("cuMemcpyDtoHAsync", W(dst), src, W(n), W(stream));
}
static CUresult s_cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t n, void *stream) {
    FWD("cuMemcpyDtoDAsync", dst, src, W(n), W(stream));
}
static CUresult s_cuMemsetD32Async(uint64_t dst, unsigned value, size_t n, void *stream) {
    FWD("cuMemsetD32Async", dst, W(value), W(n), W(stream));
}
static CUresult s_cuStreamCreate(void **stream, unsigned flags) {
    FWD("cuStreamCreate", W(stream), W(flags));
}
static CUresult s_cuStreamBeginCapture_v2(void *stream, int mode) {
    FWD("cuStreamBeginCapture", W(stream), W(mode));
}
static CUresult s_cuStreamEndCapture(void *stream, void **graph) {
    FWD("cuStreamEndCapture", W(stream), W(graph));
}
static CUresult s_cuStreamSynchronize(void *stream) { FWD("cuStreamSynchronize", W(stream)); }
static CUresult s_cuStreamDestroy_v2(void *stream) { FWD("cuStreamDestroy", W(stream)); }
static CUresult s_cuCtxSynchronize(void) { return forward("cuCtxSynchronize", 0, NULL); }
static CUresult s_cuEventCreate(void **event, unsigned flags) {
    FWD("cuEventCreate", W(event), W(flags));
}
static CUresult s_cuEventRecord(void *event, void *stream) {
    FWD("cuEventRecord", W(event), W(stream));
}
static CUresult s_cuEventSynchronize(void *event) { FWD("cuEventSynchronize", W(event)); }
static CUresult s_cuEventDestroy_v2(void *event) { FWD("cuEventDestroy", W(event)); }
static CUresult s_cuEventElapsedTime_v2(float *ms, void *start, void *end) {
    FWD("cuEventElapsedTime", W(ms), W(start), W(end));
}
static CUresult s_cuFuncSetAttribute(void *fn, int attr, int value) {
    FWD("cuFuncSetAttribute", W(fn), W(attr), (uint64_t)(int64_t)value);
}
static CUresult s_cuLaunchKernel(void *fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                 unsigned by, unsigned bz, unsigned shared, void *stream,
                                 void **params, void **extra) {
    if (null_launch) return 0;
    FWD("cuLaunchKernel", W(fn), W(gx), W(gy), W(gz), W(bx), W(by), W(bz), W(shared), W(stream),
        W(params), W(extra));
}
/* cuda.h's CUlaunchConfig and CUlaunchAttribute (id, padding, then a 64-byte value union whose
 * first int is programmaticStreamSerializationAllowed for attribute 6): only PDL is read */
typedef struct {
    unsigned gx, gy, gz, bx, by, bz, shared;
    void *stream;
    const unsigned char *attrs;
    unsigned nattrs;
} launch_config;
#define LAUNCH_ATTRIBUTE_BYTES 72
#define PROGRAMMATIC_STREAM_SERIALIZATION 6
static CUresult s_cuLaunchKernelEx(const launch_config *c, void *fn, void **params, void **extra) {
    if (!c) return 1;
    uint64_t pdl = 0;
    for (unsigned i = 0; i < c->nattrs; i++) {
        int id, value;
        memcpy(&id, c->attrs + LAUNCH_ATTRIBUTE_BYTES * i, sizeof id);
        memcpy(&value, c->attrs + LAUNCH_ATTRIBUTE_BYTES * i + 8, sizeof value);
        if (id == PROGRAMMATIC_STREAM_SERIALIZATION && value) pdl = 1;
    }
    if (null_launch) return 0;
    FWD("cuLaunchKernelEx", W(fn), W(c->gx), W(c->gy), W(c->gz), W(c->bx), W(c->by), W(c->bz),
        W(c->shared), W(c->stream), W(params), W(extra), pdl);
}
static CUresult s_cuGraphInstantiateWithFlags(void **exec, void *graph, unsigned long long flags) {
    FWD("cuGraphInstantiate", W(exec), W(graph), (uint64_t)flags);
}
static CUresult s_cuGraphLaunch(void *exec, void *stream) { FWD("cuGraphLaunch", W(exec), W(stream)); }
static CUresult s_cuGraphExecDestroy(void *exec) { FWD("cuGraphExecDestroy", W(exec)); }
static CUresult s_cuGraphDestroy(void *graph) { FWD("cuGraphDestroy", W(graph)); }

/* (name, the version the bindings ask for, the implementation with that version's C ABI) */
static const struct {
    const char *name;
    int version;
    void *fn;
} table[] = {
    {"cuGetErrorName", 6000, (void *)s_cuGetErrorName},
    {"cuGetErrorString", 6000, (void *)s_cuGetErrorString},
    {"cuInit", 2000, (void *)s_cuInit},
    {"cuDriverGetVersion", 2020, (void *)cuDriverGetVersion},
    {"cuDeviceGet", 2000, (void *)s_cuDeviceGet},
    {"cuDeviceGetCount", 2000, (void *)s_cuDeviceGetCount},
    {"cuDeviceGetName", 2000, (void *)s_cuDeviceGetName},
    {"cuDeviceTotalMem", 3020, (void *)s_cuDeviceTotalMem_v2},
    {"cuDeviceGetAttribute", 2000, (void *)s_cuDeviceGetAttribute},
    {"cuDeviceGetPCIBusId", 4010, (void *)s_cuDeviceGetPCIBusId},
    {"cuDevicePrimaryCtxRetain", 7000, (void *)s_cuDevicePrimaryCtxRetain},
    {"cuDevicePrimaryCtxRelease", 11000, (void *)s_cuDevicePrimaryCtxRelease_v2},
    {"cuCtxSetCurrent", 4000, (void *)s_cuCtxSetCurrent},
    {"cuModuleLoadData", 2000, (void *)s_cuModuleLoadData},
    {"cuModuleLoadDataEx", 2010, (void *)s_cuModuleLoadDataEx},
    {"cuModuleUnload", 2000, (void *)s_cuModuleUnload},
    {"cuModuleGetFunction", 2000, (void *)s_cuModuleGetFunction},
    {"cuMemGetInfo", 3020, (void *)s_cuMemGetInfo_v2},
    {"cuMemAlloc", 3020, (void *)s_cuMemAlloc_v2},
    {"cuMemFree", 3020, (void *)s_cuMemFree_v2},
    {"cuMemcpyHtoD", 3020, (void *)s_cuMemcpyHtoD_v2},
    {"cuMemcpyDtoH", 3020, (void *)s_cuMemcpyDtoH_v2},
    {"cuMemcpyHtoDAsync", 3020, (void *)s_cuMemcpyHtoDAsync_v2},
    {"cuMemcpyDtoHAsync", 3020, (void *)s_cuMemcpyDtoHAsync_v2},
    {"cuMemcpyDtoDAsync", 3020, (void *)s_cuMemcpyDtoDAsync_v2},
    {"cuMemsetD32Async", 3020, (void *)s_cuMemsetD32Async},
    {"cuStreamCreate", 2000, (void *)s_cuStreamCreate},
    {"cuStreamBeginCapture", 10010, (void *)s_cuStreamBeginCapture_v2},
    {"cuStreamEndCapture", 10000, (void *)s_cuStreamEndCapture},
    {"cuStreamSynchronize", 2000, (void *)s_cuStreamSynchronize},
    {"cuStreamDestroy", 4000, (void *)s_cuStreamDestroy_v2},
    {"cuCtxSynchronize", 2000, (void *)s_cuCtxSynchronize},
    {"cuEventCreate", 2000, (void *)s_cuEventCreate},
    {"cuEventRecord", 2000, (void *)s_cuEventRecord},
    {"cuEventSynchronize", 2000, (void *)s_cuEventSynchronize},
    {"cuEventDestroy", 4000, (void *)s_cuEventDestroy_v2},
    {"cuEventElapsedTime", 12080, (void *)s_cuEventElapsedTime_v2},
    {"cuFuncSetAttribute", 9000, (void *)s_cuFuncSetAttribute},
    {"cuLaunchKernel", 4000, (void *)s_cuLaunchKernel},
    {"cuLaunchKernelEx", 11060, (void *)s_cuLaunchKernelEx},
    {"cuGraphInstantiateWithFlags", 11040, (void *)s_cuGraphInstantiateWithFlags},
    {"cuGraphLaunch", 10000, (void *)s_cuGraphLaunch},
    {"cuGraphExecDestroy", 10000, (void *)s_cuGraphExecDestroy},
    {"cuGraphDestroy", 10000, (void *)s_cuGraphDestroy},
};

/* CU_GET_PROC_ADDRESS_SUCCESS = 0, _SYMBOL_NOT_FOUND = 1 */
EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags,
                                    int *status) {
    (void)flags;
    if (!symbol || !pfn) return 1;
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        if (table[i].version == version && strcmp(table[i].name, symbol) == 0) {
            *pfn = table[i].fn;
            if (status) *status = 0;
            return 0;
        }
    }
    *pfn = 0;
    if (status) *status = 1;
    return CUDA_ERROR_NOT_FOUND;
}
