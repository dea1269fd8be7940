/* peers_core.c -- the peers workload over the hpcckpt C core, used as a C program would use it:
 * a pool of N records of 64 B, each step's records stored straight through heap_addr (the
 * tracker sees the writes), then ckpt_prepare + ckpt_commit.
 *
 *   peers_core DIR TRACKER STREAM OUT
 *
 * STREAM: u64 N, u64 STEPS, u64 K, then per step K u64 record indices and K records of 64 B.
 * Prints one JSON line per step; writes the final table (N x 64 B) to OUT for checking.
 * Built and driven by benchmarks/peers.py. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "hpcckpt.h"

#define REC 64

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void check(int rc, const char *what)
{
    if (rc < 0) {
        fprintf(stderr, "peers_core: %s: %s\n", what, hk_errmsg());
        exit(1);
    }
}

/* load -- the whole stream file into memory (its first three u64 are the header). */
static uint64_t *load(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f || fseek(f, 0, SEEK_END) || ftell(f) < 24) {
        fprintf(stderr, "peers_core: cannot read %s\n", path);
        exit(1);
    }
    long len = ftell(f);
    uint64_t *buf = malloc(len);
    rewind(f);
    if (!buf || fread(buf, 1, len, f) != (size_t)len) {
        fprintf(stderr, "peers_core: short read of %s\n", path);
        exit(1);
    }
    fclose(f);
    if ((uint64_t)len != 24 + buf[1] * buf[2] * (8 + REC)) {
        fprintf(stderr, "peers_core: %s has %ld bytes, not what its header says\n", path, len);
        exit(1);
    }
    return buf;
}

static void checkpoint(hk_heap *h, struct hk_stats *s)
{
    uint64_t e;
    check(ckpt_prepare(h, "{}", 2, &e), "prepare");
    check(ckpt_commit(h), "commit");
    if (s)
        ckpt_stats(h, s);
}

int main(int argc, char **argv)
{
    static const char *trackers[] = {"uffd", "mprotect"};
    if (argc != 5 || (strcmp(argv[2], trackers[0]) && strcmp(argv[2], trackers[1]))) {
        fprintf(stderr, "usage: peers_core DIR uffd|mprotect STREAM OUT\n");
        return 2;
    }
    int tracker = strcmp(argv[2], "uffd") ? HK_TRACK_MPROTECT : HK_TRACK_UFFD;
    uint64_t *stream = load(argv[3]);
    uint64_t n = stream[0], steps = stream[1], k = stream[2];

    char path[4096];
    snprintf(path, sizeof path, "%s/peers-core.heap", argv[1]);
    struct hk_create_opts o = {.capacity = n * REC + (64 << 20), .max_entries = 1024, .job = "peers",
                               .world_size = 1};
    check(heap_create(path, &o), "create");
    hk_heap *h;
    check(heap_open(path, tracker, NULL, -1, -1, &h), "open");
    struct hk_desc d = {.name = "t", .dtype = "'|V64'", .dtype_len = 6, .obj_size = REC, .count = n, .kind = 2};
    uint64_t pool;
    check(heap_alloc(h, &d, &pool), "pool");

    /* the initial table (key = index, the rest zero), written twice so that both checkpoint
     * copies of every record exist: the steps below run in the steady state */
    for (int round = 0; round < 2; round++) {
        for (uint64_t i = 0; i < n; i++) {
            uint8_t *p = heap_addr(h, pool, i);
            memset(p, 0, REC);
            memcpy(p, &i, sizeof i);
        }
        checkpoint(h, NULL);
    }

    for (uint64_t s = 0; s < steps; s++) {
        const uint64_t *idx = stream + 3 + s * k * (8 + REC) / 8;
        const uint8_t *rec = (const uint8_t *)(idx + k);
        double t0 = now();
        for (uint64_t j = 0; j < k; j++)
            memcpy(heap_addr(h, pool, idx[j]), rec + j * REC, REC);
        double t1 = now();
        struct hk_stats st;
        checkpoint(h, &st);
        double t2 = now();
        printf("{\"step\":%lu,\"t_update\":%.9f,\"t_ckpt\":%.9f,\"bytes\":%lu,\"bytes_meta\":%lu,"
               "\"objects_dirty\":%lu,\"views_degraded\":%lu}\n", (unsigned long)s, t1 - t0, t2 - t1,
               (unsigned long)st.bytes_copied, (unsigned long)st.bytes_meta, (unsigned long)st.objects_dirty,
               (unsigned long)st.views_degraded);
    }

    FILE *out = fopen(argv[4], "wb");
    int ok = out != NULL;
    for (uint64_t i = 0; ok && i < n; i++)
        ok = fwrite(heap_addr(h, pool, i), REC, 1, out) == 1;
    if (!ok || fclose(out)) {
        fprintf(stderr, "peers_core: cannot write %s\n", argv[4]);
        return 1;
    }
    check(heap_close(h), "close");
    heap_release(h);
    unlink(path);
    free(stream);
    return 0;
}
