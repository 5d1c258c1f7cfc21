// The checkpoints directory: step_%08d/ per checkpoint, step_%08d.tmp/ while one is being
// written, and `latest`, a relative symlink to the newest complete one. Only rank 0 changes
// it. A crash at any moment leaves every complete step_%08d/ and `latest` intact: new
// data goes to a .tmp directory, which becomes visible by one rename, and `latest` is
// replaced by another rename. A checkpoint is removed the same way backwards: renamed to
// a .tmp name, then emptied. So a directory named step_%08d is always complete, and the
// newest one is always the one to resume from (`latest` can be one behind it: a crash
// between the two renames of a commit).
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt/checkpoint_private.h"
#include "core/log.h"

// "step_00000120" -> 120; -1 for anything else (a .tmp suffix included).
static long parse_step_name(const char *name) {
    if (strncmp(name, "step_", 5) || strlen(name) != 13) return -1;
    long step = 0;
    for (const char *p = name + 5; *p; p++) {
        if (*p < '0' || *p > '9') return -1;
        step = step * 10 + (*p - '0');
    }
    return step;
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int cmp_desc(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

int ck_list_steps(const char *root, long **out) {
    *out = NULL;
    DIR *d = opendir(root);
    if (!d) return 0;
    int n = 0, cap = 0;
    long *steps = NULL;
    struct dirent *e;
    char path[CK_PATH];
    while ((e = readdir(d))) {
        long s = parse_step_name(e->d_name);
        ck_join(path, sizeof path, root, e->d_name);
        if (s < 0 || !is_dir(path)) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            steps = realloc(steps, (size_t)cap * sizeof *steps);
            if (!steps) mp_fatal("out of memory");
        }
        steps[n++] = s;
    }
    closedir(d);
    if (n > 1)  // qsort's array must not be NULL even when empty (UBSan: nonnull-attribute)
        qsort(steps, (size_t)n, sizeof *steps, cmp_desc);
    *out = steps;
    return n;
}

long ck_latest_step(const char *root) {
    char link[CK_PATH], target[256];
    ck_join(link, sizeof link, root, MP_CKPT_LATEST);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return -1;
    target[n] = '\0';
    return parse_step_name(target);
}

int ck_set_latest(const char *root, long step, char *err, size_t err_len) {
    char link[CK_PATH], tmp[CK_PATH], target[32];
    ck_join(link, sizeof link, root, MP_CKPT_LATEST);
    ck_join(tmp, sizeof tmp, root, MP_CKPT_LATEST ".tmp");
    snprintf(target, sizeof target, CK_STEP_NAME, step);
    unlink(tmp);
    if (symlink(target, tmp) != 0 || rename(tmp, link) != 0) {
        snprintf(err, err_len, "%s: cannot point at %s: %s", link, target, strerror(errno));
        unlink(tmp);
        return -1;
    }
    mp_fsync_path(root, O_RDONLY | O_DIRECTORY);   // best effort: some file systems refuse
    return 0;
}

int ck_remove_dir(const char *path) {
    DIR *d = opendir(path);
    if (!d) return -1;
    struct dirent *e;
    char f[CK_PATH];
    int rc = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        ck_join(f, sizeof f, path, e->d_name);
        if (unlink(f) != 0) rc = -1;
    }
    closedir(d);
    return rmdir(path) == 0 ? rc : -1;
}

void ck_remove_tmp_dirs(const char *root) {
    DIR *d = opendir(root);
    if (!d) return;
    struct dirent *e;
    char path[CK_PATH];
    // collect first: removing entries while reading the directory may skip some
    int n = 0;
    char (*names)[256] = NULL;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, "step_", 5) || len < 9 || strcmp(e->d_name + len - 4, ".tmp"))
            continue;
        names = realloc(names, (size_t)(n + 1) * sizeof *names);
        if (!names) mp_fatal("out of memory");
        snprintf(names[n++], sizeof names[0], "%s", e->d_name);
    }
    closedir(d);
    for (int i = 0; i < n; i++) {
        ck_join(path, sizeof path, root, names[i]);
        if (ck_remove_dir(path) != 0)
            fprintf(stderr, "millipede: warning: %s: cannot remove this leftover of an "
                    "interrupted checkpoint: %s\n", path, strerror(errno));
    }
    free(names);
}

// Removes checkpoint root/step_%08d: renamed to step_%08d.gone.tmp first, so that a crash
// halfway never leaves an incomplete checkpoint under a checkpoint's name (the next
// checkpoint's ck_remove_tmp_dirs clears what is left). Returns -1 with path set.
static int discard_step(const char *root, long step, char *path, size_t path_len) {
    char name[32], gone[CK_PATH + 16];
    snprintf(name, sizeof name, CK_STEP_NAME, step);
    ck_join(path, path_len, root, name);
    snprintf(gone, sizeof gone, "%s.gone.tmp", path);
    if (rename(path, gone) != 0) return -1;
    return ck_remove_dir(gone);
}

void ck_prune(const char *root, long current, int keep) {
    long *steps;
    int n = ck_list_steps(root, &steps);
    long latest = ck_latest_step(root);
    int kept = 0;
    char path[CK_PATH];
    for (int i = 0; i < n; i++) {   // newest first
        if (steps[i] <= current && (kept < keep || steps[i] == latest)) {
            kept++;
            continue;
        }
        if (discard_step(root, steps[i], path, sizeof path) != 0)
            fprintf(stderr, "millipede: warning: %s: cannot remove old checkpoint: %s\n", path,
                    strerror(errno));
    }
    free(steps);
}

// Checkpoints at or after the step being committed belong to an abandoned history (a run
// restarted with --no-resume, or --resume of an older checkpoint) or are the bad one that
// resuming fell back from. They must be gone before the commit's rename: mp_ckpt_resume
// tries checkpoints newer than `latest` first, and after the commit the new one must be
// the newest. Until then they stay resumable, as before any new checkpoint. `latest` moves
// back to the newest older checkpoint (or goes) first, so it never names a missing one.
int ck_drop_from(const char *root, long step, char *err, size_t err_len) {
    long *steps;
    int n = ck_list_steps(root, &steps), k = 0, rc = 0;
    while (k < n && steps[k] >= step) k++;   // newest first: steps[0..k) go
    long latest = ck_latest_step(root);
    char link[CK_PATH], path[CK_PATH];
    ck_join(link, sizeof link, root, MP_CKPT_LATEST);
    if (k > 0 && latest >= step) {
        if (k < n) {
            rc = ck_set_latest(root, steps[k], err, err_len);
        } else if (unlink(link) != 0 && errno != ENOENT) {
            snprintf(err, err_len, "%s: cannot remove: %s", link, strerror(errno));
            rc = -1;
        }
    }
    for (int i = 0; i < k && rc == 0; i++) {
        if (discard_step(root, steps[i], path, sizeof path) != 0) {
            snprintf(err, err_len, "%s: cannot remove it (a checkpoint of step %ld or later is "
                     "in the way of the new one): %s", path, step, strerror(errno));
            rc = -1;
        }
    }
    free(steps);
    return rc;
}

int mp_ckpt_resolve(const char *path, char *out, size_t out_len, char *err, size_t err_len) {
    char probe[CK_PATH], root[CK_PATH];
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, err_len, "%s: no such checkpoint: %s", path, strerror(errno));
        return -1;
    }
    ck_join(probe, sizeof probe, path, MP_CKPT_INDEX);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    // a checkpoint (an incomplete one too: loading it names what is missing), or a file
    if (!S_ISDIR(st.st_mode) || access(probe, F_OK) == 0 || parse_step_name(base) >= 0) {
        snprintf(out, out_len, "%s", path);
        return 0;
    }
    // a checkpoints/ directory, or a run directory holding one
    snprintf(root, sizeof root, "%s", path);
    long step = ck_latest_step(root);
    if (step < 0) {
        ck_join(root, sizeof root, path, "checkpoints");
        step = ck_latest_step(root);
    }
    if (step < 0) {
        snprintf(err, err_len, "%s: not a checkpoint (no %s), and no checkpoints/%s in it", path,
                 MP_CKPT_INDEX, MP_CKPT_LATEST);
        return -1;
    }
    char name[32];
    snprintf(name, sizeof name, CK_STEP_NAME, step);
    ck_join(out, out_len, root, name);
    return 0;
}

int mp_ckpt_exists(const char *run_dir) {
    char root[CK_PATH];
    ck_join(root, sizeof root, run_dir, "checkpoints");
    long *steps;
    int n = ck_list_steps(root, &steps);
    free(steps);
    return n > 0;
}
