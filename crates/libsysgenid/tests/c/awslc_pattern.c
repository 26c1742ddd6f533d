/*
 * AWS-LC's exact access pattern for AWSLC_SYSGENID_PATH (crypto/rand_extra/
 * snapsafe_detect.c): stat the path, open it O_RDONLY, mmap 4 bytes
 * PROT_READ/MAP_SHARED, close the descriptor, then read the generation as a
 * volatile uint32_t whenever randomness is drawn. Also checks that
 * sysgenid_probe_open's word agrees with it.
 *
 *   awslc_pattern PATH FINAL SECONDS
 *
 * Prints "awslc: generation G probe P" for the first value and each change,
 * and exits 0 once G == FINAL, 1 after SECONDS without reaching it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sysgenid.h>

int main(int argc, char **argv)
{
	const char *path;
	uint32_t final;
	double seconds;
	const volatile uint32_t *probe;
	volatile uint32_t *sgn_addr;
	struct stat buff;
	struct timespec t0, t1, nap = { 0, 1000000L };
	uint32_t last;
	int fd, rc;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 4) {
		fprintf(stderr, "usage: awslc_pattern PATH FINAL SECONDS\n");
		return 2;
	}
	path = argv[1];
	final = (uint32_t)strtoul(argv[2], NULL, 10);
	seconds = strtod(argv[3], NULL);
	if (stat(path, &buff) != 0) {
		perror("awslc: stat");
		return 1;
	}
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		perror("awslc: open");
		return 1;
	}
	sgn_addr = mmap(NULL, sizeof(uint32_t), PROT_READ, MAP_SHARED, fd, 0);
	if (sgn_addr == MAP_FAILED) {
		perror("awslc: mmap");
		return 1;
	}
	close(fd);

	rc = sysgenid_probe_open(&probe);
	if (rc != 0) {
		printf("awslc: probe failed %d\n", rc);
		return 1;
	}

	last = *sgn_addr;
	printf("awslc: generation %u probe %u\n", last, *probe);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		uint32_t now = *sgn_addr;

		if (now != last) {
			last = now;
			printf("awslc: generation %u probe %u\n", now, *probe);
		}
		if (last == final)
			return 0;
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if ((double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9 > seconds) {
			printf("awslc: gave up at %u\n", last);
			return 1;
		}
		nanosleep(&nap, NULL);
	}
}
