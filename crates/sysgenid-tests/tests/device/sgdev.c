/* Test client for /dev/sysgenid served by sysgenidd through FUSE: the
 * seed's example workflows and probes, written against raw syscalls.
 * Usage: sgdev COMMAND DEVICE [ARG]. Prints one fact per line, flushed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SYSGENID_IOCTL 0x2d
#define SYSGENID_GET_OUTDATED_WATCHERS _IO(SYSGENID_IOCTL, 1)
#define SYSGENID_WAIT_WATCHERS _IO(SYSGENID_IOCTL, 2)
#define SYSGENID_FORCE_GEN_UPDATE _IO(SYSGENID_IOCTL, 3)

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static const char *ename(int e) {
    switch (e) {
    case EINTR: return "EINTR";
    case EAGAIN: return "EAGAIN";
    case EINVAL: return "EINVAL";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ENOTTY: return "ENOTTY";
    case ENOTCONN: return "ENOTCONN";
    case ECONNABORTED: return "ECONNABORTED";
    case ENODEV: return "ENODEV";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    default: return strerror(e);
    }
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int open_dev(const char *path, int flags) {
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0) {
        out("open-error %s", ename(errno));
        exit(2);
    }
    return fd;
}

static void on_signal(int sig) { (void)sig; }

static const char *lat_path;
static volatile unsigned *lat_map;
static volatile double t_force, t_vis;
static volatile int lat_round = -1, lat_stop;

static void *lat_forcer(void *unused) {
    (void)unused;
    int fd = open(lat_path, O_RDWR | O_CLOEXEC);
    for (int r = 0; !lat_stop; r++) {
        while (lat_round != r && !lat_stop) usleep(100);
        if (lat_stop) break;
        usleep(2000);
        unsigned before = *lat_map;
        t_vis = 0;
        t_force = now_us();
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        ioctl(fd, SYSGENID_FORCE_GEN_UPDATE, 0);
        (void)before;
    }
    return NULL;
}

static void *lat_spinner(void *unused) {
    (void)unused;
    unsigned last = *lat_map;
    while (!lat_stop) {
        unsigned v = *lat_map;
        if (v != last) { t_vis = now_us(); last = v; }
    }
    return NULL;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int latency(const char *path, int rounds) {
    lat_path = path;
    int fd = open_dev(path, O_RDWR);
    int ro = open_dev(path, O_RDONLY);
    lat_map = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ro, 0);
    close(ro);
    if (lat_map == MAP_FAILED) { out("mmap-error %s", ename(errno)); return 1; }
    pthread_t f, s;
    pthread_create(&f, NULL, lat_forcer, NULL);
    pthread_create(&s, NULL, lat_spinner, NULL);
    double *wake = calloc(rounds, sizeof(double)), *vis = calloc(rounds, sizeof(double));
    double *gap = calloc(rounds, sizeof(double));
    int stale = 0;
    unsigned gen;
    for (int r = 0; r < rounds; r++) {
        lat_round = r;
        if (read(fd, &gen, 4) != 4) { out("read-error %s", ename(errno)); return 1; }
        double t = now_us();
        if (*lat_map != gen) stale++;
        wake[r] = t - t_force;
        while (t_vis == 0) ;
        vis[r] = t_vis - t_force;
        gap[r] = t - t_vis;
        write(fd, &gen, 4);
    }
    lat_stop = 1;
    pthread_join(f, NULL);
    pthread_join(s, NULL);
    qsort(wake, rounds, sizeof(double), cmp_d);
    qsort(vis, rounds, sizeof(double), cmp_d);
    qsort(gap, rounds, sizeof(double), cmp_d);
    out("latency rounds %d force->read-woken p50 %.0f p99 %.0f force->mapping-visible p50 %.0f p99 %.0f mapping-visible->read-woken p50 %.0f stale-at-wake %d",
        rounds, wake[rounds / 2], wake[rounds * 99 / 100], vis[rounds / 2], vis[rounds * 99 / 100], gap[rounds / 2], stale);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return 64;
    const char *cmd = argv[1], *path = argv[2];
    long arg = argc > 3 ? atol(argv[3]) : 0;
    /* A handler without SA_RESTART, so a signal ends a blocked call. */
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    unsigned gen;

    if (!strcmp(cmd, "watchdog")) { /* Example 1, `arg` rounds. */
        int fd = open_dev(path, O_RDWR);
        out("ready");
        for (long i = 0; i < arg; i++) {
            if (read(fd, &gen, sizeof gen) != 4) { out("read-error %s", ename(errno)); return 1; }
            out("generation %u", gen);
            if (write(fd, &gen, sizeof gen) != 4) { out("write-error %s", ename(errno)); return 1; }
            out("acked %u", gen);
        }
        close(fd);
        return 0;
    }
    if (!strcmp(cmd, "epoll")) { /* Example 2, `arg` events. */
        int fd = open_dev(path, O_RDWR | O_NONBLOCK);
        int ep = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd}, evs[4];
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) { out("epoll_ctl-error %s", ename(errno)); return 1; }
        if (read(fd, &gen, 4) != -1 || errno != EAGAIN) { out("nonblocking-read-not-EAGAIN"); return 1; }
        out("ready");
        for (long seen = 0; seen < arg;) {
            int n = epoll_wait(ep, evs, 4, 10000);
            if (n <= 0) { out("epoll-timeout"); return 1; }
            if (read(fd, &gen, 4) != 4) { out("read-error %s", ename(errno)); return 1; }
            out("generation %u", gen);
            if (write(fd, &gen, 4) != 4) { out("write-error %s", ename(errno)); return 1; }
            seen++;
            /* Acknowledged: no longer readable (the test bumps again only
             * after the line below). */
            if (epoll_wait(ep, evs, 4, 0) != 0) { out("still-readable-after-ack %x", evs[0].events); return 1; }
            out("acked %u", gen);
        }
        out("done");
        return 0;
    }
    if (!strcmp(cmd, "mapped")) { /* Example 3: spin on the mapping. */
        int fd = open_dev(path, O_RDWR);
        volatile unsigned *g = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
        if (g == MAP_FAILED) { out("mmap-error %s", ename(errno)); return 1; }
        unsigned cached = *g;
        out("ready %u", cached);
        double deadline = now_us() + 10e6;
        while (*g == cached)
            if (now_us() > deadline) { out("no-change"); return 1; }
        cached = *g;
        out("changed %u", cached);
        if (read(fd, &gen, 4) != 4 || gen != cached) { out("read-mismatch"); return 1; }
        if (write(fd, &cached, 4) != 4) { out("write-error %s", ename(errno)); return 1; }
        out("acked %u", cached);
        return 0;
    }
    if (!strcmp(cmd, "orchestrator")) { /* Example 4. */
        int fd = open_dev(path, O_RDWR);
        out("ready");
        if (read(fd, &gen, 4) != 4) { out("read-error %s", ename(errno)); return 1; }
        out("generation %u", gen);
        if (write(fd, &gen, 4) != 4) { out("write-error %s", ename(errno)); return 1; }
        double t0 = now_us();
        int rc = ioctl(fd, SYSGENID_WAIT_WATCHERS, arg ? arg : 5000);
        out("wait %s after %.0f ms", rc == 0 ? "ok" : ename(errno), (now_us() - t0) / 1000);
        return 0;
    }
    if (!strcmp(cmd, "read")) { /* One blocking read. */
        int fd = open_dev(path, O_RDONLY);
        out("ready");
        ssize_t n = read(fd, &gen, 4);
        if (n == 4) out("generation %u", gen); else out("read-error %s", ename(errno));
        return 0;
    }
    if (!strcmp(cmd, "wait")) { /* A barrier wait on an up-to-date watcher. */
        int fd = open_dev(path, O_RDWR);
        out("ready");
        double t0 = now_us();
        int rc = ioctl(fd, SYSGENID_WAIT_WATCHERS, arg);
        out("wait %s after %.0f ms", rc == 0 ? "ok" : ename(errno), (now_us() - t0) / 1000);
        return 0;
    }
    if (!strcmp(cmd, "force")) {
        /* Write opens are for privileged callers (a writer could map the
           page writable); everyone else watches through a read-only open. */
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            out("open-rdwr-error %s", ename(errno));
            fd = open_dev(path, O_RDONLY);
        }
        int rc = ioctl(fd, SYSGENID_FORCE_GEN_UPDATE, arg);
        if (rc == 0) out("force ok"); else out("force-error %s", ename(errno));
        /* Reading and watching stay open to all. */
        int fl = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        ssize_t n = read(fd, &gen, 4);
        if (n == 4) out("read %u", gen); else out("read-error %s", ename(errno));
        return 0;
    }
    if (!strcmp(cmd, "probe")) { /* ABI edge cases. */
        int fd = open_dev(path, O_RDWR | O_NONBLOCK);
        char small[3];
        errno = 0; ssize_t n = read(fd, small, 3);
        out("short-read %zd %s", n, ename(errno));
        errno = 0; n = read(fd, &gen, 4);
        out("nonblocking-read %zd %s", n, ename(errno));
        unsigned two[2] = {0, 0};
        errno = 0; n = write(fd, two, 8);
        out("long-write %zd %s", n, ename(errno));
        unsigned wrong = 12345;
        errno = 0; n = write(fd, &wrong, 4);
        out("wrong-ack %zd %s", n, ename(errno));
        errno = 0; int rc = ioctl(fd, _IO(SYSGENID_IOCTL, 9), 0);
        out("unknown-ioctl %d %s", rc, ename(errno));
        rc = ioctl(fd, SYSGENID_GET_OUTDATED_WATCHERS, 0);
        out("outdated %d", rc);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        rc = poll(&p, 1, 0);
        out("poll %d %d", rc, p.revents & POLLIN ? 1 : 0);
        void *w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        out("rw-mmap-on-rdwr %s", w == MAP_FAILED ? ename(errno) : "mapped");
        int ro = open_dev(path, O_RDONLY);
        w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ro, 0);
        out("rw-mmap-on-rdonly %s", w == MAP_FAILED ? ename(errno) : "mapped");
        volatile unsigned *r = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ro, 0);
        out("ro-mmap %s", r == MAP_FAILED ? ename(errno) : "mapped");
        if (r != MAP_FAILED) {
            errno = 0; rc = mprotect((void *)r, 4096, PROT_READ | PROT_WRITE);
            out("mprotect-write %d %s", rc, ename(errno));
        }
        errno = 0; n = write(ro, &gen, 4);
        out("write-on-rdonly %zd %s", n, ename(errno));
        return 0;
    }
    if (!strcmp(cmd, "awslc")) { /* AWS-LC: open, map, close, read forever. */
        int fd = open_dev(path, O_RDONLY);
        volatile unsigned *g = mmap(NULL, 4, PROT_READ, MAP_SHARED, fd, 0);
        if (g == MAP_FAILED) { out("mmap-error %s", ename(errno)); return 1; }
        close(fd);
        out("ready %u", *g);
        /* Read until told to stop by stdin closing (or `arg` seconds). */
        double end = now_us() + (arg ? arg : 30) * 1e6;
        unsigned last = *g;
        while (now_us() < end) {
            unsigned v = *g;
            if (v != last) { out("seen %u", v); last = v; }
            struct pollfd p = {.fd = 0, .events = POLLIN};
            if (poll(&p, 1, 1) > 0) break;
        }
        out("alive %u", *g);
        return 0;
    }
    if (!strcmp(cmd, "bench")) { /* Round trips, in microseconds. */
        int fd = open_dev(path, O_RDWR | O_NONBLOCK);
        int iters = arg ? arg : 2000;
        double t0 = now_us();
        for (int i = 0; i < iters; i++) read(fd, &gen, 4);
        double t_read = (now_us() - t0) / iters;
        /* An outdated watcher: reads return at once, acks are no-ops after the first. */
        t0 = now_us();
        for (int i = 0; i < iters; i++) ioctl(fd, SYSGENID_GET_OUTDATED_WATCHERS, 0);
        double t_ioctl = (now_us() - t0) / iters;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        t0 = now_us();
        for (int i = 0; i < iters; i++) poll(&p, 1, 0);
        double t_poll = (now_us() - t0) / iters;
        int cur = -1;
        {
            int ro = open_dev(path, O_RDONLY);
            volatile unsigned *g = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ro, 0);
            cur = *g;
            munmap((void *)g, 4096);
            close(ro);
        }
        gen = cur;
        t0 = now_us();
        for (int i = 0; i < iters; i++) write(fd, &gen, 4);
        double t_write = (now_us() - t0) / iters;
        t0 = now_us();
        for (int i = 0; i < iters / 10; i++) close(open_dev(path, O_RDWR));
        double t_open = (now_us() - t0) / (iters / 10);
        out("bench read-eagain %.1f ioctl %.1f poll %.1f ack %.1f open-close %.1f", t_read, t_ioctl, t_poll, t_write, t_open);
        return 0;
    }
    if (!strcmp(cmd, "latency")) { /* Bump -> blocked read wake, mapping visibility. */
        return latency(path, arg ? arg : 200);
    }
    out("unknown-command");
    return 64;
}
