/*
 * Exercises every function of libsysgenid and each errno the header
 * promises, against a live daemon ($SYSGENID_RUNTIME_DIR).
 *
 *   api up     the daemon runs; we may force updates (root or its uid)
 *   api down   no daemon on the runtime directory
 *
 * Prints "ok: WHAT" per check and "api: all N checks passed"; on the first
 * failure prints "FAIL: WHAT: got X, want Y" and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sysgenid.h>

#include "check.h"

static int readable(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static int down(void)
{
	sysgenid_watcher *w = NULL;
	const volatile uint32_t *g = NULL;

	CHECK("open without daemon -> -ENOENT", sysgenid_open(&w, 0), -ENOENT);
	CHECK("out untouched on failure", w == NULL, 1);
	CHECK("probe without page -> -ENOENT", sysgenid_probe_open(&g), -ENOENT);
	CHECK("trigger_update(NULL) without daemon -> -ENOENT", sysgenid_trigger_update(NULL, 0), -ENOENT);
	printf("api: all %d checks passed\n", checks);
	return 0;
}

/* Against a daemon run by another uid: everything is refused with -EPERM. */
static int untrusted(void)
{
	sysgenid_watcher *w = NULL;
	const volatile uint32_t *g = NULL;

	CHECK("open untrusted daemon -> -EPERM", sysgenid_open(&w, 0), -EPERM);
	CHECK("out untouched on refusal", w == NULL, 1);
	CHECK("probe untrusted page -> -EPERM", sysgenid_probe_open(&g), -EPERM);
	CHECK("trigger_update(NULL) untrusted -> -EPERM", sysgenid_trigger_update(NULL, 0), -EPERM);
	printf("api: all %d checks passed\n", checks);
	return 0;
}

int main(int argc, char **argv)
{
	sysgenid_watcher *w, *nb, *untracked;
	const volatile uint32_t *g1, *g2;
	sysgenid_status st;
	uint32_t gen, start;
	int fd;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 1 && strcmp(argv[1], "down") == 0)
		return down();
	if (argc > 1 && strcmp(argv[1], "untrusted") == 0)
		return untrusted();

	CHECK("open(NULL) -> -EINVAL", sysgenid_open(NULL, 0), -EINVAL);
	CHECK("unknown flag -> -EINVAL", sysgenid_open(&w, 0x80), -EINVAL);
	CHECK("open", sysgenid_open(&w, 0), 0);
	CHECK("open nonblocking", sysgenid_open(&nb, SYSGENID_NONBLOCK), 0);
	CHECK("open untracked", sysgenid_open(&untracked, SYSGENID_NONBLOCK | SYSGENID_UNTRACKED), 0);
	CHECK("fd(NULL) -> -EINVAL", sysgenid_fd(NULL), -EINVAL);
	fd = sysgenid_fd(nb);
	CHECK("fd >= 0", fd >= 0, 1);
	CHECK("fd stable", sysgenid_fd(nb), fd);
	CHECK("read(NULL out) -> -EINVAL", sysgenid_read(nb, NULL), -EINVAL);

	CHECK("probe_open(NULL) -> -EINVAL", sysgenid_probe_open(NULL), -EINVAL);
	CHECK("probe_open", sysgenid_probe_open(&g1), 0);
	CHECK("probe_open again", sysgenid_probe_open(&g2), 0);
	CHECK("probe pointer stable", g1 == g2, 1);
	start = *g1;

	CHECK("status(NULL out) -> -EINVAL", sysgenid_get_status(w, NULL, sizeof(st)), -EINVAL);
	CHECK("status", sysgenid_get_status(w, &st, sizeof(st)), 0);
	CHECK("status generation == probe", st.generation, start);
	CHECK("status watchers", st.watchers, 3);
	CHECK("status tracked", st.tracked, 2);
	CHECK("status outdated", st.outdated, 0);

	CHECK("up to date: read -> -EAGAIN", sysgenid_read(nb, &gen), -EAGAIN);
	CHECK("up to date: fd not readable", readable(fd), 0);
	CHECK("wait_watchers with all acked", sysgenid_wait_watchers(w, 1000), 0);

	CHECK("trigger_update(NULL)", sysgenid_trigger_update(NULL, 0), 0);
	CHECK("probe moved", *g1, start + 1);
	CHECK("outdated: fd readable", readable(fd), 1);
	CHECK("read", sysgenid_read(nb, &gen), 0);
	CHECK("read returns new generation", gen, start + 1);
	CHECK("read repeats until acked", sysgenid_read(nb, &gen), 0);
	CHECK("same generation", gen, start + 1);
	CHECK("status outdated == 2 tracked", sysgenid_get_status(NULL, &st, sizeof(st)), 0);
	CHECK("outdated count", st.outdated, 2);
	CHECK("outdated_untracked count", st.outdated_untracked, 1);
	CHECK("wait_watchers while outdated -> -EINTR", sysgenid_wait_watchers(w, 1000), -EINTR);
	CHECK("ack wrong generation -> -EINVAL", sysgenid_ack(nb, gen + 5), -EINVAL);
	CHECK("still readable after wrong ack", readable(fd), 1);
	CHECK("ack", sysgenid_ack(nb, gen), 0);
	CHECK("acked: fd not readable", readable(fd), 0);
	CHECK("acked: read -> -EAGAIN", sysgenid_read(nb, &gen), -EAGAIN);
	CHECK("blocking read returns", sysgenid_read(w, &gen), 0);
	CHECK("ack blocking watcher", sysgenid_ack(w, gen), 0);
	CHECK("wait_watchers(NULL) ignores untracked", sysgenid_wait_watchers(NULL, 2000), 0);
	CHECK("wait_watchers(w) ignores untracked", sysgenid_wait_watchers(w, 2000), 0);

	{
		/* What the change is, host entropy and a hostname. */
		static unsigned char ent[600];
		uint32_t before = *g1;
		int root = geteuid() == 0;

		memset(ent, 0x5a, sizeof(ent));
		CHECK("details: unknown kind -> -EINVAL",
		      sysgenid_trigger_update_details(w, 0, 0, 3, NULL, 0, NULL), -EINVAL);
		CHECK("details: unknown flag -> -EINVAL",
		      sysgenid_trigger_update_details(w, 0, 2, 0, NULL, 0, NULL), -EINVAL);
		CHECK("details: 31 bytes of entropy -> -EINVAL",
		      sysgenid_trigger_update_details(w, 0, 0, SYSGENID_KIND_CLONE, ent, 31, NULL), -EINVAL);
		CHECK("details: 513 bytes of entropy -> -EINVAL",
		      sysgenid_trigger_update_details(w, 0, 0, SYSGENID_KIND_CLONE, ent, 513, NULL), -EINVAL);
		CHECK("details: NULL entropy with a length -> -EINVAL",
		      sysgenid_trigger_update_details(w, 0, 0, SYSGENID_KIND_CLONE, NULL, 32, NULL), -EINVAL);
		CHECK("details: invalid hostname -> -EINVAL",
		      sysgenid_trigger_update_details(w, 0, 0, SYSGENID_KIND_CLONE, NULL, 0, "a_b"), -EINVAL);
		CHECK("details: refusals changed nothing", *g1, before);
		CHECK("details: clone, 64 bytes, hostname",
		      sysgenid_trigger_update_details(w, 0, 0, SYSGENID_KIND_CLONE, ent, 64, "web-3"), 0);
		CHECK("details: moved", *g1, before + 1);
		CHECK("details: status", sysgenid_get_status(NULL, &st, sizeof(st)), 0);
		CHECK("details: status kind clone", st.last_change_kind, SYSGENID_KIND_CLONE);
		CHECK("details: status entropy mixed (root daemon)", st.entropy_mixed, root ? 64 : 0);
		CHECK("details: status kernel reseeded (root daemon)", st.kernel_reseeded, root);
		CHECK("details(NULL): restore, 512 bytes",
		      sysgenid_trigger_update_details(NULL, 0, 0, SYSGENID_KIND_RESTORE, ent, 512, NULL), 0);
		CHECK("details: status", sysgenid_get_status(NULL, &st, sizeof(st)), 0);
		CHECK("details: status kind restore", st.last_change_kind, SYSGENID_KIND_RESTORE);
		CHECK("details: read", sysgenid_read(w, &gen), 0);
		CHECK("details: ack", sysgenid_ack(w, gen), 0);
		CHECK("details: ack nb", sysgenid_ack(nb, gen), 0);
	}

	CHECK("trigger_update(w, min)", sysgenid_trigger_update(w, 1000), 0);
	CHECK("min honoured", *g1, 1000);
	CHECK("exhausting minimum -> -EOVERFLOW", sysgenid_trigger_update(w, UINT32_MAX), -EOVERFLOW);
	CHECK("refusal changed nothing", *g1, 1000);
	CHECK("unknown flag -> -EINVAL", sysgenid_trigger_update_flags(w, UINT32_MAX, 2), -EINVAL);
	CHECK("trigger_update_flags(UINT32_MAX, ALLOW_EXHAUSTION)",
	      sysgenid_trigger_update_flags(w, UINT32_MAX, SYSGENID_UPDATE_ALLOW_EXHAUSTION), 0);
	CHECK("at UINT32_MAX", *g1, UINT32_MAX);
	CHECK("overflow -> -EOVERFLOW", sysgenid_trigger_update(w, 0), -EOVERFLOW);
	CHECK("generation stays", *g1, UINT32_MAX);
	CHECK("read", sysgenid_read(w, &gen), 0);
	CHECK("read UINT32_MAX", gen, UINT32_MAX);
	CHECK("ack", sysgenid_ack(w, gen), 0);
	CHECK("ack nb", sysgenid_ack(nb, gen), 0);
	CHECK("wait_watchers 0 ms (forever) returns at once", sysgenid_wait_watchers(w, 0), 0);

	if (geteuid() == 0) {
		pid_t pid = fork();

		if (pid == 0) {
			sysgenid_watcher *mine;
			int rc;

			if (setuid(65534) != 0)
				_exit(10);
			rc = sysgenid_open(&mine, 0);
			if (rc != 0)
				_exit(11);
			rc = sysgenid_trigger_update(mine, 0);
			_exit(rc == -EACCES ? 0 : 12);
		}
		int status = 0;

		waitpid(pid, &status, 0);
		CHECK("unprivileged trigger_update -> -EACCES (as nobody)", WEXITSTATUS(status), 0);
	}

	sysgenid_close(untracked);
	sysgenid_close(nb);
	sysgenid_close(w);
	sysgenid_close(NULL);
	/* the daemon notices the hang-ups asynchronously */
	for (int i = 0; i < 200; i++) {
		CHECK("status after close", sysgenid_get_status(NULL, &st, sizeof(st)), 0);
		if (st.watchers == 0)
			break;
		usleep(10000);
	}
	CHECK("closed watchers unregistered", st.watchers, 0);
	printf("api: all %d checks passed\n", checks);
	return 0;
}
