/*
 * blkbench DEV SECONDS: O_DIRECT reads of a block device, for comparing the ways one image
 * reaches a guest (ublk, the kernel's nbd client, loop). Prints one line:
 *
 *   qd1_lat_us=MEAN qd1_p99_us=P99 qd32_iops=N seq_mib_s=N
 *
 * qd1: one thread, random 4 KiB reads, SECONDS long (mean and 99th percentile latency).
 * qd32: 32 threads doing the same, so up to 32 requests in flight (IOPS).
 * seq: one thread reading 1 MiB blocks from the start, wrapping, SECONDS long.
 * A stand-in for fio, whose shared libraries are too heavy for the initramfs. Built static.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static const char *dev;
static double seconds;
static uint64_t size;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

struct job {
    uint64_t seed, ops;
    double *lat;
    size_t nlat, cap;
};

static int open_dev(void) {
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(dev);
        exit(1);
    }
    return fd;
}

static void *random_reads(void *arg) {
    struct job *j = arg;
    int fd = open_dev();
    void *buf;
    if (posix_memalign(&buf, 4096, 4096))
        exit(1);
    double end = now() + seconds;
    for (;;) {
        double t0 = now();
        if (t0 >= end)
            break;
        uint64_t off = (next(&j->seed) % (size / 4096)) * 4096;
        if (pread(fd, buf, 4096, (off_t)off) != 4096) {
            perror("pread");
            exit(1);
        }
        j->ops++;
        if (j->lat && j->nlat < j->cap)
            j->lat[j->nlat++] = now() - t0;
    }
    close(fd);
    free(buf);
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: blkbench DEV SECONDS\n");
        return 2;
    }
    dev = argv[1];
    seconds = atof(argv[2]);
    int fd = open_dev();
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
        perror("BLKGETSIZE64");
        return 1;
    }

    struct job one = {.seed = 88172645463325252ULL, .cap = 1 << 22};
    one.lat = malloc(one.cap * sizeof(double));
    random_reads(&one);
    double sum = 0;
    for (size_t i = 0; i < one.nlat; i++)
        sum += one.lat[i];
    qsort(one.lat, one.nlat, sizeof(double), cmp_double);
    double mean = one.nlat ? sum / one.nlat : 0, p99 = one.nlat ? one.lat[one.nlat * 99 / 100] : 0;

    enum { QD = 32 };
    pthread_t th[QD];
    struct job jobs[QD] = {0};
    double t0 = now();
    for (int i = 0; i < QD; i++) {
        jobs[i].seed = 0x9E3779B97F4A7C15ULL * (i + 1);
        pthread_create(&th[i], NULL, random_reads, &jobs[i]);
    }
    uint64_t ops = 0;
    for (int i = 0; i < QD; i++) {
        pthread_join(th[i], NULL);
        ops += jobs[i].ops;
    }
    double qd32 = ops / (now() - t0);

    void *buf;
    if (posix_memalign(&buf, 4096, 1 << 20))
        return 1;
    uint64_t off = 0, bytes = 0;
    double start = now(), end = start + seconds;
    while (now() < end) {
        if (off + (1 << 20) > size)
            off = 0;
        if (pread(fd, buf, 1 << 20, (off_t)off) != 1 << 20) {
            perror("pread 1 MiB");
            return 1;
        }
        off += 1 << 20;
        bytes += 1 << 20;
    }
    double seq = bytes / 1048576.0 / (now() - start);
    printf("qd1_lat_us=%.0f qd1_p99_us=%.0f qd32_iops=%.0f seq_mib_s=%.1f\n", mean * 1e6,
           p99 * 1e6, qd32, seq);
    return 0;
}
