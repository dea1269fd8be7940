/*
 * Baseline harness: time `count` calls of PMDK's pmemobj_alloc().
 *
 * usage: pmemobj_alloc POOL_PATH COUNT SIZE
 *
 * Creates a fresh pmemobj pool at POOL_PATH (the file must not exist),
 * allocates COUNT objects of SIZE bytes, keeping every PMEMoid in a malloc'd
 * array, and prints one JSON line on stdout:
 *
 *   {"allocator":"pmemobj_alloc","count":N,"size":S,"ns_per_alloc":X,
 *    "pmem_is_pmem":0|1}
 *
 * pmem_is_pmem tells whether libpmem treats the pool as real persistent
 * memory (cache-flush persistence) or falls back to msync(); set
 * PMEM_IS_PMEM_FORCE=1 in the environment to force the former on tmpfs.
 * The pool is closed and the file unlinked before exit. Any failure prints
 * a message on stderr and exits 1.
 *
 * build: cc -O2 -o pmemobj_alloc pmemobj_alloc.c -lpmemobj -lpmem
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <libpmem.h>
#include <libpmemobj.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LAYOUT "hpcckpt_alloc_bench"

static int parse_u64(const char *s, unsigned long long *out)
{
	char *end = NULL;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || s[0] == '-')
		return -1;
	*out = v;
	return 0;
}

static double now_ns(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
		perror("pmemobj_alloc: clock_gettime");
		exit(1);
	}
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s POOL_PATH COUNT SIZE\n", argv[0]);
		return 1;
	}
	const char *path = argv[1];
	unsigned long long count, size;
	if (parse_u64(argv[2], &count) != 0 || count == 0) {
		fprintf(stderr, "pmemobj_alloc: bad COUNT '%s'\n", argv[2]);
		return 1;
	}
	if (parse_u64(argv[3], &size) != 0 || size == 0) {
		fprintf(stderr, "pmemobj_alloc: bad SIZE '%s'\n", argv[3]);
		return 1;
	}

	/* count objects + per-object header/rounding, 1.5x slack, + 64 MiB */
	double want = (double)count * (double)(size + 64) * 1.5 + 64.0 * 1024 * 1024;
	size_t poolsize = (size_t)want;
	if (poolsize < PMEMOBJ_MIN_POOL)
		poolsize = PMEMOBJ_MIN_POOL;

	PMEMoid *oids = malloc((size_t)count * sizeof(*oids));
	if (oids == NULL) {
		fprintf(stderr, "pmemobj_alloc: malloc of %llu oids failed\n", count);
		return 1;
	}

	PMEMobjpool *pop = pmemobj_create(path, LAYOUT, poolsize, 0600);
	if (pop == NULL) {
		fprintf(stderr, "pmemobj_alloc: pmemobj_create(%s, %zu) failed: %s\n",
			path, poolsize, pmemobj_errormsg());
		free(oids);
		return 1;
	}

	/* is the pool mapped as pmem? ask libpmem about a probe object */
	int is_pmem = 0;
	{
		PMEMoid probe;
		if (pmemobj_alloc(pop, &probe, 64, 0, NULL, NULL) != 0) {
			fprintf(stderr, "pmemobj_alloc: probe alloc failed: %s\n",
				pmemobj_errormsg());
			pmemobj_close(pop);
			unlink(path);
			free(oids);
			return 1;
		}
		is_pmem = pmem_is_pmem(pmemobj_direct(probe), 64) ? 1 : 0;
		pmemobj_free(&probe);
	}

	int rc = 0;
	unsigned long long done = 0;
	double t0 = now_ns();
	for (; done < count; done++) {
		if (pmemobj_alloc(pop, &oids[done], (size_t)size, 0, NULL, NULL) != 0) {
			rc = 1;
			break;
		}
	}
	double t1 = now_ns();

	if (rc != 0) {
		fprintf(stderr,
			"pmemobj_alloc: allocation %llu of %llu (size %llu) failed: %s\n",
			done + 1, count, size, pmemobj_errormsg());
	} else {
		printf("{\"allocator\":\"pmemobj_alloc\",\"count\":%llu,\"size\":%llu,"
		       "\"ns_per_alloc\":%.2f,\"pmem_is_pmem\":%d}\n",
		       count, size, (t1 - t0) / (double)count, is_pmem);
		if (fflush(stdout) != 0) {
			perror("pmemobj_alloc: stdout");
			rc = 1;
		}
	}

	pmemobj_close(pop);
	if (unlink(path) != 0) {
		fprintf(stderr, "pmemobj_alloc: unlink(%s): %s\n", path, strerror(errno));
		rc = 1;
	}
	free(oids);
	return rc;
}
