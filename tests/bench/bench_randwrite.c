/* bench_randwrite.c: N random 4 KiB writes (4 KiB aligned, seeded) into an
 * image through the engine, then a flush; prints the seconds taken. With
 * --script it prints the same writes as qemu-io commands instead, so one run of
 * the benchmark times both tools on identical work. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "qcow2.h"

static uint64_t next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

int main(int argc, char **argv)
{
    if (argc != 4 && !(argc == 5 && !strcmp(argv[1], "--script"))) {
        fprintf(stderr, "usage: bench_randwrite [--script] IMG COUNT SEED\n");
        return 2;
    }
    int script = argc == 5;
    const char *file = argv[1 + script];
    long count = atol(argv[2 + script]);
    uint64_t seed = strtoull(argv[3 + script], NULL, 0) | 1;
    struct qcow2_image *img = NULL;
    uint64_t size;
    if (!script) {
        struct qcow2_open_opts o = {.read_write = true};
        int ret = qcow2_open(file, &o, &img);
        if (ret < 0) {
            fprintf(stderr, "bench_randwrite: %s: %s\n", file, err_msg(ret));
            return 1;
        }
        size = qcow2_size(img);
    } else {
        size = strtoull(file, NULL, 0); /* with --script, IMG is the disk size */
    }
    unsigned char buf[4096];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        uint64_t off = (next(&seed) % (size / 4096)) * 4096;
        unsigned char pat = (unsigned char)(i * 7 + 1);
        if (script) {
            printf("write -q -P %u %llu 4096\n", pat, (unsigned long long)off);
            continue;
        }
        memset(buf, pat, sizeof buf);
        int ret = qcow2_pwrite(img, buf, sizeof buf, off);
        if (ret < 0) {
            fprintf(stderr, "bench_randwrite: write at %llu: %s\n", (unsigned long long)off, err_msg(ret));
            return 1;
        }
    }
    if (script) {
        printf("flush\n");
        return 0;
    }
    int ret = qcow2_flush(img);
    qcow2_close(img);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (ret < 0) {
        fprintf(stderr, "bench_randwrite: flush: %s\n", err_msg(ret));
        return 1;
    }
    printf("%.3f\n", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
