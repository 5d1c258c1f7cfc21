// The CUDA emulator's runtime: fibers and barriers for the threads of a block, device memory
// that host code cannot touch, and the runtime, cuBLAS and CUB calls the backend makes.
// See README.md in this folder for what it checks and what it cannot.
#include <cblas.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <map>
#include <numeric>
#include <vector>
#include "cub/device/device_radix_sort.cuh"
#include "cublas_v2.h"
#include "cublasLt.h"
#include "cuda_emu.h"

namespace mp_emu {
ThreadIndex *g_thread;
uint3 g_block_idx;
dim3 g_block_dim, g_grid_dim;
}  // namespace mp_emu

namespace {

using namespace mp_emu;

const int MAX_THREADS = 1024;
const size_t STACK_BYTES = 256 << 10;
const size_t SHARED_DEFAULT = 48 << 10;      // dynamic shared memory without the attribute
const size_t SHARED_OPTIN = 232448;          // sm_90's opt-in maximum per block
const size_t DEVICE_BYTES = (size_t)80 << 30;

size_t g_page;
cudaError_t g_last_error = cudaSuccess;
bool g_reverse;    // MP_EMU_ORDER=reverse: threads and blocks in reverse order
bool g_protect;    // device memory inaccessible outside device work (MP_EMU_PROTECT, default 1)
// MP_EMU_SPARSE=1: allocations of SPARSE_BYTES and more are not filled with 0xff but left
// zero (fresh pages), and cudaMemset to 0 gives their whole pages back (MADV_DONTNEED), so
// a table of tens of GiB commits only the pages that kernels and copies write
bool g_sparse;
const size_t SPARSE_BYTES = (size_t)1 << 30;
int g_devices = 1;
int g_device;      // what cudaSetDevice chose for this process (each rank is a process)
bool g_ready;

// ---------------------------------------------------------------------------------------
// errors: kernel bugs that a GPU would turn into a hang or undefined results end the
// process here with the launch's file:line, the block and the thread

const char *g_kernel = "";
const char *g_launch_file = "";
int g_launch_line;

[[noreturn]] void kernel_fault(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "cuda-emu: %s:%d: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): %s\n",
            g_launch_file, g_launch_line, g_kernel, g_block_idx.x, g_block_idx.y,
            g_block_idx.z, g_thread ? g_thread->tid.x : 0, g_thread ? g_thread->tid.y : 0,
            g_thread ? g_thread->tid.z : 0, msg);
    fflush(stderr);
    abort();
}

void report(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cuda-emu: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

const char *g_issuing;   // set_issuing's call, or NULL

// device work queued now: refused while a stand-in's call is still being issued
void check_ordered(const char *what) {
    if (!g_issuing) return;
    fprintf(stderr, "cuda-emu: %s queued while %s is still in progress (ncclInProgress): it "
            "would not be ordered after that call's work (poll ncclCommGetAsyncError first)\n",
            what, g_issuing);
    fflush(stderr);
    abort();
}

// ---------------------------------------------------------------------------------------
// device memory: each allocation is its own mapping, right-aligned against a guard page so
// that a kernel running off its end faults, filled with 0xff bytes (NaN as float, -1 as an
// int) so that reading memory nobody wrote shows up in the results, and inaccessible to
// host code outside device work so that a device pointer handed to the host (MPI, a C loop)
// faults instead of quietly working as it would not on a GPU

struct Alloc {
    char *map;          // the whole mapping: guard, data pages, guard
    size_t map_len;
    char *data;         // what cudaMalloc returned
    size_t size;        // bytes asked for
    bool sparse;        // MP_EMU_SPARSE and at least SPARSE_BYTES: zero, not 0xff
};
std::map<uintptr_t, Alloc> g_allocs;   // by data address
size_t g_live_bytes;
int g_device_depth;    // > 0 while device work (a kernel, a copy, a GEMM, a sort) runs

const Alloc *find_alloc(const void *p) {
    auto it = g_allocs.upper_bound((uintptr_t)p);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    const Alloc &a = it->second;
    if ((const char *)p >= a.map && (const char *)p < a.map + a.map_len) return &a;
    return nullptr;
}

void set_access(const Alloc &a, int prot) {
    if (mprotect(a.map + g_page, a.map_len - 2 * g_page, prot) != 0) {
        perror("cuda-emu: mprotect");
        abort();
    }
}

void device_enter() {
    if (g_device_depth++ == 0 && g_protect)
        for (auto &kv : g_allocs) set_access(kv.second, PROT_READ | PROT_WRITE);
}

void device_leave() {
    if (--g_device_depth == 0 && g_protect)
        for (auto &kv : g_allocs) set_access(kv.second, PROT_NONE);
}

struct DeviceWork {
    DeviceWork() { device_enter(); }
    ~DeviceWork() { device_leave(); }
};

// [p, p + bytes) inside one allocation's data, or null with the reason in why
bool device_range(const void *p, size_t bytes, char *why, size_t why_len) {
    const Alloc *a = find_alloc(p);
    if (!a || (const char *)p < a->data) {
        snprintf(why, why_len, "%p is not device memory", p);
        return false;
    }
    size_t off = (size_t)((const char *)p - a->data);
    if (off + bytes > a->size) {
        snprintf(why, why_len, "%zu bytes at offset %zu of a %zu-byte allocation run past its end",
                 bytes, off, a->size);
        return false;
    }
    return true;
}

// ---------------------------------------------------------------------------------------
// faults: say what the address was before the process dies with SIGSEGV

struct Fiber;
Fiber *g_cur;
bool g_in_kernel;
char *g_stacks;
size_t g_stacks_len;

struct sigaction g_prev_segv, g_prev_bus;

void on_segv(int sig, siginfo_t *si, void *ctx) {
    char msg[600];
    const char *addr = (const char *)si->si_addr;
    const Alloc *a = find_alloc(addr);
    const char *where = g_in_kernel ? "in a kernel" : "in host code";
    int n;
    if (a && addr >= a->data && addr < a->data + a->size && !g_in_kernel && g_device_depth == 0)
        n = snprintf(msg, sizeof msg, "host code touched device memory at %p (offset %zu of a "
                     "%zu-byte cudaMalloc allocation): only cudaMemcpy may read or write it\n",
                     (const void *)addr, (size_t)(addr - a->data), a->size);
    else if (a)
        n = snprintf(msg, sizeof msg, "out-of-bounds access %s at %p: %td bytes %s a %zu-byte "
                     "allocation\n", where, (const void *)addr,
                     addr < a->data ? a->data - addr : addr - (a->data + a->size),
                     addr < a->data ? "before" : "past the end of", a->size);
    else if (g_stacks && addr >= g_stacks && addr < g_stacks + g_stacks_len)
        n = snprintf(msg, sizeof msg, "stack overflow in a kernel thread (%zu KiB per thread)\n",
                     STACK_BYTES >> 10);
    else
        n = snprintf(msg, sizeof msg, "invalid access %s at %p\n", where, (const void *)addr);
    if (write(2, "cuda-emu: ", 10) < 0 || write(2, msg, (size_t)n) < 0) {}
    if (g_in_kernel) {
        n = snprintf(msg, sizeof msg, "cuda-emu: the kernel: %s launched at %s:%d, block "
                     "(%u,%u,%u), thread (%u,%u,%u)\n", g_kernel, g_launch_file, g_launch_line,
                     g_block_idx.x, g_block_idx.y, g_block_idx.z, g_thread->tid.x,
                     g_thread->tid.y, g_thread->tid.z);
        if (write(2, msg, (size_t)n) < 0) {}
    }
    // in host code a handler installed before ours (cmocka's, which fails just the test)
    // takes over; in a kernel the emulator's state is lost, so the process ends
    struct sigaction *prev = sig == SIGSEGV ? &g_prev_segv : &g_prev_bus;
    if (!g_in_kernel && (prev->sa_flags & SA_SIGINFO) && prev->sa_sigaction) {
        prev->sa_sigaction(sig, si, ctx);
        return;
    }
    if (!g_in_kernel && !(prev->sa_flags & SA_SIGINFO) && prev->sa_handler != SIG_DFL &&
        prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);   // returning re-runs the access, which now kills the process
}

// (re)installs on_segv in front of whatever handler is there now: a test framework may
// install its own after the emulator started
void ensure_handler() {
    const int sigs[2] = {SIGSEGV, SIGBUS};
    for (int sig : sigs) {
        struct sigaction cur;
        sigaction(sig, nullptr, &cur);
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_segv) continue;
        (sig == SIGSEGV ? g_prev_segv : g_prev_bus) = cur;
        struct sigaction sa = {};
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(sig, &sa, nullptr);
    }
}

void init() {
    if (g_ready) return;
    g_ready = true;
    g_page = (size_t)sysconf(_SC_PAGESIZE);
    const char *order = getenv("MP_EMU_ORDER");
    g_reverse = order && strcmp(order, "reverse") == 0;
    const char *prot = getenv("MP_EMU_PROTECT");
    g_protect = !(prot && strcmp(prot, "0") == 0);
    const char *sparse = getenv("MP_EMU_SPARSE");
    g_sparse = sparse && strcmp(sparse, "1") == 0;
    const char *dev = getenv("MP_EMU_DEVICES");
    if (dev && *dev) g_devices = atoi(dev);
    static char altstack[1 << 16];
    stack_t ss = {};
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    sigaltstack(&ss, nullptr);
}

// ---------------------------------------------------------------------------------------
// fibers: one per thread of a block, each with its own stack; a fiber runs until it reaches
// a barrier or ends, then the scheduler runs the next one (in thread order, or reversed)

enum { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
    ThreadIndex idx;
    jmp_buf jb;
    ucontext_t uc;
    bool started;
    int state;
    unsigned wait_gen;
};

struct Warp {
    int lanes, arrived, exited;
    unsigned gen;
    uint64_t val[2][32];   // shuffle values, double-buffered by barrier generation
};

std::vector<Fiber> g_fibers;
std::vector<Warp> g_warps;
int g_nthreads, g_block_live, g_block_arrived;
unsigned g_block_gen;
jmp_buf g_sched;
void (*g_body)(void *);
void *g_closure;
char *g_dyn_shared;

void yield() {
    if (!_setjmp(g_cur->jb)) _longjmp(g_sched, 1);
}

void fiber_main() {
    for (;;) {
        g_body(g_closure);
        Fiber *f = g_cur;
        f->state = DONE;
        g_block_live--;
        Warp &w = g_warps[f->idx.warp];
        w.exited++;
        if (w.arrived > 0)
            kernel_fault("a thread returned while %d lane(s) of its warp wait in a full-warp "
                         "shuffle, vote or __syncwarp", w.arrived);
        if (g_block_arrived > 0 && g_block_arrived == g_block_live) {
            g_block_arrived = 0;
            g_block_gen++;
        }
        yield();   // resumed for the next block
    }
}

void resume(Fiber *f) {
    g_cur = f;
    g_thread = &f->idx;
    g_in_kernel = true;
    if (!_setjmp(g_sched)) {
        if (!f->started) {
            f->started = true;
            ucontext_t here;
            swapcontext(&here, &f->uc);   // never comes back here: fibers leave by _longjmp
        }
        _longjmp(f->jb, 1);
    }
    g_in_kernel = false;
}

void make_fibers(int n) {
    if ((int)g_fibers.size() >= n) return;
    if (!g_stacks) {
        g_stacks_len = (size_t)MAX_THREADS * (STACK_BYTES + g_page);
        g_stacks = (char *)mmap(nullptr, g_stacks_len, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (g_stacks == MAP_FAILED) {
            perror("cuda-emu: fiber stacks");
            abort();
        }
        g_fibers.reserve(MAX_THREADS);
    }
    while ((int)g_fibers.size() < n) {
        size_t i = g_fibers.size();
        g_fibers.emplace_back();
        Fiber &f = g_fibers.back();
        char *base = g_stacks + i * (STACK_BYTES + g_page);
        mprotect(base, g_page, PROT_NONE);   // stacks grow down into this guard page
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = base + g_page;
        f.uc.uc_stack.ss_size = STACK_BYTES;
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, fiber_main, 0);
    }
}

bool runnable(const Fiber &f) {
    switch (f.state) {
    case READY: return true;
    case WAIT_BLOCK: return f.wait_gen != g_block_gen;
    case WAIT_WARP: return f.wait_gen != g_warps[f.idx.warp].gen;
    default: return false;
    }
}

void run_block(size_t shmem) {
    int n = g_nthreads;
    g_block_live = n;
    g_block_arrived = 0;
    g_block_gen = 0;
    for (int w = 0; w < (n + 31) / 32; w++) {
        Warp &wp = g_warps[w];
        wp.lanes = std::min(32, n - 32 * w);
        wp.arrived = wp.exited = 0;
        wp.gen = 0;
    }
    for (int i = 0; i < n; i++) {
        Fiber &f = g_fibers[i];
        f.idx.tid.x = (unsigned)i % g_block_dim.x;
        f.idx.tid.y = (unsigned)i / g_block_dim.x % g_block_dim.y;
        f.idx.tid.z = (unsigned)i / (g_block_dim.x * g_block_dim.y);
        f.idx.lane = (unsigned)i % 32;
        f.idx.warp = (unsigned)i / 32;
        f.state = READY;
    }
    if (shmem) memset(g_dyn_shared, 0xff, shmem);   // unwritten shared memory reads as NaN
    for (;;) {
        bool progress = false, all_done = true;
        for (int o = 0; o < n; o++) {
            Fiber &f = g_fibers[g_reverse ? n - 1 - o : o];
            while (runnable(f)) {
                resume(&f);
                progress = true;
            }
            if (f.state != DONE) all_done = false;
        }
        if (all_done) return;
        if (!progress) {
            for (int i = 0; i < n; i++)
                if (g_fibers[i].state != DONE) {
                    g_thread = &g_fibers[i].idx;
                    break;
                }
            kernel_fault("deadlock: %d of %d threads wait at __syncthreads or a warp "
                         "operation that the others never reach", n - g_block_live +
                         g_block_arrived, n);
        }
    }
}

std::map<const void *, size_t> g_shared_limit;   // cudaFuncAttributeMaxDynamicSharedMemorySize

cudaError_t launch_error(const char *kernel, const char *file, int line, cudaError_t rc,
                         const char *fmt, ...) {
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    report("%s:%d: launch of %s refused: %s", file, line, kernel, msg);
    g_last_error = rc;
    return rc;
}

// one warp-wide barrier of the calling lane; returns the generation it completed
unsigned warp_arrive(unsigned mask, const char *what) {
    Fiber *f = g_cur;
    Warp &w = g_warps[f->idx.warp];
    if (w.lanes != 32)
        kernel_fault("%s with mask 0x%08x in a warp of %d threads (blockDim %u x %u x %u is not "
                     "a multiple of 32): the mask names lanes that do not exist", what, mask,
                     w.lanes, g_block_dim.x, g_block_dim.y, g_block_dim.z);
    if (mask != 0xffffffffu)
        kernel_fault("%s with mask 0x%08x: the emulator runs full-warp masks only", what, mask);
    if (w.exited)
        kernel_fault("%s with a full mask after %d lane(s) of the warp returned", what, w.exited);
    unsigned gen = w.gen;
    if (++w.arrived == 32) {
        w.arrived = 0;
        w.gen++;
        return gen;
    }
    f->state = WAIT_WARP;
    f->wait_gen = gen;
    yield();
    f->state = READY;
    return gen;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// the device side

namespace mp_emu {

void *dynamic_shared(void) { return g_dyn_shared; }

void misaligned(const void *p, unsigned align) {
    kernel_fault("a %u-byte access at %p, which is not %u-byte aligned (a GPU faults)", align,
                 p, align);
}

void misused(const char *what) { kernel_fault("%s", what); }

void syncthreads(void) {
    Fiber *f = g_cur;
    if (++g_block_arrived == g_block_live) {
        g_block_arrived = 0;
        g_block_gen++;
        return;
    }
    f->state = WAIT_BLOCK;
    f->wait_gen = g_block_gen;
    yield();
    f->state = READY;
}

void syncwarp(unsigned mask) { warp_arrive(mask, "__syncwarp"); }

uint64_t shfl(unsigned mask, uint64_t bits, int mode, int arg, int width) {
    if (width <= 0 || width > 32 || (width & (width - 1)))
        kernel_fault("shuffle width %d is not a power of two up to 32", width);
    Warp &w = g_warps[g_cur->idx.warp];
    int lane = (int)g_cur->idx.lane, base = lane & ~(width - 1), src = lane;
    w.val[w.gen & 1][lane] = bits;
    unsigned gen = warp_arrive(mask, "shuffle");
    switch (mode) {
    case 0: src = base + (arg & (width - 1)); break;
    case 1: src = lane ^ arg; break;
    case 2: src = lane + arg; break;
    case 3: src = lane - arg; break;
    }
    if (src < base || src >= base + width) src = lane;   // outside the segment: own value
    return g_warps[g_cur->idx.warp].val[gen & 1][src];
}

unsigned ballot(unsigned mask, int pred) {
    Warp &w = g_warps[g_cur->idx.warp];
    w.val[w.gen & 1][g_cur->idx.lane] = pred != 0;
    unsigned gen = warp_arrive(mask, "vote");
    unsigned r = 0;
    for (int l = 0; l < 32; l++)
        if (g_warps[g_cur->idx.warp].val[gen & 1][l]) r |= 1u << l;
    return r;
}

cudaError_t func_set_attribute(const void *fn, cudaFuncAttribute attr, int value) {
    init();
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
        (size_t)value > SHARED_OPTIN)
        return cudaErrorInvalidValue;
    g_shared_limit[fn] = (size_t)value;
    return cudaSuccess;
}

void run_grid(const char *kernel, const char *file, int line, const Launch &cfg, const void *fn,
              void (*body)(void *), void *closure) {
    init();
    ensure_handler();
    check_ordered(kernel);
    const dim3 &b = cfg.block, &g = cfg.grid;
    size_t nthreads = (size_t)b.x * b.y * b.z;
    if (nthreads == 0 || g.x == 0 || g.y == 0 || g.z == 0) {
        launch_error(kernel, file, line, cudaErrorInvalidConfiguration,
                     "empty grid (%u,%u,%u) or block (%u,%u,%u)", g.x, g.y, g.z, b.x, b.y, b.z);
        return;
    }
    if (nthreads > MAX_THREADS || b.z > 64 || g.y > 65535 || g.z > 65535 || g.x > 0x7fffffffu) {
        launch_error(kernel, file, line, cudaErrorInvalidConfiguration,
                     "grid (%u,%u,%u) block (%u,%u,%u) exceed the limits (1024 threads, "
                     "grid.y and grid.z <= 65535)", g.x, g.y, g.z, b.x, b.y, b.z);
        return;
    }
    auto lim = g_shared_limit.find(fn);
    size_t limit = lim == g_shared_limit.end() ? SHARED_DEFAULT : lim->second;
    if (cfg.shmem > limit) {
        launch_error(kernel, file, line, cudaErrorInvalidValue,
                     "%zu bytes of dynamic shared memory, more than the %zu allowed (raise it "
                     "with cudaFuncAttributeMaxDynamicSharedMemorySize)", cfg.shmem, limit);
        return;
    }
    g_kernel = kernel;
    g_launch_file = file;
    g_launch_line = line;
    g_block_dim = b;
    g_grid_dim = g;
    g_nthreads = (int)nthreads;
    g_body = body;
    g_closure = closure;
    make_fibers(g_nthreads);
    g_warps.resize((nthreads + 31) / 32);
    // dynamic shared memory ends at a guard page, so running past it faults; a kernel that
    // uses it without asking for any gets a pointer to the guard page itself
    size_t sh_pages = (cfg.shmem + g_page - 1) / g_page;
    size_t sh_len = (sh_pages + 1) * g_page;
    char *sh_map = (char *)mmap(nullptr, sh_len, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (sh_map == MAP_FAILED) {
        perror("cuda-emu: shared memory");
        abort();
    }
    mprotect(sh_map + sh_pages * g_page, g_page, PROT_NONE);
    g_dyn_shared = sh_map + sh_pages * g_page - ((cfg.shmem + 15) & ~(size_t)15);
    DeviceWork work;
    size_t nblocks = (size_t)g.x * g.y * g.z;
    for (size_t o = 0; o < nblocks; o++) {
        size_t i = g_reverse ? nblocks - 1 - o : o;
        g_block_idx.x = (unsigned)(i % g.x);
        g_block_idx.y = (unsigned)(i / g.x % g.y);
        g_block_idx.z = (unsigned)(i / ((size_t)g.x * g.y));
        run_block(cfg.shmem);
    }
    munmap(sh_map, sh_len);
    g_thread = nullptr;
    g_kernel = "";
}

bool device_memory(const void *p, size_t bytes, char *why, size_t why_len) {
    init();
    return device_range(p, bytes, why, why_len);
}

void begin_device_work(void) {
    init();
    ensure_handler();
    device_enter();
}

void end_device_work(void) { device_leave(); }

}  // namespace mp_emu

// ---------------------------------------------------------------------------------------
// the runtime API

cudaError_t cudaGetDeviceCount(int *count) {
    init();
    *count = g_devices > 0 ? g_devices : 0;
    return g_devices > 0 ? cudaSuccess : cudaErrorNoDevice;
}

cudaError_t cudaSetDevice(int dev) {
    init();
    if (dev < 0 || dev >= g_devices) return cudaErrorInvalidDevice;
    g_device = dev;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *dev) {
    init();
    if (g_devices <= 0) return cudaErrorNoDevice;
    *dev = g_device;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev) {
    init();
    if (dev < 0 || dev >= g_devices) return cudaErrorInvalidDevice;
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "CUDA emulator on the CPU (tests/cuda_emu)");
    p->totalGlobalMem = DEVICE_BYTES;
    p->sharedMemPerBlock = SHARED_DEFAULT;
    p->sharedMemPerBlockOptin = SHARED_OPTIN;
    p->maxThreadsPerBlock = MAX_THREADS;
    // an H100's or H200's 132, or MP_EMU_SMS: kernels that size their grid by the SM count
    // (persistent grids) then give each block several rows, as on a GPU with bigger inputs
    const char *sms = getenv("MP_EMU_SMS");
    p->multiProcessorCount = sms && atoi(sms) > 0 ? atoi(sms) : 132;
    p->major = 9;
    p->minor = 0;
    p->warpSize = 32;
    p->pciBusID = dev;   // every process sees the same devices: device d is one "GPU" per host
    return cudaSuccess;
}

// Work is synchronous: nothing to wait for, unless stall_device made the device hang
static bool g_stalled;

static void wait_forever(const char *what) {
    fprintf(stderr, "cuda-emu: %s waits for a stalled device (MP_EMU_NCCL_FAULT)\n", what);
    for (;;) sleep(1);
}

void mp_emu::stall_device(void) { g_stalled = true; }
void mp_emu::set_issuing(const char *call) { g_issuing = call; }

cudaError_t cudaDeviceSynchronize(void) {
    if (g_stalled) wait_forever("cudaDeviceSynchronize");
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
    cudaError_t rc = g_last_error;
    g_last_error = cudaSuccess;
    return rc;
}

cudaError_t cudaPeekAtLastError(void) { return g_last_error; }

const char *cudaGetErrorName(cudaError_t rc) {
    switch (rc) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t rc) {
    switch (rc) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected (emulator: MP_EMU_DEVICES=0)";
    default: return cudaGetErrorName(rc);
    }
}

cudaError_t cudaMalloc(void **p, size_t bytes) {
    init();
    ensure_handler();
    *p = nullptr;
    if (g_live_bytes + bytes > DEVICE_BYTES) return cudaErrorMemoryAllocation;
    size_t rounded = (std::max(bytes, (size_t)1) + 15) & ~(size_t)15;
    size_t pages = (rounded + g_page - 1) / g_page;
    size_t len = (pages + 2) * g_page;
    char *map = (char *)mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                             -1, 0);
    if (map == MAP_FAILED) return cudaErrorMemoryAllocation;
    Alloc a = {map, len, map + (pages + 1) * g_page - rounded, bytes,
               g_sparse && bytes >= SPARSE_BYTES};
    set_access(a, PROT_READ | PROT_WRITE);
    if (!a.sparse) memset(a.data, 0xff, rounded);   // NaN floats, -1 ints: what nobody wrote shows
    if (g_device_depth == 0 && g_protect) set_access(a, PROT_NONE);
    g_allocs[(uintptr_t)a.data] = a;
    g_live_bytes += bytes;
    *p = a.data;
    return cudaSuccess;
}

cudaError_t cudaFree(void *p) {
    init();
    if (!p) return cudaSuccess;
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end()) {
        report("cudaFree(%p): not a pointer that cudaMalloc returned", p);
        return cudaErrorInvalidValue;
    }
    g_live_bytes -= it->second.size;
    munmap(it->second.map, it->second.map_len);   // a later use faults
    g_allocs.erase(it);
    return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int value, size_t bytes) {
    init();
    ensure_handler();
    check_ordered("cudaMemset");   // as cuda_emu.h's set_issuing says
    char why[200];
    if (bytes && !device_range(p, bytes, why, sizeof why)) {
        report("cudaMemset: %s", why);
        return cudaErrorInvalidValue;
    }
    DeviceWork work;
    const Alloc *a = find_alloc(p);
    if (value == 0 && a->sparse) {   // the partial pages at the ends written, the rest dropped
        char *lo = (char *)p, *hi = lo + bytes;
        char *plo = (char *)(((uintptr_t)lo + g_page - 1) & ~(uintptr_t)(g_page - 1));
        char *phi = (char *)((uintptr_t)hi & ~(uintptr_t)(g_page - 1));
        if (plo < phi) {
            memset(lo, 0, (size_t)(plo - lo));
            if (madvise(plo, (size_t)(phi - plo), MADV_DONTNEED) != 0) {
                perror("cuda-emu: madvise");
                abort();
            }
            memset(phi, 0, (size_t)(hi - phi));
            return cudaSuccess;
        }
    }
    memset(p, value, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    init();
    ensure_handler();
    if (g_stalled) wait_forever("cudaMemcpy");   // it follows the queued work, as on a GPU
    check_ordered("cudaMemcpy");
    if (!bytes) return cudaSuccess;
    bool dst_dev = find_alloc(dst) != nullptr, src_dev = find_alloc(src) != nullptr;
    bool want_dst = dst_dev, want_src = src_dev;
    switch (kind) {
    case cudaMemcpyHostToHost: want_dst = want_src = false; break;
    case cudaMemcpyHostToDevice: want_dst = true, want_src = false; break;
    case cudaMemcpyDeviceToHost: want_dst = false, want_src = true; break;
    case cudaMemcpyDeviceToDevice: want_dst = want_src = true; break;
    case cudaMemcpyDefault: break;
    }
    if (want_dst != dst_dev || want_src != src_dev) {
        report("cudaMemcpy kind %d: the destination %p is %s memory and the source %p is %s "
               "memory", (int)kind, dst, dst_dev ? "device" : "host", src,
               src_dev ? "device" : "host");
        return cudaErrorInvalidValue;
    }
    char why[200];
    if ((dst_dev && !device_range(dst, bytes, why, sizeof why)) ||
        (src_dev && !device_range(src, bytes, why, sizeof why))) {
        report("cudaMemcpy of %zu bytes: %s", bytes, why);
        return cudaErrorInvalidValue;
    }
    DeviceWork work;
    memmove(dst, src, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b) {
    init();
    *total_b = DEVICE_BYTES;
    *free_b = DEVICE_BYTES - g_live_bytes;
    return cudaSuccess;
}

struct mp_emu_event {
    std::chrono::steady_clock::time_point t;
    bool stalled;   // recorded after stall_device: never completes
};

cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = new mp_emu_event();
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
    check_ordered("cudaEventRecord");
    e->t = std::chrono::steady_clock::now();
    e->stalled = g_stalled;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (e->stalled) wait_forever("cudaEventSynchronize");
    return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) { return e->stalled ? cudaErrorNotReady : cudaSuccess; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------
// cuBLAS: column-major SGEMM on OpenBLAS, operands checked against their allocations

struct mp_emu_blas {
    int math;
};

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    init();
    *h = new mp_emu_blas();
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != CUBLAS_DEFAULT_MATH) {   // TF32 and the rest: not emulated
        report("cublasSetMathMode: math mode %d is not emulated (CUBLAS_DEFAULT_MATH only)",
               (int)mode);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    h->math = (int)mode;
    return CUBLAS_STATUS_SUCCESS;
}

namespace {

size_t type_size(cudaDataType t) {
    return t == CUDA_R_64F ? 8 : t == CUDA_R_32F ? 4 : 2;
}

const char *type_name(cudaDataType t) {
    switch (t) {
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_64F: return "CUDA_R_64F";
    case CUDA_R_16F: return "CUDA_R_16F";
    case CUDA_R_16BF: return "CUDA_R_16BF";
    default: return "an unknown cudaDataType";
    }
}

// a column-major (rows, cols) operand of esize-byte elements with leading dimension ld,
// `batch` of them `stride` elements apart: inside one device allocation
bool gemm_operand(const char *call, const char *name, const void *p, size_t esize, int rows,
                  int cols, int ld, long long stride, int batch) {
    if (ld < std::max(1, rows)) {
        report("%s: ld%s = %d is less than its %d rows", call, name, ld, rows);
        return false;
    }
    size_t elems = (size_t)(cols - 1) * ld + rows + (size_t)(batch - 1) * stride;
    char why[200];
    if (!device_range(p, elems * esize, why, sizeof why)) {
        report("%s: operand %s (%d x %d, ld %d, batch %d): %s", call, name, rows, cols, ld,
               batch, why);
        return false;
    }
    return true;
}

// a column-major (rows, cols) bf16 operand widened (exactly) to contiguous fp32 (leading
// dimension rows)
void widen_bf16(std::vector<float> &out, const uint16_t *p, int rows, int cols, int ld) {
    out.resize((size_t)rows * cols);
    for (int j = 0; j < cols; j++)
        for (int r = 0; r < rows; r++) {
            uint32_t u = (uint32_t)p[(size_t)j * ld + r] << 16;
            memcpy(&out[(size_t)j * rows + r], &u, 4);
        }
}

// C (fp32) = alpha op(A) op(B) + beta C for each of `batch` products, A and B of type ab
// (CUDA_R_32F or CUDA_R_16BF)
cublasStatus_t gemm(const char *call, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                    int m, int n, int k, float alpha, const void *A, int lda, long long sA,
                    const void *B, int ldb, long long sB, cudaDataType ab, float beta,
                    float *C, int ldc, long long sC, int batch) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m < 0 || n < 0 || k < 0 || batch < 0 || (ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) ||
        (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
    int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
    size_t es = type_size(ab);
    if ((k > 0 && (!gemm_operand(call, "A", A, es, ar, ac, lda, sA, batch) ||
                   !gemm_operand(call, "B", B, es, br, bc, ldb, sB, batch))) ||
        !gemm_operand(call, "C", C, 4, m, n, ldc, sC, batch))
        return CUBLAS_STATUS_INVALID_VALUE;
    bool as_is = ab == CUDA_R_32F;   // fp32: OpenBLAS reads the operands in place
    DeviceWork work;
    std::vector<float> wa, wb;
    for (int i = 0; i < batch; i++) {
        float *c = C + i * sC;
        if (k == 0) {   // C = beta C, and C is not read when beta is 0
            for (int j = 0; j < n; j++)
                for (int r = 0; r < m; r++)
                    c[(size_t)j * ldc + r] = beta == 0.0f ? 0.0f : beta * c[(size_t)j * ldc + r];
            continue;
        }
        const char *a = (const char *)A + i * sA * (long long)es;
        const char *b = (const char *)B + i * sB * (long long)es;
        const float *pa = (const float *)a, *pb = (const float *)b;
        int la = lda, lb = ldb;
        if (!as_is) {
            widen_bf16(wa, (const uint16_t *)a, ar, ac, lda);
            widen_bf16(wb, (const uint16_t *)b, br, bc, ldb);
            pa = wa.data();
            pb = wb.data();
            la = ar;
            lb = br;
        }
        if (beta == 0.0f)   // BLAS leaves C unread then; make sure NaN scratch cannot leak in
            for (int j = 0; j < n; j++) memset(c + (size_t)j * ldc, 0, (size_t)m * sizeof(float));
        cblas_sgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                    tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, alpha, pa, la, pb,
                    lb, beta, c, ldc);
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float *alpha, const float *A, int lda,
                           const float *B, int ldb, const float *beta, float *C, int ldc) {
    return gemm("cublasSgemm", h, ta, tb, m, n, k, *alpha, A, lda, 0, B, ldb, 0, CUDA_R_32F,
                *beta, C, ldc, 0, 1);
}

// The types and compute type the backend uses are emulated (bf16 A and B with fp32 C and
// CUBLAS_COMPUTE_32F); anything else is refused with the reason, as cuBLAS refuses
// combinations it lacks.
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void *alpha, const void *A, cudaDataType Atype,
                            int lda, const void *B, cudaDataType Btype, int ldb,
                            const void *beta, void *C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    const char *call = "cublasGemmEx";
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    bool bf16 = Atype == CUDA_R_16BF && Btype == CUDA_R_16BF && Ctype == CUDA_R_32F;
    bool plain = computeType == CUBLAS_COMPUTE_32F || computeType == CUBLAS_COMPUTE_32F_PEDANTIC;
    if (!(bf16 && plain)) {
        report("%s: A %s, B %s, C %s with compute type %d: not supported (by cuBLAS, or by "
               "this emulator)", call, type_name(Atype), type_name(Btype), type_name(Ctype),
               (int)computeType);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (algo != CUBLAS_GEMM_DEFAULT && algo != CUBLAS_GEMM_DEFAULT_TENSOR_OP) {
        report("%s: algorithm %d is not emulated (CUBLAS_GEMM_DEFAULT only)", call, (int)algo);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    // CUBLAS_COMPUTE_32F*: alpha and beta are floats, host memory (the default pointer mode)
    return gemm(call, h, ta, tb, m, n, k, *(const float *)alpha, A, lda, 0, B, ldb, 0, Atype,
                *(const float *)beta, (float *)C, ldc, 0, 1);
}

// ---------------------------------------------------------------------------------------
// cuBLASLt (cublasLt.h): bf16 x bf16 -> fp32 with the bias epilogue, on the GEMM above

struct mp_emu_lt {
    int unused;
};
struct mp_emu_lt_desc {
    cublasComputeType_t compute;
    cudaDataType_t scale;
    int32_t transa, transb;
    uint32_t epilogue;
    const void *bias;
    int32_t bias_type;
};
struct mp_emu_lt_layout {
    cudaDataType type;
    uint64_t rows, cols;
    int64_t ld;
};
struct mp_emu_lt_pref {
    uint64_t workspace;
    uint32_t reduction_mask;
    uint32_t align[4];   // A, B, C, D
};

namespace {

// the largest power of two up to 256 dividing the address
uint32_t pointer_alignment(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t al = 1;
    while (al < 256 && a % (2 * al) == 0) al *= 2;
    return al;
}

// what an "algorithm" of the emulator remembers of its heuristic call: the alignments it was
// found for (A, B, C, D, bias) and the workspace it was allowed
struct lt_algo {
    uint32_t align[5];
    uint64_t workspace;
};

template <class T> cublasStatus_t set_value(T *dst, const void *buf, size_t size, const char *name) {
    if (!buf || size != sizeof(T)) {
        report("cuBLASLt: attribute %s takes %zu bytes, not %zu", name, sizeof(T), size);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    memcpy(dst, buf, sizeof(T));
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    init();
    *h = new mp_emu_lt();
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
    *d = new mp_emu_lt_desc{compute, scale, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT,
                            nullptr, -1};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                              cublasLtMatmulDescAttributes_t attr, const void *buf,
                                              size_t size) {
    if (!d) return CUBLAS_STATUS_NOT_INITIALIZED;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return set_value(&d->transa, buf, size, "TRANSA");
    case CUBLASLT_MATMUL_DESC_TRANSB: return set_value(&d->transb, buf, size, "TRANSB");
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return set_value(&d->epilogue, buf, size, "EPILOGUE");
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return set_value(&d->bias, buf, size, "BIAS_POINTER");
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE:
        return set_value(&d->bias_type, buf, size, "BIAS_DATA_TYPE");
    default:
        report("cublasLtMatmulDescSetAttribute: attribute %d is not emulated", (int)attr);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
    if (rows > INT32_MAX || cols > INT32_MAX || ld < 1 || ld > INT32_MAX ||
        (uint64_t)ld < rows) {
        report("cublasLtMatrixLayoutCreate: (%llu x %llu, ld %lld) is not a layout this "
               "emulator takes", (unsigned long long)rows, (unsigned long long)cols,
               (long long)ld);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    *l = new mp_emu_lt_layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = new mp_emu_lt_pref{0, CUBLASLT_REDUCTION_SCHEME_MASK, {256, 256, 256, 256}};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void *buf, size_t size) {
    if (!p) return CUBLAS_STATUS_NOT_INITIALIZED;
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
        return set_value(&p->workspace, buf, size, "MAX_WORKSPACE_BYTES");
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
        return set_value(&p->reduction_mask, buf, size, "REDUCTION_SCHEME_MASK");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
        return set_value(&p->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, size,
                         "MIN_ALIGNMENT_*_BYTES");
    default:
        report("cublasLtMatmulPreferenceSetAttribute: attribute %d is not emulated", (int)attr);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}

namespace {

// The one configuration emulated: bf16 A and B, fp32 C and D, fp32 compute and scale, the
// default or bias epilogue with an fp32 bias of D's rows; or the reason it is not.
const char *lt_unsupported(const mp_emu_lt_desc *d, const mp_emu_lt_layout *a,
                           const mp_emu_lt_layout *b, const mp_emu_lt_layout *c,
                           const mp_emu_lt_layout *dd) {
    if (d->compute != CUBLAS_COMPUTE_32F || d->scale != CUDA_R_32F)
        return "compute and scale types other than CUBLAS_COMPUTE_32F / CUDA_R_32F";
    if (a->type != CUDA_R_16BF || b->type != CUDA_R_16BF || c->type != CUDA_R_32F ||
        dd->type != CUDA_R_32F)
        return "types other than bf16 A, B and fp32 C, D";
    if (d->epilogue != CUBLASLT_EPILOGUE_DEFAULT && d->epilogue != CUBLASLT_EPILOGUE_BIAS)
        return "epilogues other than DEFAULT and BIAS";
    if (d->epilogue == CUBLASLT_EPILOGUE_BIAS && d->bias_type != -1 && d->bias_type != CUDA_R_32F)
        return "a bias of a type other than D's (fp32)";
    if ((d->transa != CUBLAS_OP_N && d->transa != CUBLAS_OP_T) ||
        (d->transb != CUBLAS_OP_N && d->transb != CUBLAS_OP_T))
        return "transposes other than N and T";
    if (c->rows != dd->rows || c->cols != dd->cols || c->ld != dd->ld)
        return "C and D of different layouts";
    return nullptr;
}

}  // namespace

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dd,
                                              cublasLtMatmulPreference_t p, int requested,
                                              cublasLtMatmulHeuristicResult_t results[],
                                              int *returned) {
    if (!h || !d || !a || !b || !c || !dd || !p) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (requested < 1 || !results || !returned) return CUBLAS_STATUS_INVALID_VALUE;
    *returned = 0;
    if (const char *why = lt_unsupported(d, a, b, c, dd)) {
        report("cublasLtMatmulAlgoGetHeuristic: %s: not supported (by cuBLASLt, or by this "
               "emulator)", why);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    // MP_EMU_LT_NO_ALGO=1: no algorithm, as cuBLASLt answers for configurations it lacks
    const char *none = getenv("MP_EMU_LT_NO_ALGO");
    if (none && !strcmp(none, "1")) return CUBLAS_STATUS_SUCCESS;
    // one algorithm, which needs no workspace and splits no sum (reduction scheme NONE, which
    // no mask excludes)
    lt_algo al;
    for (int i = 0; i < 4; i++) al.align[i] = p->align[i];
    al.align[4] = d->epilogue == CUBLASLT_EPILOGUE_BIAS ? pointer_alignment(d->bias) : 256;
    al.workspace = p->workspace;
    memset(&results[0], 0, sizeof results[0]);
    memcpy(results[0].algo.data, &al, sizeof al);
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha,
                              const void *A, cublasLtMatrixLayout_t a, const void *B,
                              cublasLtMatrixLayout_t b, const void *beta, const void *C,
                              cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t dd,
                              const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
    const char *call = "cublasLtMatmul";
    (void)stream;   // one stream: the legacy default
    if (!h || !d || !a || !b || !c || !dd) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!alpha || !beta || !algo) return CUBLAS_STATUS_INVALID_VALUE;
    if (const char *why = lt_unsupported(d, a, b, c, dd)) {
        report("%s: %s: not supported (by cuBLASLt, or by this emulator)", call, why);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (C != D) {
        report("%s: C and D at different addresses: not emulated", call);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    lt_algo al;
    memcpy(&al, algo->data, sizeof al);
    const void *ptr[5] = {A, B, C, D, d->epilogue == CUBLASLT_EPILOGUE_BIAS ? d->bias : nullptr};
    const char *name[5] = {"A", "B", "C", "D", "the bias"};
    for (int i = 0; i < 5; i++)
        if (ptr[i] && pointer_alignment(ptr[i]) < al.align[i]) {
            report("%s: %s at %p is %u-byte aligned, but the algorithm was found for %u bytes",
                   call, name[i], ptr[i], pointer_alignment(ptr[i]), al.align[i]);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    if (workspace_bytes > al.workspace) {
        report("%s: %zu bytes of workspace, more than the %llu the heuristic was allowed", call,
               workspace_bytes, (unsigned long long)al.workspace);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    char why[200];
    if (workspace_bytes && !device_range(workspace, workspace_bytes, why, sizeof why)) {
        report("%s: workspace: %s", call, why);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // column-major m x n = op(A) (m x k) op(B) (k x n)
    int m = (int)dd->rows, n = (int)dd->cols;
    int k = (int)(d->transa == CUBLAS_OP_N ? a->cols : a->rows);
    int am = (int)(d->transa == CUBLAS_OP_N ? a->rows : a->cols);
    int bk = (int)(d->transb == CUBLAS_OP_N ? b->rows : b->cols);
    int bn = (int)(d->transb == CUBLAS_OP_N ? b->cols : b->rows);
    if (am != m || bk != k || bn != n) {
        report("%s: op(A) %d x %d, op(B) %d x %d and D %d x %d do not multiply", call, am, k, bk,
               bn, m, n);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    // gemm only checks that it has a handle
    cublasStatus_t s = gemm(call, (cublasHandle_t)h, (cublasOperation_t)d->transa,
                            (cublasOperation_t)d->transb, m, n, k, *(const float *)alpha, A,
                            (int)a->ld, 0, B, (int)b->ld, 0, CUDA_R_16BF, *(const float *)beta,
                            (float *)D, (int)dd->ld, 0, 1);
    if (s != CUBLAS_STATUS_SUCCESS || d->epilogue != CUBLASLT_EPILOGUE_BIAS) return s;
    // the bias epilogue: bias (m) added to every column of D
    if (!device_range(d->bias, (size_t)m * sizeof(float), why, sizeof why)) {
        report("%s: bias of %d floats: %s", call, m, why);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    DeviceWork work;
    const float *bias = (const float *)d->bias;
    float *out = (float *)D;
    for (int j = 0; j < n; j++)
        for (int r = 0; r < m; r++) out[(size_t)j * dd->ld + r] += bias[r];
    return CUBLAS_STATUS_SUCCESS;
}

// ---------------------------------------------------------------------------------------
// CUB

cudaError_t cub::DeviceRadixSort::SortPairs(void *tmp, size_t &tmp_bytes,
                                            const uint32_t *keys_in, uint32_t *keys_out,
                                            const int32_t *vals_in, int32_t *vals_out, int n,
                                            int begin_bit, int end_bit, cudaStream_t) {
    init();
    size_t need = (size_t)std::max(n, 1) * 8 + 256;
    if (!tmp) {
        tmp_bytes = need;
        return cudaSuccess;
    }
    if (n < 0 || begin_bit < 0 || end_bit > 32 || begin_bit >= end_bit || tmp_bytes < need)
        return cudaErrorInvalidValue;
    char why[200];
    size_t b = (size_t)n * 4;
    if (!device_range(tmp, need, why, sizeof why) || !device_range(keys_in, b, why, sizeof why) ||
        !device_range(keys_out, b, why, sizeof why) || !device_range(vals_in, b, why, sizeof why) ||
        !device_range(vals_out, b, why, sizeof why)) {
        report("cub::DeviceRadixSort::SortPairs of %d items: %s", n, why);
        return cudaErrorInvalidValue;
    }
    DeviceWork work;
    uint32_t mask = end_bit - begin_bit == 32 ? 0xffffffffu : ((1u << (end_bit - begin_bit)) - 1);
    std::vector<int> order((size_t)n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int c) {
        return ((keys_in[a] >> begin_bit) & mask) < ((keys_in[c] >> begin_bit) & mask);
    });
    std::vector<uint32_t> k((size_t)n);
    std::vector<int32_t> v((size_t)n);
    for (int i = 0; i < n; i++) {
        k[(size_t)i] = keys_in[order[(size_t)i]];
        v[(size_t)i] = vals_in[order[(size_t)i]];
    }
    memcpy(keys_out, k.data(), b);
    memcpy(vals_out, v.data(), b);
    return cudaSuccess;
}
