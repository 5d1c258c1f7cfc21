// The hang watchdog (watchdog.h). One thread per rank reads the time of the last beat every
// second or so; the training thread only stores two atomics per beat.
//
// A process that was stopped as a whole (SIGSTOP: Slurm's suspend and gang scheduling, a
// shell's ^Z) did not stall on its own: when this thread finds that it has not run for
// much longer than its period, the time is forgiven, as it would be for every rank of a
// suspended job. A rank waiting for a frozen peer keeps running, and does not forgive.
//
// Past the timeout the thread writes its line and leaves with _exit: it cannot call MPI
// (MPI runs funneled, MPI_THREAD_FUNNELED: only the training thread calls it, and it may be
// inside it now), and the launchers end a job whose rank exits before MPI_Finalize (mpirun
// at once; srun with --wait, as launch/slurm_train.sh runs it). The rank that stalled may
// be frozen itself; one of the ranks waiting for it gives the line.
#include "core/watchdog.h"
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "core/log.h"

static struct {
    double timeout_s;
    int rank;                          // read once: MPI is not called from the thread
    _Atomic long long last_ms;         // mp_now() of the last beat, in ms
    _Atomic(const char *) last_what;   // where it was
    int stop, running;                 // stop: under lock
    pthread_mutex_t lock;
    pthread_cond_t wake;               // mp_watchdog_stop wakes the thread at once
    pthread_t thread;
} W = {.lock = PTHREAD_MUTEX_INITIALIZER};

static long long now_ms(void) { return (long long)(mp_now() * 1e3); }

void mp_watchdog_beat(const char *what) {
    atomic_store_explicit(&W.last_what, what, memory_order_relaxed);
    atomic_store_explicit(&W.last_ms, now_ms(), memory_order_release);
}

// The line, then the exit: write(2) in one call, with stderr made non-blocking first, so
// that neither stdio's lock (the training thread may hold it) nor a stderr that no longer
// drains (a full pipe, a file on the hung file system) keeps the process from leaving.
static void give_up(double idle, const char *what) {
    char line[320];
    int n = snprintf(line, sizeof line, "millipede: rank %d: no progress for %.0f s "
                     "(system.hang_timeout = %g s) since %s: a rank or the file system "
                     "stalled; ending the job\n", W.rank, idle, W.timeout_s, what);
    int fl = fcntl(2, F_GETFL);
    if (fl >= 0) fcntl(2, F_SETFL, fl | O_NONBLOCK);
    if (n > 0) {
        ssize_t w = write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
        (void)w;   // nothing is left to do if even this fails
    }
    _exit(1);
}

static void *watch(void *arg) {
    (void)arg;
    // looks every tenth of the timeout, and at least once a second: the line comes at most
    // 10 % late
    double period = W.timeout_s / 10 < 1.0 ? W.timeout_s / 10 : 1.0;
    // this long away: the process was stopped, not late; under half the timeout, so that
    // a stop of any length that would trip it is forgiven
    long long gap_ms = (long long)(5e3 * period) + 5000;
    if (gap_ms > (long long)(500 * W.timeout_s)) gap_ms = (long long)(500 * W.timeout_s);
    long long prev = now_ms();
    pthread_mutex_lock(&W.lock);
    while (!W.stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        long long ns = until.tv_nsec + (long long)(period * 1e9);
        until.tv_sec += (time_t)(ns / 1000000000);
        until.tv_nsec = (long)(ns % 1000000000);
        pthread_cond_timedwait(&W.wake, &W.lock, &until);   // a timeout or a wake: look again
        if (W.stop) break;
        long long now = now_ms();
        if (now - prev > gap_ms)   // the stop's time is forgiven; where it was stays
            atomic_fetch_add_explicit(&W.last_ms, now - prev, memory_order_acq_rel);
        prev = now;
        long long last = atomic_load_explicit(&W.last_ms, memory_order_acquire);
        double idle = (double)(now - last) / 1e3;
        if (idle <= W.timeout_s) continue;
        give_up(idle, atomic_load_explicit(&W.last_what, memory_order_relaxed));
    }
    pthread_mutex_unlock(&W.lock);
    return NULL;
}

void mp_watchdog_start(double timeout_s) {
    if (timeout_s <= 0.0 || W.running) return;
    W.timeout_s = timeout_s;
    W.rank = mp_rank();
    W.stop = 0;
    mp_watchdog_beat("the start");
    pthread_condattr_t attr;   // the wait's deadline on mp_now's clock
    int rc = pthread_condattr_init(&attr);
    if (rc == 0) rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0) rc = pthread_cond_init(&W.wake, &attr);
    if (rc != 0) mp_fatal("the hang watchdog could not start: %s", strerror(rc));
    pthread_condattr_destroy(&attr);
    // the signals (preemption, SIGINT) stay with the training thread: its handlers run there
    sigset_t all, old;
    sigfillset(&all);
    rc = pthread_sigmask(SIG_SETMASK, &all, &old);
    if (rc == 0) rc = pthread_create(&W.thread, NULL, watch, NULL);
    int rc2 = pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0 || rc2 != 0)
        mp_fatal("the hang watchdog could not start: %s", strerror(rc ? rc : rc2));
    W.running = 1;
}

void mp_watchdog_stop(void) {
    if (!W.running) return;
    pthread_mutex_lock(&W.lock);
    W.stop = 1;
    pthread_cond_signal(&W.wake);
    pthread_mutex_unlock(&W.lock);
    int rc = pthread_join(W.thread, NULL);
    if (rc != 0) mp_fatal("the hang watchdog did not stop: %s", strerror(rc));
    pthread_cond_destroy(&W.wake);
    W.running = 0;
}
