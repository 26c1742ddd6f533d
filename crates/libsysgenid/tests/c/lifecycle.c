/*
 * The snapshot lifecycle through libsysgenid, against a live daemon
 * ($SYSGENID_RUNTIME_DIR) that this process may freeze (root or its uid):
 * SYSGENID_LIFECYCLE participants read freeze / thaw / change events and
 * confirm; sysgenid_freeze waits for the tracked ones, times out and aborts
 * when one does not confirm; plain watchers never see freeze or thaw; the
 * status fields and the size conventions of the appended structs.
 *
 * A thread plays the tracked participant P (blocking reads); the main thread
 * orchestrates and also holds an untracked non-blocking participant U and a
 * plain non-blocking watcher W.
 *
 * Prints "ok: WHAT" per check and "lifecycle: all N checks passed"; on the
 * first failure prints "FAIL: WHAT: got X, want Y" and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
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

/* A non-blocking read of an event that must come: waits (up to 10 s) for
 * the descriptor first, since the daemon may still be fanning it out. */
static int read_expected(sysgenid_watcher *w, sysgenid_event *ev)
{
	struct pollfd p = { .fd = sysgenid_fd(w), .events = POLLIN };

	poll(&p, 1, 10000);
	return sysgenid_read_event(w, ev, sizeof(*ev));
}

static sysgenid_status status(void)
{
	sysgenid_status st;

	CHECK("get_status", sysgenid_get_status(NULL, &st, sizeof(st)), 0);
	return st;
}

/* What the participant thread does with the next freeze. */
enum plan { CONFIRM, IGNORE };

struct participant {
	sysgenid_watcher *w;
	enum plan plan;
	sysgenid_event freeze, thaw;
};

/* P: read a freeze, check the daemon is waiting for it, confirm (or not),
 * then read the thaw that ends it. */
static void *participant_run(void *arg)
{
	struct participant *p = arg;

	CHECK("P: read_event (freeze)", sysgenid_read_event(p->w, &p->freeze, sizeof(p->freeze)), 0);
	CHECK("P: it is a freeze", p->freeze.kind, SYSGENID_EVENT_FREEZE);
	sysgenid_status st = status();
	CHECK("P: state freezing while P has not confirmed", st.state, SYSGENID_STATE_FREEZING);
	CHECK("P: pending == 1 (P only: U is untracked)", st.pending, 1);
	CHECK("P: status freeze number", st.freeze, p->freeze.freeze);
	if (p->plan == CONFIRM)
		CHECK("P: confirm", sysgenid_confirm(p->w, p->freeze.freeze), 0);
	CHECK("P: read_event (thaw)", sysgenid_read_event(p->w, &p->thaw, sizeof(p->thaw)), 0);
	CHECK("P: it is a thaw", p->thaw.kind, SYSGENID_EVENT_THAW);
	CHECK("P: the thaw ends that freeze", p->thaw.freeze, p->freeze.freeze);
	return NULL;
}

int main(void)
{
	sysgenid_watcher *pw, *u, *w;
	struct participant p = { 0 };
	sysgenid_event ev;
	pthread_t t;
	uint32_t gen, gen0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	CHECK("open lifecycle participant P", sysgenid_open(&pw, SYSGENID_LIFECYCLE), 0);
	CHECK("open untracked non-blocking participant U",
	      sysgenid_open(&u, SYSGENID_LIFECYCLE | SYSGENID_UNTRACKED | SYSGENID_NONBLOCK), 0);
	CHECK("open plain non-blocking watcher W", sysgenid_open(&w, SYSGENID_NONBLOCK), 0);
	CHECK("unknown flag still -> -EINVAL", sysgenid_open(&w, 0x80), -EINVAL);
	CHECK("read_event(NULL w) -> -EINVAL", sysgenid_read_event(NULL, &ev, sizeof(ev)), -EINVAL);
	CHECK("read_event(NULL event) -> -EINVAL", sysgenid_read_event(u, NULL, sizeof(ev)), -EINVAL);
	CHECK("confirm(NULL) -> -EINVAL", sysgenid_confirm(NULL, 1), -EINVAL);

	sysgenid_status st = status();
	gen0 = st.generation;
	CHECK("state running", st.state, SYSGENID_STATE_RUNNING);
	CHECK("participants: P and U", st.participants, 2);
	CHECK("watchers: P, U and W", st.watchers, 3);
	CHECK("U: no event -> -EAGAIN", sysgenid_read_event(u, &ev, sizeof(ev)), -EAGAIN);
	CHECK("U: fd not readable", readable(sysgenid_fd(u)), 0);
	CHECK("thaw while running: 0, nothing changes", sysgenid_thaw(), 0);
	CHECK("U: still no event", sysgenid_read_event(u, &ev, sizeof(ev)), -EAGAIN);
	CHECK("confirm on a plain watcher -> -ENOTCONN", sysgenid_confirm(w, 1), -ENOTCONN);

	/* 1. A freeze P confirms. */
	p.w = pw;
	p.plan = CONFIRM;
	CHECK("start P", pthread_create(&t, NULL, participant_run, &p), 0);
	CHECK("freeze", sysgenid_freeze(10000), 0);
	st = status();
	CHECK("state frozen", st.state, SYSGENID_STATE_FROZEN);
	CHECK("pending 0 once frozen", st.pending, 0);
	CHECK("freeze while frozen returns at once", sysgenid_freeze(1), 0);
	{
		struct pollfd pf = { .fd = sysgenid_fd(u), .events = POLLIN };

		CHECK("U: fd readable with a freeze waiting", poll(&pf, 1, 10000), 1);
	}
	memset(&ev, 0xAA, sizeof(ev));
	CHECK("U: read_event", read_expected(u, &ev), 0);
	CHECK("U: freeze", ev.kind, SYSGENID_EVENT_FREEZE);
	CHECK("U: same freeze number as P", ev.freeze, p.freeze.freeze);
	CHECK("U: generation", ev.generation, gen0);
	CHECK("U: confirm (untracked: allowed, not needed)", sysgenid_confirm(u, ev.freeze), 0);
	CHECK("U: confirm twice is harmless", sysgenid_confirm(u, ev.freeze), 0);
	CHECK("U: confirm a freeze never asked -> -EINVAL", sysgenid_confirm(u, ev.freeze + 1000), -EINVAL);
	CHECK("W: plain watcher sees nothing", sysgenid_read(w, &gen), -EAGAIN);
	CHECK("W: not even through read_event", sysgenid_read_event(w, &ev, sizeof(ev)), -EAGAIN);
	CHECK("thaw", sysgenid_thaw(), 0);
	CHECK("P: thread done", pthread_join(t, NULL), 0);
	CHECK("state running after thaw", status().state, SYSGENID_STATE_RUNNING);
	CHECK("U: read_event (thaw)", read_expected(u, &ev), 0);
	CHECK("U: thaw", ev.kind, SYSGENID_EVENT_THAW);
	CHECK("U: nothing more", sysgenid_read_event(u, &ev, sizeof(ev)), -EAGAIN);

	/* 2. A freeze P never confirms: aborted at the timeout, all thawed. */
	p.plan = IGNORE;
	CHECK("start P (not confirming)", pthread_create(&t, NULL, participant_run, &p), 0);
	CHECK("freeze with a participant that does not confirm -> -ETIMEDOUT",
	      sysgenid_freeze(300), -ETIMEDOUT);
	CHECK("P: thread done (it read the abort's thaw)", pthread_join(t, NULL), 0);
	CHECK("state running after the abort", status().state, SYSGENID_STATE_RUNNING);
	CHECK("U: freeze of the aborted freeze", read_expected(u, &ev), 0);
	CHECK("U: kind freeze", ev.kind, SYSGENID_EVENT_FREEZE);
	CHECK("U: then its thaw", read_expected(u, &ev), 0);
	CHECK("U: kind thaw", ev.kind, SYSGENID_EVENT_THAW);
	/* One more freeze and thaw that U leaves unread. */
	p.plan = CONFIRM;
	CHECK("start P", pthread_create(&t, NULL, participant_run, &p), 0);
	CHECK("freeze", sysgenid_freeze(10000), 0);
	CHECK("thaw", sysgenid_thaw(), 0);
	CHECK("P: thread done", pthread_join(t, NULL), 0);

	/* 3. A change: every participant reads it until it acknowledges. */
	CHECK("trigger_update", sysgenid_trigger_update(NULL, 0), 0);
	CHECK("P: read_event (change)", sysgenid_read_event(pw, &ev, sizeof(ev)), 0);
	CHECK("P: change", ev.kind, SYSGENID_EVENT_CHANGE);
	CHECK("P: new generation", ev.generation, gen0 + 1);
	CHECK("P: freeze field 0 for a change", ev.freeze, 0);
	CHECK("P: ack", sysgenid_ack(pw, ev.generation), 0);
	/* sysgenid_read on a participant skips the freeze and thaw queued
	 * before the change (they arrive in order, but maybe not all yet). */
	{
		int rc, tries = 0;

		while ((rc = sysgenid_read(u, &gen)) == -EAGAIN && tries++ < 100) {
			struct pollfd pf = { .fd = sysgenid_fd(u), .events = POLLIN };

			poll(&pf, 1, 100);
		}
		CHECK("U: sysgenid_read skips freeze and thaw, returns the change", rc, 0);
		CHECK("U: that change", gen, gen0 + 1);
	}
	CHECK("U: change", read_expected(u, &ev), 0);
	CHECK("U: kind change", ev.kind, SYSGENID_EVENT_CHANGE);
	CHECK("U: change repeats until acked", sysgenid_read_event(u, &ev, sizeof(ev)), 0);
	CHECK("U: still the change", ev.kind, SYSGENID_EVENT_CHANGE);
	CHECK("U: ack", sysgenid_ack(u, ev.generation), 0);
	CHECK("U: nothing after the ack", sysgenid_read_event(u, &ev, sizeof(ev)), -EAGAIN);
	CHECK("W: plain read sees the change", sysgenid_read(w, &gen), 0);
	CHECK("W: generation", gen, gen0 + 1);
	CHECK("W: ack", sysgenid_ack(w, gen), 0);

	/* 4. The append-only structs: a short size fills only what fits, a long
	 * one zeroes what this library does not know. */
	{
		unsigned char buf[sizeof(sysgenid_event) + 8];

		CHECK("trigger_update", sysgenid_trigger_update(NULL, 0), 0);
		memset(buf, 0xAA, sizeof(buf));
		CHECK("read_event with size 4", sysgenid_read_event(u, (sysgenid_event *)buf, 4), 0);
		CHECK("kind written", ((sysgenid_event *)buf)->kind, SYSGENID_EVENT_CHANGE);
		CHECK("nothing past 4 bytes", buf[4], 0xAA);
		memset(buf, 0xAA, sizeof(buf));
		CHECK("read_event with a larger size",
		      sysgenid_read_event(u, (sysgenid_event *)buf, sizeof(buf)), 0);
		CHECK("generation written", ((sysgenid_event *)buf)->generation, gen0 + 2);
		CHECK("unknown tail zeroed", buf[sizeof(sysgenid_event)] | buf[sizeof(buf) - 1], 0);
		CHECK("U: ack", sysgenid_ack(u, gen0 + 2), 0);
		CHECK("P: change", sysgenid_read_event(pw, &ev, sizeof(ev)), 0);
		CHECK("P: ack", sysgenid_ack(pw, ev.generation), 0);
		CHECK("W: change", sysgenid_read(w, &gen), 0);
		CHECK("W: ack", sysgenid_ack(w, gen), 0);
	}
	{
		/* A caller built against the header before the lifecycle passes
		 * the old sizeof (five uint32_t): nothing past it is written. */
		unsigned char old[5 * sizeof(uint32_t) + 4];

		memset(old, 0xAA, sizeof(old));
		CHECK("get_status with the old size",
		      sysgenid_get_status(NULL, (sysgenid_status *)old, 5 * sizeof(uint32_t)), 0);
		uint32_t old_generation;

		memcpy(&old_generation, old, sizeof(old_generation));
		CHECK("old fields filled", old_generation, gen0 + 2);
		CHECK("nothing past the old struct", old[5 * sizeof(uint32_t)], 0xAA);
	}

	/* 5. Unprivileged: freeze and thaw are refused. */
	if (geteuid() == 0) {
		pid_t pid = fork();

		if (pid == 0) {
			if (setuid(65534) != 0)
				_exit(10);
			if (sysgenid_freeze(1000) != -EACCES)
				_exit(11);
			if (sysgenid_thaw() != -EACCES)
				_exit(12);
			_exit(0);
		}
		int wstatus = 0;

		waitpid(pid, &wstatus, 0);
		CHECK("unprivileged freeze and thaw -> -EACCES (as nobody)", WEXITSTATUS(wstatus), 0);
		CHECK("still running", status().state, SYSGENID_STATE_RUNNING);
	}

	sysgenid_close(pw);
	sysgenid_close(u);
	sysgenid_close(w);
	printf("lifecycle: all %d checks passed\n", checks);
	return 0;
}
