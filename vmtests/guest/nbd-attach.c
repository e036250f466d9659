/*
 * nbd-attach: the smallest user-space half of the kernel's NBD client, for the
 * kernel-nbd case of vmtests (busybox has no nbd-client, and Debian's is not static).
 *
 *   nbd-attach HOST PORT EXPORT /dev/nbdN [BLOCKSIZE]
 *       Fixed-newstyle handshake with NBD_OPT_GO (no information requests), then hands the
 *       socket to the kernel and serves as its NBD_DO_IT thread until disconnected.
 *       Without BLOCKSIZE the kernel keeps its default (1 KiB, drivers/block/nbd.c).
 *   nbd-attach -d /dev/nbdN
 *       Disconnect the device (NBD_DISCONNECT, then NBD_CLEAR_SOCK).
 *
 * Protocol: doc/proto.md of the NBD project. Built static by vmtests/run.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/nbd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define NBD_OPT_GO 7
#define NBD_REP_ACK 1
#define NBD_REP_INFO 3
#define NBD_INFO_EXPORT 0
#define NBD_FLAG_FIXED_NEWSTYLE 1
#define NBD_FLAG_NO_ZEROES 2
#define NBD_REP_MAGIC 0x3e889045565a9ULL

static void die(const char *what)
{
    fprintf(stderr, "nbd-attach: %s: %s\n", what, errno ? strerror(errno) : "protocol error");
    exit(1);
}

static void read_all(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r <= 0) {
            if (r == 0)
                errno = 0;
            die("read from server");
        }
        p += r;
        n -= (size_t)r;
    }
}

static void write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t r = write(fd, p, n);
        if (r <= 0)
            die("write to server");
        p += r;
        n -= (size_t)r;
    }
}

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint16_t be16(const unsigned char *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "-d") == 0) {
        int dev = open(argv[2], O_RDWR);
        if (dev < 0)
            die(argv[2]);
        if (ioctl(dev, NBD_DISCONNECT) < 0)
            die("NBD_DISCONNECT");
        /* Like nbd-client -d: shut the sockets down too, so NBD_DO_IT returns even when
         * the server's close does not reach the guest (qemu's guestfwd does not pass
         * it on). */
        if (ioctl(dev, NBD_CLEAR_SOCK) < 0)
            die("NBD_CLEAR_SOCK");
        return 0;
    }
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: nbd-attach HOST PORT EXPORT /dev/nbdN [BLOCKSIZE] | -d /dev/nbdN\n");
        return 2;
    }
    const char *export = argv[3];
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1)
        die("HOST must be an IPv4 address");
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect");
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    unsigned char hello[18];
    read_all(s, hello, sizeof hello);
    if (memcmp(hello, "NBDMAGIC", 8) != 0 || memcmp(hello + 8, "IHAVEOPT", 8) != 0)
        die("not a newstyle NBD server");
    uint16_t sflags = be16(hello + 16);
    if (!(sflags & NBD_FLAG_FIXED_NEWSTYLE))
        die("server is not fixed-newstyle");
    unsigned char cflags[4];
    put32(cflags, NBD_FLAG_FIXED_NEWSTYLE | (sflags & NBD_FLAG_NO_ZEROES));
    write_all(s, cflags, 4);

    size_t nlen = strlen(export);
    size_t olen = 4 + nlen + 2;
    unsigned char *opt = calloc(1, 16 + olen);
    memcpy(opt, "IHAVEOPT", 8);
    put32(opt + 8, NBD_OPT_GO);
    put32(opt + 12, (uint32_t)olen);
    put32(opt + 16, (uint32_t)nlen);
    memcpy(opt + 20, export, nlen); /* then 0 information requests */
    write_all(s, opt, 16 + olen);

    uint64_t size = 0;
    uint16_t tflags = 0;
    int have_export = 0;
    for (;;) {
        unsigned char rep[20];
        read_all(s, rep, sizeof rep);
        if (be64(rep) != NBD_REP_MAGIC || be32(rep + 8) != NBD_OPT_GO)
            die("bad option reply");
        uint32_t type = be32(rep + 12), len = be32(rep + 16);
        if (len > 65536)
            die("option reply too long");
        unsigned char *data = malloc(len + 1);
        read_all(s, data, len);
        if (type & 0x80000000u) {
            data[len] = 0;
            fprintf(stderr, "nbd-attach: server refused export '%s': error 0x%x %s\n", export,
                    type, (char *)data);
            return 1;
        }
        if (type == NBD_REP_INFO && len >= 12 && be16(data) == NBD_INFO_EXPORT) {
            size = be64(data + 2);
            tflags = be16(data + 10);
            have_export = 1;
        }
        free(data);
        if (type == NBD_REP_ACK)
            break;
    }
    if (!have_export)
        die("no NBD_INFO_EXPORT before NBD_REP_ACK");

    int dev = open(argv[4], O_RDWR);
    if (dev < 0)
        die(argv[4]);
    if (argc == 6 && ioctl(dev, NBD_SET_BLKSIZE, (unsigned long)atol(argv[5])) < 0)
        die("NBD_SET_BLKSIZE");
    if (ioctl(dev, NBD_SET_SIZE, (unsigned long)size) < 0)
        die("NBD_SET_SIZE");
    if (ioctl(dev, NBD_SET_FLAGS, (unsigned long)tflags) < 0)
        die("NBD_SET_FLAGS");
    if (ioctl(dev, NBD_SET_TIMEOUT, 60UL) < 0)
        die("NBD_SET_TIMEOUT");
    if (ioctl(dev, NBD_SET_SOCK, (unsigned long)s) < 0)
        die("NBD_SET_SOCK");
    fprintf(stderr, "nbd-attach: %s: export '%s', %llu bytes, transmission flags 0x%x\n",
            argv[4], export, (unsigned long long)size, tflags);
    /* Returns when the device is disconnected. */
    if (ioctl(dev, NBD_DO_IT) < 0 && errno != 0)
        fprintf(stderr, "nbd-attach: NBD_DO_IT ended: %s\n", strerror(errno));
    ioctl(dev, NBD_CLEAR_SOCK);
    return 0;
}
