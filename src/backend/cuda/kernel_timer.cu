// The kernel timer (backend.h kernel_timer / kernel_times; train.profile): where a step's GPU
// time goes, kernel by kernel, without a profiler attached (ncu could not profile the
// training process on the GPU machine; docs/cuda.md).
//
// Every kernel launch (KERNEL_CHECK), cuBLAS GEMM, CUB sort, memset, copy and NCCL call
// records an event on the default stream right after it, tagged with its site (file:line,
// the launching function) and the label the model set (its phase). An operation's time is
// the time from the event before it (the previous operation's, or the baseline that each
// device synchronisation sets) to its own: the GPU runs the stream in order, so that is the
// operation's own run, plus any time the GPU sat idle waiting for the host to queue it. So
// a launch-bound stretch shows up as slow small kernels, and host work between two
// operations (after a copy to the host, or after a synchronisation: the host's time from
// the baseline to the next operation) counts to the operation after it: which is what it
// costs the step. Recording does not wait; the times are read when the queue is drained: at
// every synchronize, which train.profile does at each phase boundary, when the pool of
// events fills, and when the totals are read.
#include <stdlib.h>
#include <string.h>
#include "backend/cuda/cuda_common.h"

#define TIMER_EVENTS 4096   // marks between two drains of the queue

typedef struct {
    const char *label, *what, *file;   // static strings: compared by address
    int line;
    long calls;
    double ms;
} timer_site;

static struct {
    const char *label;         // NULL: the timer is off
    timer_site *site;          // (n_site) the totals since the last read
    int n_site, cap_site;
    cudaEvent_t ev[TIMER_EVENTS];   // ev[0]: the baseline; ev[1..n_ev): marks
    int ev_site[TIMER_EVENTS];
    int n_ev, created;
} T;

static int site_index(const char *what, const char *file, int line) {
    for (int i = 0; i < T.n_site; i++) {
        timer_site *s = &T.site[i];
        if (s->line == line && s->file == file && s->label == T.label && s->what == what) return i;
    }
    if (T.n_site == T.cap_site) {
        T.cap_site = T.cap_site ? 2 * T.cap_site : 256;
        T.site = (timer_site *)realloc(T.site, (size_t)T.cap_site * sizeof *T.site);
        if (!T.site) mp_fatal("out of memory (kernel timer, %d sites)", T.cap_site);
    }
    timer_site *s = &T.site[T.n_site];
    s->label = T.label;
    s->what = what;
    s->file = file;
    s->line = line;
    s->calls = 0;
    s->ms = 0.0;
    return T.n_site++;
}

// Waits for the queue, adds each mark's time to its site, and keeps the last event as the
// baseline of the marks that follow.
static void drain(void) {
    if (T.n_ev == 0) return;
    CUDA_CHECK(cudaEventSynchronize(T.ev[T.n_ev - 1]));
    for (int i = 1; i < T.n_ev; i++) {
        float ms = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, T.ev[i - 1], T.ev[i]));
        T.site[T.ev_site[i]].calls++;
        T.site[T.ev_site[i]].ms += ms;
    }
    cudaEvent_t last = T.ev[T.n_ev - 1];
    T.ev[T.n_ev - 1] = T.ev[0];
    T.ev[0] = last;
    T.n_ev = 1;
}

// A new baseline now: what ran before is accounted, and the time up to here (the host's
// work before the synchronisation and the wait itself) counts to nobody.
static void rebase(void) {
    drain();
    CUDA_CHECK(cudaEventRecord(T.ev[0], 0));
    T.n_ev = 1;
}

void mp_cuda_mark(const char *what, const char *file, int line) {
    if (!T.label) return;
    // A full pool is drained before this mark's event: the operation it follows is queued
    // already, so the GPU runs it during the wait, and the wait is on earlier operations
    // only. Never on this one, which may be an NCCL call whose peer stalled: the nccl
    // transport waits for those itself, under its deadline (comm_nccl.cu).
    if (T.n_ev == TIMER_EVENTS) drain();
    int i = T.n_ev++;
    T.ev_site[i] = site_index(what, file, line);
    CUDA_CHECK(cudaEventRecord(T.ev[i], 0));
}

void mp_cuda_launched(const char *file, int line, const char *func) {
    mp_cuda_check_at(cudaGetLastError(), "kernel launch", file, line);
    mp_cuda_mark(func, file, line);
}

void mp_cuda_timer_synchronized(void) {
    if (T.label) rebase();
}

void mp_cuda_kernel_timer(const char *label) {
    if (label && !T.label) {
        if (!T.created) {
            for (int i = 0; i < TIMER_EVENTS; i++) CUDA_CHECK(cudaEventCreate(&T.ev[i]));
            T.created = 1;
        }
        T.label = label;
        CUDA_CHECK(cudaDeviceSynchronize());
        T.n_ev = 0;
        rebase();
    } else if (!label && T.label) {
        drain();
        T.label = NULL;
        T.n_ev = 0;
    } else {
        T.label = label;
    }
}

static int longest_first(const void *a, const void *b) {
    double x = ((const timer_site *)a)->ms, y = ((const timer_site *)b)->ms;
    return x > y ? -1 : x < y ? 1 : 0;
}

int mp_cuda_kernel_times(mp_kernel_time *out, int max) {
    if (T.label) drain();   // before the sort: the queued marks name sites by index
    qsort(T.site, (size_t)T.n_site, sizeof *T.site, longest_first);
    int n = 0;
    for (int i = 0; i < T.n_site && out && n < max; i++) {
        if (!T.site[i].calls) continue;
        const char *base = strrchr(T.site[i].file, '/');
        out[n].label = T.site[i].label;
        out[n].what = T.site[i].what;
        out[n].file = base ? base + 1 : T.site[i].file;
        out[n].line = T.site[i].line;
        out[n].calls = T.site[i].calls;
        out[n].ms = T.site[i].ms;
        n++;
    }
    // no mark is queued after the drain, so the sites may move; the totals start again now,
    // from a new baseline, so that the time before this read counts to nobody
    for (int i = 0; i < T.n_site; i++) {
        T.site[i].calls = 0;
        T.site[i].ms = 0.0;
    }
    if (T.label) rebase();
    return n;
}
