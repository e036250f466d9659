/*
 * manifest DIR: one line per entry under DIR (itself included, as "."), for comparing a
 * tree as the kernel reads it from a device against its source on the host:
 *
 *   PATH|MODE(octal, type included)|UID|GID|NLINK|SIZE|RDEV|TARGET|XATTRS|CONTENT
 *
 * NLINK and SIZE are "-" for directories (their size and link count are the filesystem's
 * business), RDEV is major:minor for device nodes, TARGET the symlink's target, XATTRS
 * name=hex pairs sorted by name, CONTENT an FNV-1a 64 hash of a regular file's bytes.
 * Lines come out in walk order: sort them. Built static (cc -static) so the busybox guest
 * can run it; the host runs the same binary on the source tree.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

static size_t root_len;

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void print_xattrs(const char *path) {
    char names[65536];
    ssize_t n = llistxattr(path, names, sizeof names);
    if (n <= 0) {
        putchar('-');
        return;
    }
    char *list[1024];
    int count = 0;
    for (char *p = names; p < names + n && count < 1024; p += strlen(p) + 1)
        list[count++] = p;
    qsort(list, count, sizeof list[0], cmp_str);
    for (int i = 0; i < count; i++) {
        unsigned char value[65536];
        ssize_t len = lgetxattr(path, list[i], value, sizeof value);
        printf("%s%s=", i ? "," : "", list[i]);
        for (ssize_t j = 0; j < len; j++)
            printf("%02x", value[j]);
    }
}

static int visit(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)flag;
    (void)ftw;
    const char *rel = path + root_len;
    if (*rel == '/')
        rel++;
    printf("%s|%o|%u|%u|", *rel ? rel : ".", (unsigned)st->st_mode, (unsigned)st->st_uid,
           (unsigned)st->st_gid);
    if (S_ISDIR(st->st_mode))
        printf("-|-|");
    else
        printf("%lu|%lld|", (unsigned long)st->st_nlink, (long long)st->st_size);
    if (S_ISCHR(st->st_mode) || S_ISBLK(st->st_mode))
        printf("%u:%u|", major(st->st_rdev), minor(st->st_rdev));
    else
        printf("-|");
    if (S_ISLNK(st->st_mode)) {
        char target[4096];
        ssize_t n = readlink(path, target, sizeof target - 1);
        target[n < 0 ? 0 : n] = 0;
        printf("%s|", target);
    } else {
        printf("-|");
    }
    print_xattrs(path);
    if (S_ISREG(st->st_mode)) {
        uint64_t h = 0xcbf29ce484222325ULL;
        int fd = open(path, O_RDONLY);
        if (fd < 0) {
            printf("|unreadable\n");
            return 0;
        }
        static unsigned char buf[1 << 16];
        ssize_t n;
        while ((n = read(fd, buf, sizeof buf)) > 0)
            for (ssize_t i = 0; i < n; i++)
                h = (h ^ buf[i]) * 0x100000001b3ULL;
        close(fd);
        printf("|%s%016llx\n", n < 0 ? "readerror-" : "", (unsigned long long)h);
    } else {
        printf("|-\n");
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: manifest DIR\n");
        return 2;
    }
    root_len = strlen(argv[1]);
    while (root_len > 1 && argv[1][root_len - 1] == '/')
        root_len--;
    return nftw(argv[1], visit, 64, FTW_PHYS) ? 1 : 0;
}
