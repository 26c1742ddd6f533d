/*
 * Workflow 1 of the seed: a watchdog thread that blocks on read, rebuilds
 * the application's world, and acknowledges.
 *
 *   watchdog [COUNT [REBUILD_MS]]
 *
 * Handles COUNT generation changes (default: until SIGTERM/SIGINT), taking
 * REBUILD_MS milliseconds to "rebuild" each time (default 0). The main
 * thread waits for a stop request; it then clears `thread_active` and
 * interrupts the watchdog's blocked sysgenid_read with a signal, which
 * returns -EINTR like a blocked read(2) on the seed's device.
 *
 * Output (one line each, flushed): "watchdog: ready", "watchdog: generation
 * G", "watchdog: rebuilt G", "watchdog: acked G", "watchdog: interrupted",
 * "watchdog: done N".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <sysgenid.h>

static atomic_int thread_active = 1;
static long count_limit = -1; /* -1: until stopped */
static long rebuild_ms = 0;

static void reseed_app_env(uint32_t generation)
{
	struct timespec ts = { rebuild_ms / 1000, (rebuild_ms % 1000) * 1000000L };

	/* Regenerate RNG seeds, UUID state, session keys, ... */
	nanosleep(&ts, NULL);
	printf("watchdog: rebuilt %u\n", generation);
}

static void *watchdog_thread_handler(void *arg)
{
	sysgenid_watcher *w = arg;
	long handled = 0;
	uint32_t genid;
	int rc;

	while (atomic_load(&thread_active) && handled != count_limit) {
		/* read new gen ID - blocks until the system generation changes */
		rc = sysgenid_read(w, &genid);
		if (rc == -EINTR) {
			printf("watchdog: interrupted\n");
			continue; /* re-check thread_active */
		}
		if (rc < 0) {
			printf("watchdog: read failed: %s\n", strerror(-rc));
			break;
		}
		printf("watchdog: generation %u\n", genid);

		/* because of the generation change, we need to rebuild world */
		reseed_app_env(genid);

		/* confirm we're done handling the gen ID update */
		rc = sysgenid_ack(w, genid);
		if (rc == -EINVAL) {
			/* a newer change arrived meanwhile: the next read returns it */
			printf("watchdog: %u already superseded\n", genid);
			continue;
		}
		if (rc < 0) {
			printf("watchdog: ack failed: %s\n", strerror(-rc));
			break;
		}
		printf("watchdog: acked %u\n", genid);
		handled++;
	}
	printf("watchdog: done %ld\n", handled);
	/* tell the main thread we are finished (if it is still waiting) */
	kill(getpid(), SIGUSR2);
	return NULL;
}

static void on_sigusr1(int sig)
{
	(void)sig; /* only there to interrupt the blocked read */
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	sysgenid_watcher *w;
	pthread_t thread;
	sigset_t stop;
	int rc, sig;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 1)
		count_limit = strtol(argv[1], NULL, 10);
	if (argc > 2)
		rebuild_ms = strtol(argv[2], NULL, 10);

	/* SIGUSR1 interrupts the watchdog; no SA_RESTART (it does not matter:
	 * sysgenid_read is never restarted). */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigusr1;
	sigaction(SIGUSR1, &sa, NULL);

	/* Stop requests are taken by the main thread only, with sigwait. */
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	sigaddset(&stop, SIGUSR2);
	pthread_sigmask(SIG_BLOCK, &stop, NULL);

	rc = sysgenid_open(&w, 0);
	if (rc < 0) {
		fprintf(stderr, "watchdog: sysgenid_open: %s\n", strerror(-rc));
		return 1;
	}
	printf("watchdog: ready\n");
	pthread_create(&thread, NULL, watchdog_thread_handler, w);

	sigwait(&stop, &sig);
	if (sig != SIGUSR2) {
		atomic_store(&thread_active, 0);
		/* The signal is lost if it lands just before the thread blocks:
		 * repeat until the thread is gone. */
		for (;;) {
			struct timespec deadline;

			pthread_kill(thread, SIGUSR1);
			clock_gettime(CLOCK_REALTIME, &deadline);
			deadline.tv_nsec += 100000000L;
			if (deadline.tv_nsec >= 1000000000L) {
				deadline.tv_sec++;
				deadline.tv_nsec -= 1000000000L;
			}
			if (pthread_timedjoin_np(thread, NULL, &deadline) == 0)
				break;
		}
	} else {
		pthread_join(thread, NULL);
	}
	sysgenid_close(w);
	return 0;
}
