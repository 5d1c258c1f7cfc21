// Logging, fatal errors and checked library calls. Every MPI/HDF5 call goes through a
// check macro so a failure reports file:line and the library's own message.
#pragma once
#include <stddef.h>

// Prints "millipede: <msg>" on stderr and ends the process (MPI_Abort when more than one
// rank runs, so no rank waits forever; exit(status) otherwise).
void mp_fatal_at(const char *file, int line, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));
#define mp_fatal(...) mp_fatal_at(__FILE__, __LINE__, __VA_ARGS__)
// A one-line user-facing error (bad input), no file:line; exits with status 2 on every
// rank that calls it (all ranks see the same input, so all of them call it).
void mp_input_error(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
// Writes a one-line message into err (when err is not NULL) and returns -1: the way
// functions that report bad input to their caller fail.
int mp_errf(char *err, size_t err_len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
// Rank-0 info line on stdout.
void mp_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

int mp_rank(void);      // MPI rank, 0 before MPI_Init
int mp_world(void);     // MPI world size, 1 before MPI_Init

void *mp_malloc_at(size_t bytes, const char *file, int line);
void *mp_calloc_at(size_t n, size_t size, const char *file, int line);
#define mp_malloc(b) mp_malloc_at((b), __FILE__, __LINE__)
// Scratch that grows: returns p when *cap >= bytes, else frees it and allocates bytes
// (contents are not kept). Keeps per-step buffers allocated across steps.
void *mp_grow_at(void *p, size_t *cap, size_t bytes, const char *file, int line);
#define mp_grow(p, cap, b) mp_grow_at((p), (cap), (b), __FILE__, __LINE__)
#define mp_calloc(n, s) mp_calloc_at((n), (s), __FILE__, __LINE__)

double mp_now(void);    // monotonic seconds

void mp_check_mpi_at(int rc, const char *file, int line);
#define MP_CHECK_MPI(call) mp_check_mpi_at((call), __FILE__, __LINE__)
// HDF5 calls return negative on failure; the HDF5 error stack is printed first.
long long mp_check_h5_at(long long rc, const char *what, const char *file, int line);
#define MP_CHECK_H5(call) mp_check_h5_at((long long)(call), #call, __FILE__, __LINE__)
