// A second raw baseline for tools/bench/bench_ckpt.sh: sequential 1 MiB pwrites of BYTES
// bytes to PATH, then fsync, by a process that first allocates and touches HOLD_MIB MiB
// (the trainer's resident size). On the development VM a writer holding ~10 GiB writes
// several times slower than one holding nothing (dd); this measures that floor.
//     cc -O2 -o bench_pwrite tools/bench/bench_pwrite.c && ./bench_pwrite PATH BYTES HOLD_MIB
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: bench_pwrite PATH BYTES HOLD_MIB\n");
        return 2;
    }
    long long bytes = atoll(argv[2]);
    size_t hold = (size_t)atoll(argv[3]) << 20, block = 1 << 20;
    char *held = malloc(hold ? hold : 1), *buf = malloc(block);
    if (!held || !buf) return 1;
    memset(held, 1, hold);   // resident, like the model's parameters and moments
    for (size_t i = 0; i < block; i++) buf[i] = (char)(i * 2654435761u >> 24);
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return 1;
    double t0 = now();
    for (long long off = 0; off < bytes; off += (long long)block)
        if (pwrite(fd, buf, block, off) != (ssize_t)block) return 1;
    if (fsync(fd) != 0) return 1;
    double t1 = now();
    close(fd);
    printf("%.3f\n", t1 - t0);
    return held[hold ? hold - 1 : 0] == 7;   // keep `held` alive to the end
}
