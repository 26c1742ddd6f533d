/*
 * The one check of the C tests: CHECK(what, got, want) prints "ok: WHAT"
 * and counts it (atomically: the lifecycle test checks from two threads),
 * or prints "FAIL: WHAT: got X, want Y" and exits 1. Each test prints
 * "NAME: all N checks passed" from `checks` at the end.
 */
#ifndef SYSGENID_TEST_CHECK_H
#define SYSGENID_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

static int checks;

#define CHECK(what, got, want)                                                          \
	do {                                                                            \
		long long g_ = (long long)(got), w_ = (long long)(want);                \
		if (g_ != w_) {                                                         \
			printf("FAIL: %s: got %lld, want %lld\n", what, g_, w_);       \
			exit(1);                                                        \
		}                                                                       \
		__atomic_add_fetch(&checks, 1, __ATOMIC_RELAXED);                       \
		printf("ok: %s\n", what);                                               \
	} while (0)

#endif
