/* peers_pmdk.c -- the peers workload in PMDK transactions: the table is one pmemobj object of
 * N records of 64 B; each step is one transaction that, for each record, adds its range to
 * the undo log (pmemobj_tx_add_range) and stores the new record, then commits.
 *
 *   peers_pmdk POOL STREAM OUT        (run with PMEM_IS_PMEM_FORCE=1 on tmpfs)
 *
 * POOL must not exist. STREAM: u64 N, u64 STEPS, u64 K, then per step K u64 record indices and
 * K records of 64 B. Prints one JSON line per step; writes the final table to OUT for checking.
 * Built (cc -O2 peers_pmdk.c -lpmemobj -lpmem) and driven by benchmarks/peers.py. */
#define _POSIX_C_SOURCE 200809L
#include <libpmem.h>
#include <libpmemobj.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REC 64

struct root {
    PMEMoid table;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fail(const char *what)
{
    fprintf(stderr, "peers_pmdk: %s: %s\n", what, pmemobj_errormsg());
    exit(1);
}

/* load -- the whole stream file into memory (its first three u64 are the header). */
static uint64_t *load(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f || fseek(f, 0, SEEK_END) || ftell(f) < 24) {
        fprintf(stderr, "peers_pmdk: cannot read %s\n", path);
        exit(1);
    }
    long len = ftell(f);
    uint64_t *buf = malloc(len);
    rewind(f);
    if (!buf || fread(buf, 1, len, f) != (size_t)len) {
        fprintf(stderr, "peers_pmdk: short read of %s\n", path);
        exit(1);
    }
    fclose(f);
    if ((uint64_t)len != 24 + buf[1] * buf[2] * (8 + REC)) {
        fprintf(stderr, "peers_pmdk: %s has %ld bytes, not what its header says\n", path, len);
        exit(1);
    }
    return buf;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: peers_pmdk POOL STREAM OUT\n");
        return 2;
    }
    uint64_t *stream = load(argv[2]);
    uint64_t n = stream[0], steps = stream[1], k = stream[2];

    /* the table, the undo log of the largest step (header and alignment per range), slack */
    size_t poolsize = n * REC + k * 4 * REC + (64 << 20);
    PMEMobjpool *pop = pmemobj_create(argv[1], "hpcckpt_peers", poolsize, 0600);
    if (!pop)
        fail("pmemobj_create");
    struct root *r = pmemobj_direct(pmemobj_root(pop, sizeof(struct root)));
    if (pmemobj_zalloc(pop, &r->table, n * REC, 0))
        fail("pmemobj_zalloc of the table");
    uint8_t *t = pmemobj_direct(r->table);
    for (uint64_t i = 0; i < n; i++)
        memcpy(t + i * REC, &i, sizeof i);   /* key = index, the rest zero */
    pmemobj_persist(pop, t, n * REC);
    int is_pmem = pmem_is_pmem(t, n * REC) ? 1 : 0;

    for (uint64_t s = 0; s < steps; s++) {
        const uint64_t *idx = stream + 3 + s * k * (8 + REC) / 8;
        const uint8_t *rec = (const uint8_t *)(idx + k);
        double t0 = now();
        if (pmemobj_tx_begin(pop, NULL, TX_PARAM_NONE))
            fail("pmemobj_tx_begin");
        for (uint64_t j = 0; j < k; j++) {
            if (pmemobj_tx_add_range(r->table, idx[j] * REC, REC))
                fail("pmemobj_tx_add_range");
            memcpy(t + idx[j] * REC, rec + j * REC, REC);
        }
        double t1 = now();
        pmemobj_tx_commit();
        if (pmemobj_tx_end())
            fail("pmemobj_tx_end");
        double t2 = now();
        printf("{\"step\":%lu,\"t_update\":%.9f,\"t_ckpt\":%.9f,\"bytes\":%lu,\"pmem_is_pmem\":%d}\n",
               (unsigned long)s, t1 - t0, t2 - t1, (unsigned long)(k * REC), is_pmem);
    }

    FILE *out = fopen(argv[3], "wb");
    if (!out || fwrite(t, REC, n, out) != n || fclose(out)) {
        fprintf(stderr, "peers_pmdk: cannot write %s\n", argv[3]);
        return 1;
    }
    pmemobj_close(pop);
    unlink(argv[1]);
    free(stream);
    return 0;
}
