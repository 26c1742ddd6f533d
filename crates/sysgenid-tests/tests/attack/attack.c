/* Attacks on sysgenidd's privilege model, as real processes speaking the
 * raw wire protocol (docs/protocol.md). Driven by tests/attack_privilege.rs,
 * which compiles this file with gcc and runs each mode as the uid it needs.
 * Every mode prints one result line per outcome on stdout.
 *
 *   race SOCK TRIES          as nobody: Hello+Bump, then unshare(CLONE_NEWUSER)
 *   filecap SOCK BINARY      as nobody: fork; the parent execs BINARY (file
 *                            capabilities), the child bumps
 *   fork-drop SOCK           as root: fork; the child drops to nobody and bumps;
 *                            then the parent bumps
 *   pass-fd SOCK             as root: the connection goes by SCM_RIGHTS to a
 *                            child that dropped to nobody; it bumps, then root
 *   future-claim SOCK CLAIM  as anyone: a watcher whose Hello claims CLAIM;
 *                            prints whether it is outdated, then holds the
 *                            connection until stdin closes
 *   ioctl-force DEV MIN      SYSGENID_FORCE_GEN_UPDATE on the device
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOBODY 65534
#ifndef SWEEP
#define SWEEP 100
#endif
#ifndef STEP
#define STEP 800
#endif
#define SYSGENID_FORCE_GEN_UPDATE _IO(0x2d, 3)

static void die(const char *what) {
	printf("error %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(2);
}

static int connect_to(const char *path) {
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0) die("socket");
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
	return fd;
}

static void put_u32(unsigned char *p, uint32_t v) {
	for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p) {
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void send_hello(int fd, int watcher, int has_acked, uint32_t acked) {
	unsigned char f[9] = {0x01, 1, 0, (unsigned char)watcher, has_acked ? 2 : 0};
	put_u32(f + 5, acked);
	if (send(fd, f, sizeof f, MSG_NOSIGNAL) != sizeof f) die("send hello");
}

static void send_bump(int fd, uint32_t min) {
	unsigned char f[5] = {0x04};
	put_u32(f + 1, min);
	if (send(fd, f, sizeof f, MSG_NOSIGNAL) != sizeof f) die("send bump");
}

/* Reads frames until one of `kind` or an Error; returns the kind seen (0 on
 * hang-up), with the first u32 (or the error code) in *value. */
static int read_reply(int fd, unsigned char kind, uint32_t *value) {
	unsigned char f[2048];
	for (;;) {
		ssize_t n = recv(fd, f, sizeof f, 0);
		if (n <= 0) return 0;
		if (f[0] == kind && n >= 5) {
			*value = get_u32(f + (kind == 0x81 ? 3 : 1));
			return kind;
		}
		if (f[0] == 0xff && n >= 7) {
			*value = (uint32_t)f[1] | (uint32_t)f[2] << 8;
			return 0xff;
		}
	}
}

static void welcome(int fd) {
	uint32_t g;
	if (read_reply(fd, 0x81, &g) != 0x81) die("welcome");
}

/* "granted" for Done, "denied" for Error PermissionDenied, else the code. */
static const char *bump_outcome(int fd) {
	static char other[32];
	uint32_t v = 0;
	int k = read_reply(fd, 0x83, &v);
	if (k == 0x83) return "granted";
	if (k == 0xff && v == 4) return "denied";
	snprintf(other, sizeof other, "other-%d-%u", k, v);
	return other;
}

static unsigned long long cap_eff(pid_t pid) {
	char path[64], line[256];
	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f) return 0;
	unsigned long long caps = 0;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "CapEff: %llx", &caps) == 1) break;
	fclose(f);
	return caps;
}

static void drop_to_nobody(void) {
	if (setgroups(0, NULL) < 0) die("setgroups");
	if (setresgid(NOBODY, NOBODY, NOBODY) < 0) die("setresgid");
	if (setresuid(NOBODY, NOBODY, NOBODY) < 0) die("setresuid");
	if (cap_eff(getpid()) != 0) {
		printf("error capabilities survived the drop\n");
		exit(2);
	}
}

static int race(const char *sock, int tries) {
	int granted = 0, denied = 0, other = 0, unshared = 0;
	for (int i = 0; i < tries; i++) {
		pid_t pid = fork();
		if (pid < 0) die("fork");
		if (pid == 0) {
			int fd = connect_to(sock);
			send_hello(fd, 0, 0, 0);
			welcome(fd);
			send_bump(fd, 0);
			/* Sweep the window: a different short delay each try. */
			for (volatile int spin = 0; spin < (i % SWEEP) * STEP; spin++)
				;
			int ok = unshare(CLONE_NEWUSER) == 0;
			const char *r = bump_outcome(fd);
			_exit((ok ? 0 : 8) | (!strcmp(r, "granted") ? 1 : !strcmp(r, "denied") ? 2 : 3));
		}
		int status;
		if (waitpid(pid, &status, 0) < 0) die("waitpid");
		int code = WIFEXITED(status) ? WEXITSTATUS(status) : 3;
		if (!(code & 8)) unshared++;
		switch (code & 7) {
		case 1: granted++; break;
		case 2: denied++; break;
		default: other++; break;
		}
	}
	printf("tries %d granted %d denied %d other %d unshared %d\n", tries, granted, denied, other,
	       unshared);
	return 0;
}

static int filecap(const char *sock, const char *binary) {
	int fd = connect_to(sock);
	/* The connection must survive the exec, as a real attacker's would. */
	fcntl(fd, F_SETFD, 0);
	send_hello(fd, 0, 0, 0);
	welcome(fd);
	pid_t parent = getpid();
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) die("fork");
	if (pid == 0) {
		const unsigned long long want = 1ULL << 40; /* CAP_CHECKPOINT_RESTORE */
		int i;
		for (i = 0; i < 500 && !(cap_eff(parent) & want); i++) usleep(10000);
		if (!(cap_eff(parent) & want)) {
			printf("parent-never-capable\n");
			fflush(stdout);
			_exit(3);
		}
		printf("parent-capable\n");
		send_bump(fd, 0);
		printf("child-bump %s\n", bump_outcome(fd));
		fflush(stdout);
		_exit(0);
	}
	char *const argv[] = {"sysgenid-capable", "1", NULL};
	execv(binary, argv);
	die("execv");
	return 2;
}

static int fork_drop(const char *sock) {
	int fd = connect_to(sock);
	send_hello(fd, 0, 0, 0);
	welcome(fd);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) die("fork");
	if (pid == 0) {
		drop_to_nobody();
		send_bump(fd, 0);
		printf("dropped-child %s\n", bump_outcome(fd));
		fflush(stdout);
		_exit(0);
	}
	int status;
	waitpid(pid, &status, 0);
	send_bump(fd, 0);
	printf("root %s\n", bump_outcome(fd));
	return 0;
}

static int pass_fd(const char *sock) {
	int fd = connect_to(sock);
	send_hello(fd, 0, 0, 0);
	welcome(fd);
	int pair[2];
	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, pair) < 0) die("socketpair");
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) die("fork");
	if (pid == 0) {
		close(fd);
		close(pair[0]);
		drop_to_nobody();
		char byte;
		union {
			struct cmsghdr h;
			char space[CMSG_SPACE(sizeof(int))];
		} control;
		struct iovec iov = {.iov_base = &byte, .iov_len = 1};
		struct msghdr msg = {.msg_iov = &iov,
				     .msg_iovlen = 1,
				     .msg_control = control.space,
				     .msg_controllen = sizeof control.space};
		if (recvmsg(pair[1], &msg, 0) != 1) die("recvmsg");
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		if (!c || c->cmsg_type != SCM_RIGHTS) die("no descriptor");
		int got;
		memcpy(&got, CMSG_DATA(c), sizeof got);
		send_bump(got, 0);
		printf("receiver %s\n", bump_outcome(got));
		fflush(stdout);
		_exit(0);
	}
	close(pair[1]);
	union {
		struct cmsghdr h;
		char space[CMSG_SPACE(sizeof(int))];
	} control;
	memset(&control, 0, sizeof control);
	char byte = 'x';
	struct iovec iov = {.iov_base = &byte, .iov_len = 1};
	struct msghdr msg = {.msg_iov = &iov,
			     .msg_iovlen = 1,
			     .msg_control = control.space,
			     .msg_controllen = sizeof control.space};
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof fd);
	if (sendmsg(pair[0], &msg, 0) != 1) die("sendmsg");
	int status;
	waitpid(pid, &status, 0);
	send_bump(fd, 0);
	printf("root %s\n", bump_outcome(fd));
	return 0;
}

static int future_claim(const char *sock, uint32_t claim) {
	int fd = connect_to(sock);
	send_hello(fd, 1, 1, claim);
	uint32_t g;
	if (read_reply(fd, 0x81, &g) != 0x81) die("welcome");
	/* An outdated watcher is sent Changed right after Welcome. */
	struct pollfd p = {.fd = fd, .events = POLLIN};
	unsigned char f[16];
	if (poll(&p, 1, 2000) == 1 && recv(fd, f, sizeof f, MSG_PEEK) >= 5 && f[0] == 0x82)
		printf("outdated %u\n", get_u32(f + 1));
	else
		printf("up-to-date %u\n", g);
	fflush(stdout);
	char buf[16];
	while (read(0, buf, sizeof buf) > 0)
		;
	return 0;
}

static int ioctl_force(const char *dev, unsigned long min) {
	int fd = open(dev, O_RDWR | O_CLOEXEC);
	if (fd < 0) die("open");
	if (ioctl(fd, SYSGENID_FORCE_GEN_UPDATE, min) == 0)
		printf("force ok\n");
	else
		printf("force-error %s\n", strerrorname_np(errno));
	return 0;
}

int main(int argc, char **argv) {
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "race")) return race(argv[2], atoi(argv[3]));
	if (argc == 4 && !strcmp(argv[1], "filecap")) return filecap(argv[2], argv[3]);
	if (argc == 3 && !strcmp(argv[1], "fork-drop")) return fork_drop(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "pass-fd")) return pass_fd(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "future-claim"))
		return future_claim(argv[2], (uint32_t)strtoul(argv[3], NULL, 10));
	if (argc == 4 && !strcmp(argv[1], "ioctl-force"))
		return ioctl_force(argv[2], strtoul(argv[3], NULL, 10));
	fprintf(stderr, "usage: see the comment at the top of attack.c\n");
	return 2;
}
