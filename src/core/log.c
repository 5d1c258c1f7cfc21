#include "log.h"
#include <hdf5.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int mp_rank(void) {
    int init = 0, fin = 0, r = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (init && !fin) MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

int mp_world(void) {
    int init = 0, fin = 0, n = 1;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (init && !fin) MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n;
}

void mp_fatal_at(const char *file, int line, const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "millipede: rank %d: %s (%s:%d)\n", mp_rank(), msg, file, line);
    fflush(stderr);
    if (mp_world() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

void mp_input_error(const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (mp_rank() == 0) fprintf(stderr, "millipede: error: %s\n", msg);
    fflush(stderr);
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (init && !fin) MPI_Finalize();
    exit(2);
}

int mp_errf(char *err, size_t err_len, const char *fmt, ...) {
    if (err && err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return -1;
}

void mp_log(const char *fmt, ...) {
    if (mp_rank() != 0) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

void *mp_malloc_at(size_t bytes, const char *file, int line) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) mp_fatal_at(file, line, "out of memory allocating %zu bytes", bytes);
    return p;
}

void *mp_calloc_at(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) mp_fatal_at(file, line, "out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

void *mp_grow_at(void *p, size_t *cap, size_t bytes, const char *file, int line) {
    if (p && bytes <= *cap) return p;
    free(p);
    *cap = bytes;
    return mp_malloc_at(bytes, file, line);
}

double mp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

void mp_check_mpi_at(int rc, const char *file, int line) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    mp_fatal_at(file, line, "MPI error: %s", msg);
}

long long mp_check_h5_at(long long rc, const char *what, const char *file, int line) {
    if (rc >= 0) return rc;
    H5Eprint2(H5E_DEFAULT, stderr);
    mp_fatal_at(file, line, "HDF5 call failed: %s", what);
}
