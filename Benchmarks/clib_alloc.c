/* clib_alloc N SIZE: the C client side of scripts/bench row L1 (libdmabufd, linked statically). Times N
 * dmabufd_allocate calls of SIZE bytes from the system heap after ten warm-ups (allocation only, as row
 * L1 times the Swift client's DmaBufConnection.allocate) and prints "median_ns X". The same program as
 * the device test clib.allocation-cost-vs-swift-client builds. */
#define _GNU_SOURCE
#include <dmabufd.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000ll + t.tv_nsec; }
static int cmp(const void *a, const void *b) { long long x = *(const long long *)a, y = *(const long long *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 101;
    unsigned long long size = argc > 2 ? strtoull(argv[2], NULL, 10) : 4096;
    dmabufd_conn *c;
    if (dmabufd_connect(NULL, "bench", &c) < 0) { printf("connect: %s\n", dmabufd_last_message(NULL)); return 1; }
    long long *t = calloc((size_t)n, sizeof *t);
    for (int i = -10; i < n; i++) { /* ten warm-up allocations */
        dmabufd_buffer_info *info;
        long long t0 = now();
        int fd = dmabufd_allocate(c, size, "system", "bench", O_RDWR | O_CLOEXEC, 0, &info);
        long long t1 = now();
        if (fd < 0) { printf("allocate: %s\n", dmabufd_last_message(c)); return 1; }
        if (i >= 0) t[i] = t1 - t0;
        close(fd);
        dmabufd_release(c, info->id);
        dmabufd_free(info);
    }
    qsort(t, (size_t)n, sizeof *t, cmp);
    printf("median_ns %lld\n", t[n / 2]);
    dmabufd_disconnect(c);
    return 0;
}
