#include "run_lock.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "core/log.h"
#include "millipede/config.h"

int mp_run_lock(const char *run_dir, char *err, size_t err_len) {
    char path[MP_PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/lock", run_dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return mp_errf(err, err_len, "%s: cannot open: %s", path, strerror(errno));
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    if (fcntl(fd, F_SETLK, &fl) != 0) {
        int e = errno;
        if (e == EACCES || e == EAGAIN) {
            char holder[512] = "";
            ssize_t n = pread(fd, holder, sizeof holder - 1, 0);
            holder[n > 0 ? n : 0] = '\0';
            holder[strcspn(holder, "\n")] = '\0';
            close(fd);
            return mp_errf(err, err_len, "run.dir %s is in use by another job (%s; %s): one job per "
                           "run directory: wait for it to end, or choose another run.dir", run_dir,
                           holder[0] ? holder : "holder not recorded yet", path);
        }
        close(fd);
        if (e == ENOLCK || e == EOPNOTSUPP || e == ENOSYS) {
            fprintf(stderr, "millipede: warning: %s: this file system has no locks (%s): nothing "
                    "keeps a second job out of run.dir\n", path, strerror(e));
            return 0;
        }
        return mp_errf(err, err_len, "%s: cannot lock: %s", path, strerror(e));
    }
    char host[256] = "?", when[32] = "?", text[512];
    gethostname(host, sizeof host - 1);
    time_t now = time(NULL);
    struct tm tm;
    if (gmtime_r(&now, &tm)) strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    const char *job = getenv("SLURM_JOB_ID");
    int len = snprintf(text, sizeof text, "host %s, pid %ld, Slurm job %s, since %s\n", host,
                       (long)getpid(), job ? job : "none", when);
    if (ftruncate(fd, 0) != 0 || pwrite(fd, text, (size_t)len, 0) != len) {
        int e = errno;
        close(fd);
        return mp_errf(err, err_len, "%s: cannot write: %s", path, strerror(e));
    }
    // fd stays open (and is never closed: closing any descriptor of the file would drop a
    // POSIX lock): the lock lasts until the process ends
    return 0;
}
