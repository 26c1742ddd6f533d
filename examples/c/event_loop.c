/*
 * Workflow 2 of the seed: an epoll event loop with the watcher's descriptor
 * among the application's other descriptors (here a 100 ms timerfd and
 * standard input).
 *
 *   event_loop [COUNT]
 *
 * Handles COUNT generation changes (default: until stdin closes or says
 * "quit"). The watcher is non-blocking: its descriptor is readable exactly
 * while it is outdated, and stays the same number across daemon restarts,
 * so it is registered once.
 *
 * Output (one line each, flushed): "event_loop: ready", "event_loop:
 * generation G", "event_loop: acked G", "event_loop: stdin LINE",
 * "event_loop: exiting after N ticks, M generations".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <sysgenid.h>

#define MAX_EVENTS 8

static long handled;

static void reseed_app_env(uint32_t generation)
{
	(void)generation; /* regenerate RNG seeds, UUID state, keys, ... */
}

static int handle_io_on_sysgenfd(sysgenid_watcher *w)
{
	uint32_t genid;
	int rc;

	/* read new gen ID - we need it to confirm we've handled update */
	rc = sysgenid_read(w, &genid);
	if (rc == -EAGAIN)
		return 0; /* already handled (e.g. woke for a reconnect) */
	if (rc < 0) {
		printf("event_loop: read failed: %s\n", strerror(-rc));
		return rc;
	}
	printf("event_loop: generation %u\n", genid);

	/* because of the generation change, we need to rebuild world */
	reseed_app_env(genid);

	/* confirm we're done handling the gen ID update */
	rc = sysgenid_ack(w, genid);
	if (rc == -EINVAL)
		return 0; /* superseded: the descriptor stays readable */
	if (rc < 0) {
		printf("event_loop: ack failed: %s\n", strerror(-rc));
		return rc;
	}
	printf("event_loop: acked %u\n", genid);
	handled++;
	return 0;
}

static int add(int epfd, int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

	return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

int main(int argc, char **argv)
{
	struct itimerspec every_100ms = { { 0, 100000000L }, { 0, 100000000L } };
	struct epoll_event events[MAX_EVENTS];
	long count_limit = argc > 1 ? strtol(argv[1], NULL, 10) : -1;
	long ticks = 0;
	int epfd, sysgenfd, tfd, rc, running = 1, stdin_open = 1;
	sysgenid_watcher *w;

	setvbuf(stdout, NULL, _IOLBF, 0);
	epfd = epoll_create1(EPOLL_CLOEXEC);

	rc = sysgenid_open(&w, SYSGENID_NONBLOCK);
	if (rc < 0) {
		fprintf(stderr, "event_loop: sysgenid_open: %s\n", strerror(-rc));
		return 1;
	}
	/* register sysgenid for polling */
	sysgenfd = sysgenid_fd(w);
	add(epfd, sysgenfd);

	/* register other parts of the app for polling */
	tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	timerfd_settime(tfd, 0, &every_100ms, NULL);
	add(epfd, tfd);
	add(epfd, STDIN_FILENO);
	printf("event_loop: ready\n");

	while (running && handled != count_limit) {
		/* wait for something to do... */
		int nfds = epoll_wait(epfd, events, MAX_EVENTS, 1000);

		if (nfds < 0 && errno == EINTR)
			continue;
		if (nfds < 0) {
			perror("event_loop: epoll_wait");
			return 1;
		}
		/* for each ready fd */
		for (int i = 0; i < nfds; i++) {
			int fd = events[i].data.fd;

			if (fd == sysgenfd) {
				if (handle_io_on_sysgenfd(w) < 0)
					running = 0;
			} else if (fd == tfd) {
				uint64_t expirations;

				if (read(tfd, &expirations, sizeof(expirations)) == sizeof(expirations))
					ticks += (long)expirations;
			} else if (fd == STDIN_FILENO && stdin_open) {
				char line[256];
				ssize_t n = read(STDIN_FILENO, line, sizeof(line) - 1);

				if (n <= 0) {
					stdin_open = 0;
					epoll_ctl(epfd, EPOLL_CTL_DEL, STDIN_FILENO, NULL);
					if (count_limit < 0)
						running = 0;
					continue;
				}
				line[n] = '\0';
				line[strcspn(line, "\n")] = '\0';
				if (strcmp(line, "quit") == 0)
					running = 0;
				else
					printf("event_loop: stdin %s\n", line);
			}
		}
	}
	printf("event_loop: exiting after %ld ticks, %ld generations\n", ticks, handled);
	epoll_ctl(epfd, EPOLL_CTL_DEL, sysgenfd, NULL);
	sysgenid_close(w);
	close(tfd);
	close(epfd);
	return 0;
}
