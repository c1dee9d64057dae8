/* kiln-probe: small checks of kernel features that Debian has no command for,
 * run inside a container by host-shim/tests/workload.rs. Each subcommand
 * prints one line the test asserts on and exits 0, or says what failed on
 * stderr and exits 1.
 *
 *   kiln-probe mq                 POSIX message queue round trip (mq_open/mq_send/mq_receive)
 *   kiln-probe hugetlb DIR PAGES  map PAGES huge pages from a file in hugetlbfs DIR, write and read them back
 *   kiln-probe eat MIB            allocate and touch MIB MiB (swap under a memory limit), then read it back
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <mqueue.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int fail(const char *what) {
    fprintf(stderr, "kiln-probe: %s: %s\n", what, strerror(errno));
    return 1;
}

static long meminfo(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long v = -1;
    size_t n = strlen(key);
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, n) == 0 && line[n] == ':') {
            v = strtol(line + n + 1, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

static int mq(void) {
    const char *name = "/kiln-probe";
    struct mq_attr attr = {.mq_maxmsg = 4, .mq_msgsize = 64};
    char buf[64] = {0};
    unsigned prio = 0;
    mq_unlink(name);
    mqd_t q = mq_open(name, O_CREAT | O_RDWR, 0600, &attr);
    if (q == (mqd_t)-1)
        return fail("mq_open");
    if (mq_send(q, "hello over mqueue", 17, 7) != 0)
        return fail("mq_send");
    struct mq_attr now;
    if (mq_getattr(q, &now) != 0)
        return fail("mq_getattr");
    ssize_t got = mq_receive(q, buf, sizeof buf, &prio);
    if (got < 0)
        return fail("mq_receive");
    /* The queue is visible in the mqueue filesystem while it exists. */
    struct stat st;
    int visible = stat("/dev/mqueue/kiln-probe", &st) == 0;
    mq_close(q);
    if (mq_unlink(name) != 0)
        return fail("mq_unlink");
    printf("mq: received \"%.*s\" priority %u, %ld queued before, in /dev/mqueue: %s\n", (int)got,
           buf, prio, (long)now.mq_curmsgs, visible ? "yes" : "no");
    return 0;
}

static int hugetlb(const char *dir, long pages) {
    long size_kb = meminfo("Hugepagesize");
    if (size_kb <= 0 || pages <= 0) {
        fprintf(stderr, "kiln-probe: no Hugepagesize in /proc/meminfo, or bad page count\n");
        return 1;
    }
    size_t len = (size_t)pages * (size_t)size_kb * 1024;
    char path[4096];
    snprintf(path, sizeof path, "%s/kiln-probe", dir);
    int fd = open(path, O_CREAT | O_RDWR, 0600);
    if (fd < 0)
        return fail("open in hugetlbfs");
    long free_before = meminfo("HugePages_Free");
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return fail("mmap of the hugetlbfs file");
    for (size_t i = 0; i < len; i += 4096)
        p[i] = (unsigned char)(i / 4096);
    long free_during = meminfo("HugePages_Free");
    for (size_t i = 0; i < len; i += 4096)
        if (p[i] != (unsigned char)(i / 4096)) {
            fprintf(stderr, "kiln-probe: huge page data differs at offset %zu\n", i);
            return 1;
        }
    munmap(p, len);
    close(fd);
    unlink(path);
    printf("hugetlb: %ld pages of %ld kB used (free %ld -> %ld)\n", free_before - free_during,
           size_kb, free_before, free_during);
    return 0;
}

static int eat(long mib) {
    size_t len = (size_t)mib << 20;
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return fail("mmap");
    /* Incompressible-ish content, so zswap-like tricks cannot hide it. */
    for (size_t i = 0; i < len; i += 4096)
        for (size_t j = 0; j < 4096; j += 512)
            p[i + j] = (unsigned char)((i >> 12) * 31 + j);
    for (size_t i = 0; i < len; i += 4096)
        for (size_t j = 0; j < 4096; j += 512)
            if (p[i + j] != (unsigned char)((i >> 12) * 31 + j)) {
                fprintf(stderr, "kiln-probe: data differs at %zu\n", i + j);
                return 1;
            }
    /* While it is all still mapped: how much of the cgroup's memory is in swap. */
    long swapped = -1;
    FILE *f = fopen("/sys/fs/cgroup/memory.swap.current", "r");
    if (f) {
        if (fscanf(f, "%ld", &swapped) != 1)
            swapped = -1;
        fclose(f);
    }
    printf("eat: %ld MiB written and read back, memory.swap.current %ld\n", mib, swapped);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 2 && strcmp(argv[1], "mq") == 0)
        return mq();
    if (argc == 4 && strcmp(argv[1], "hugetlb") == 0)
        return hugetlb(argv[2], atol(argv[3]));
    if (argc == 3 && strcmp(argv[1], "eat") == 0)
        return eat(atol(argv[2]));
    fprintf(stderr, "usage: kiln-probe mq | hugetlb DIR PAGES | eat MIB\n");
    return 2;
}
