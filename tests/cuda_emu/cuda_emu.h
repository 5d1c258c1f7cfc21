// A CPU emulation of the part of CUDA C++ that src/backend/cuda uses, so that the backend's
// own kernel sources run, unchanged, in tests on machines without a GPU (see README.md here).
//
// The .cu files pass through translate.py (launch syntax, dynamic shared memory) and are
// compiled as C++ against this header and the runtime in emu_runtime.cpp. Each block runs
// its threads as fibers on one OS thread; __syncthreads and the warp intrinsics are real
// barriers between those fibers, so a kernel that reads shared memory before it is written,
// or a full-warp shuffle that some lane never reaches, fails here as it would (or worse) on a
// GPU. This is a check of the kernels' logic and indexing, not of their speed or of the GPU
// memory model.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <tuple>
#include <type_traits>
#include <utility>

#define CUDART_VERSION 13000
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// one block runs at a time, on one OS thread: a function-local static is exactly one copy
// per block, as shared memory is
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};
// 16-byte vector types. A GPU faults on a 16-byte access that is not 16-byte aligned, where
// x86 would quietly do it: kernels go through MP_CHECK_ALIGN16 (src/backend/cuda), which
// here ends the process with the kernel, block and thread (mp_emu::misaligned).
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
// 8-byte vector types, checked the same way (MP_CHECK_ALIGN8)
struct alignas(8) float2 {
    float x, y;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
namespace mp_emu {
[[noreturn]] void misaligned(const void *p, unsigned align);
}
#define MP_CHECK_ALIGN16(p) \
    (((uintptr_t)(const void *)(p) & 15u) ? mp_emu::misaligned((const void *)(p), 16) : (void)0)
#define MP_CHECK_ALIGN8(p) \
    (((uintptr_t)(const void *)(p) & 7u) ? mp_emu::misaligned((const void *)(p), 8) : (void)0)
#define MP_CHECK_ALIGN4(p) \
    (((uintptr_t)(const void *)(p) & 3u) ? mp_emu::misaligned((const void *)(p), 4) : (void)0)
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorNotReady = 600,
    cudaErrorInvalidDevice = 101,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
} cudaMemcpyKind;

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    int maxThreadsPerBlock;
    int multiProcessorCount;
    int major, minor;
    int warpSize;
    int pciBusID, pciDeviceID, pciDomainID;   // where the device sits: emulated device d is bus d
};
static constexpr int warpSize = 32;

typedef struct mp_emu_event *cudaEvent_t;
typedef struct mp_emu_stream *cudaStream_t;

cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDevice(int *dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int dev);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorName(cudaError_t rc);
const char *cudaGetErrorString(cudaError_t rc);
cudaError_t cudaMalloc(void **p, size_t bytes);
template <class T> cudaError_t cudaMalloc(T **p, size_t bytes) {
    return cudaMalloc((void **)p, bytes);
}
cudaError_t cudaFree(void *p);
cudaError_t cudaMemset(void *p, int value, size_t bytes);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);

namespace mp_emu {

// For stand-ins of device libraries (emu_nccl.cpp): whether [p, p + bytes) lies inside one
// cudaMalloc allocation (the reason in why when not), and device work, during which host
// code may touch device memory (begin and end pair up, as around cudaMemcpy).
bool device_memory(const void *p, size_t bytes, char *why, size_t why_len);
void begin_device_work(void);
void end_device_work(void);
// A stand-in's injected fault (emu_nccl.cpp, MP_EMU_NCCL_FAULT): from now on the device never
// finishes its work, as a GPU whose NCCL kernel waits for a peer that never sends. Events
// recorded after it never complete (cudaEventQuery: cudaErrorNotReady), and whatever waits
// for the device (cudaDeviceSynchronize, cudaEventSynchronize on such an event, a copy)
// blocks for good: only a deadline on the host ends the process.
void stall_device(void);
// A stand-in's call still being issued (NCCL's ncclInProgress): until cleared (NULL), device
// work queued on the stream (a kernel, a copy, a memset, an event) would run before that
// call's work instead of after it, so the emulator ends the process naming it (`call`).
void set_issuing(const char *call);

// the thread now running: its index and lane
struct ThreadIndex {
    uint3 tid;
    unsigned lane, warp;
};
extern ThreadIndex *g_thread;
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

cudaError_t func_set_attribute(const void *fn, cudaFuncAttribute attr, int value);
void *dynamic_shared(void);
void syncthreads(void);
void syncwarp(unsigned mask);
uint64_t shfl(unsigned mask, uint64_t bits, int mode, int arg, int width);
unsigned ballot(unsigned mask, int pred);

struct Launch {
    dim3 grid, block;
    size_t shmem;
    Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = 0) : grid(g), block(b), shmem(s) {}
};
// runs body(closure) on every thread of every block of the launch; errors go to the
// last-error state (cudaGetLastError), as with a real launch
void run_grid(const char *kernel, const char *file, int line, const Launch &cfg, const void *fn,
              void (*body)(void *), void *closure);

// a launch argument converted to its parameter's type, as a real launch does; NULL (an
// integer 0 in C++) passed for a pointer becomes a null pointer
template <class T, class A> T arg(A &&a) {
    if constexpr (std::is_pointer<T>::value && std::is_integral<typename std::decay<A>::type>::value)
        return a == 0 ? nullptr : (T)nullptr;
    else
        return static_cast<T>(std::forward<A>(a));
}

template <class... P, class... A>
void launch(const char *kernel, const char *file, int line, const Launch &cfg, void (*fn)(P...),
            A &&...args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong argument count");
    struct Closure {
        void (*fn)(P...);
        std::tuple<typename std::decay<P>::type...> args;
    } c{fn, std::tuple<typename std::decay<P>::type...>(
                arg<typename std::decay<P>::type>(std::forward<A>(args))...)};
    run_grid(kernel, file, line, cfg, (const void *)fn,
             [](void *p) {
                 Closure *c = (Closure *)p;
                 std::apply(c->fn, c->args);
             },
             &c);
}

}  // namespace mp_emu

template <class F> cudaError_t cudaFuncSetAttribute(F *fn, cudaFuncAttribute attr, int value) {
    return mp_emu::func_set_attribute((const void *)fn, attr, value);
}

#define threadIdx (mp_emu::g_thread->tid)
#define blockIdx (mp_emu::g_block_idx)
#define blockDim (mp_emu::g_block_dim)
#define gridDim (mp_emu::g_grid_dim)

inline void __syncthreads(void) { mp_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { mp_emu::syncwarp(mask); }

template <class T> inline T mp_emu_shfl(unsigned mask, T v, int mode, int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    b = mp_emu::shfl(mask, b, mode, arg, width);
    T r;
    memcpy(&r, &b, sizeof(T));
    return r;
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return mp_emu_shfl(mask, v, 0, src, width);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return mp_emu_shfl(mask, v, 1, lane_mask, width);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return mp_emu_shfl(mask, v, 2, (int)delta, width);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return mp_emu_shfl(mask, v, 3, (int)delta, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return mp_emu::ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return mp_emu::ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return mp_emu::ballot(mask, pred) == mask; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
template <class T> inline T __ldg(const T *p) { return *p; }
template <class T> inline void __stcs(T *p, T v) { *p = v; }   // the cache hint has no effect here
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }   // never contracted (no FMA here)
// CUDA's device min/max overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
// Every thread of the emulator runs on one OS thread and switches only at barriers, so a
// plain read-modify-write is atomic.
inline int atomicAdd(int *address, int val) {
    int old = *address;
    *address = old + val;
    return old;
}
