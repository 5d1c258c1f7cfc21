#include "fs.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int mp_mkdirs(const char *path, char *err, size_t err_len) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; ; p++) {
        char c = *p;
        if (c != '/' && c != '\0') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
            snprintf(err, err_len, "%s: cannot create directory: %s", buf, strerror(errno));
            return -1;
        }
        *p = c;
        if (c == '\0') break;
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, err_len, "%s: not a directory", path);
        return -1;
    }
    return 0;
}

int mp_write_text_file(const char *path, const char *text, char *err, size_t err_len) {
    return mp_write_file(path, text, strlen(text), err, err_len);
}

int mp_write_file(const char *path, const void *data, size_t len, char *err, size_t err_len) {
    const char *text = data;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        snprintf(err, err_len, "%s: cannot write: %s", tmp, strerror(errno));
        return -1;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t w = write(fd, text + done, len - done);
        if (w < 0) {
            snprintf(err, err_len, "%s: write failed: %s", tmp, strerror(errno));
            close(fd);
            return -1;
        }
        done += (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
        snprintf(err, err_len, "%s: cannot finish writing: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}
