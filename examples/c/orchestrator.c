/*
 * Workflow 4 of the seed: the orchestrator. On each generation change it
 * pauses the service, confirms its own watcher, waits (at most 5 s) until
 * every other tracked watcher on the system has acknowledged, and resumes.
 *
 *   orchestrator [COUNT [TIMEOUT_MS]]
 *
 * Handles COUNT changes (default: until killed) with a barrier timeout of
 * TIMEOUT_MS (default 5000). Exit status: 0, or 3 if the last barrier timed
 * out.
 *
 * Output (one line each, flushed):
 *   "orchestrator: ready"
 *   "orchestrator: generation G: pausing service"
 *   "orchestrator: acked G, waiting up to MS ms for the others"
 *   "orchestrator: all watchers caught up with G after MS ms; resuming service"
 *   "orchestrator: timed out (-ETIMEDOUT) after MS ms: N tracked watchers still outdated; resuming service anyway"
 *   "orchestrator: interrupted (-EINTR): a newer generation arrived during the wait"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sysgenid.h>

static int paused;

static void pause_service(void)
{
	paused = 1; /* stop taking requests, drain, hold leases ... */
}

static void resume_service(void)
{
	paused = 0;
}

static long ms_since(const struct timespec *t0)
{
	struct timespec t1;

	clock_gettime(CLOCK_MONOTONIC, &t1);
	return (t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000;
}

/* Called on detection of a generation change. Returns 0 when every
 * component caught up, -ETIMEDOUT, -EINTR (a newer change: handle it), or
 * another -errno. */
static int handle_sysgen_update(sysgenid_watcher *w, uint32_t new_gen_id, uint32_t timeout_ms)
{
	struct timespec t0;
	int rc;

	/* pause until all components have handled event */
	if (!paused)
		printf("orchestrator: generation %u: pausing service\n", new_gen_id);
	else
		printf("orchestrator: generation %u: service still paused\n", new_gen_id);
	pause_service();

	/* confirm *this* watcher as up-to-date */
	rc = sysgenid_ack(w, new_gen_id);
	if (rc < 0)
		return rc; /* -EINVAL: superseded already, read again */
	printf("orchestrator: acked %u, waiting up to %u ms for the others\n", new_gen_id,
	       timeout_ms);

	/* wait for all *others* for at most 5 seconds */
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = sysgenid_wait_watchers(w, timeout_ms);
	if (rc == 0) {
		printf("orchestrator: all watchers caught up with %u after %ld ms; resuming service\n",
		       new_gen_id, ms_since(&t0));
	} else if (rc == -ETIMEDOUT) {
		sysgenid_status st;
		long waited = ms_since(&t0);

		if (sysgenid_get_status(w, &st, sizeof(st)) == 0)
			printf("orchestrator: timed out (-ETIMEDOUT) after %ld ms: %u tracked watchers still outdated; resuming service anyway\n",
			       waited, st.outdated);
		else
			printf("orchestrator: timed out (-ETIMEDOUT) after %ld ms; resuming service anyway\n",
			       waited);
	} else if (rc == -EINTR) {
		/* We became outdated during the wait: stay paused, handle it. */
		printf("orchestrator: interrupted (-EINTR): a newer generation arrived during the wait\n");
		return rc;
	} else {
		return rc;
	}

	/* all applications on the system have rebuilt worlds (or we gave up) */
	resume_service();
	return rc;
}

int main(int argc, char **argv)
{
	long count_limit = argc > 1 ? strtol(argv[1], NULL, 10) : -1;
	uint32_t timeout_ms = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 5000;
	sysgenid_watcher *w;
	long handled = 0;
	int rc, last = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	rc = sysgenid_open(&w, 0);
	if (rc < 0) {
		fprintf(stderr, "orchestrator: sysgenid_open: %s\n", strerror(-rc));
		return 1;
	}
	printf("orchestrator: ready\n");

	while (handled != count_limit) {
		uint32_t generation;

		rc = sysgenid_read(w, &generation); /* blocks until a change */
		if (rc == -EINTR)
			continue;
		if (rc < 0) {
			fprintf(stderr, "orchestrator: read: %s\n", strerror(-rc));
			return 1;
		}
		last = handle_sysgen_update(w, generation, timeout_ms);
		if (last == -EINTR || last == -EINVAL)
			continue; /* a newer generation: read it and start over */
		if (last < 0 && last != -ETIMEDOUT) {
			fprintf(stderr, "orchestrator: %s\n", strerror(-last));
			return 1;
		}
		handled++;
	}
	sysgenid_close(w);
	return last == -ETIMEDOUT ? 3 : 0;
}
