/* core_bench.c -- measurements of the C core used from C, printed as JSON lines.
 *
 *   core_bench alloc      DIR COUNT SIZE PREALLOC    single named objects, ns per heap_alloc
 *   core_bench firstwrite DIR COUNT TRACKER          ns per first write to a tracked object
 *   core_bench paper      DIR COUNT SIZE FRAC TRACKER NVM_GBPS REPEATS
 *   core_bench large      DIR MBYTES TRACKER         checkpoint of MBYTES dirty vs memcpy
 *
 * Built and driven by benchmarks/run_core.py. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "hpcckpt.h"

static const char *tracker_names[] = {"uffd", "mprotect", "page", "hash", "full"};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void check(int rc, const char *what)
{
    if (rc < 0) {
        fprintf(stderr, "core_bench: %s: %s\n", what, hk_errmsg());
        exit(1);
    }
}

static int tracker_of(const char *name)
{
    for (int i = 0; i < 5; i++)
        if (!strcmp(name, tracker_names[i]))
            return i;
    fprintf(stderr, "core_bench: unknown tracker %s\n", name);
    exit(2);
}

/* make_heap -- a fresh heap file in dir, opened with tracker. */
static hk_heap *make_heap(const char *dir, uint64_t capacity, uint64_t entries, int tracker, int prealloc)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/bench-%d.heap", dir, (int)getpid());
    unlink(path);
    struct hk_create_opts o = {.capacity = capacity, .max_entries = entries, .job = "bench", .world_size = 1,
                              .preallocate = prealloc};
    check(heap_create(path, &o), "create");
    hk_heap *h;
    check(heap_open(path, tracker, NULL, -1, -1, &h), "open");
    unlink(path);   /* the mapping keeps it alive; nothing is left behind */
    return h;
}

static uint64_t pool(hk_heap *h, uint64_t count, uint64_t size)
{
    char dt[32];
    snprintf(dt, sizeof dt, "'|V%lu'", (unsigned long)size);
    struct hk_desc d = {.name = "objs", .dtype = dt, .dtype_len = (uint32_t)strlen(dt), .ndim = 0,
                        .obj_size = size, .count = count, .kind = 2};
    uint64_t idx;
    check(heap_alloc(h, &d, &idx), "pool");
    return idx;
}

static uint64_t checkpoint(hk_heap *h, struct hk_stats *s)
{
    uint64_t e;
    check(ckpt_prepare(h, "{}", 2, &e), "prepare");
    check(ckpt_commit(h), "commit");
    if (s)
        ckpt_stats(h, s);
    return e;
}

static void bench_alloc(const char *dir, uint64_t n, uint64_t size, int prealloc)
{
    hk_heap *h = make_heap(dir, n * 4096 / (4096 / size) + (64 << 20), n + 1024, HK_TRACK_HASH, prealloc);
    char (*names)[24] = malloc(n * 24);
    for (uint64_t i = 0; i < n; i++)
        snprintf(names[i], 24, "o%lu", (unsigned long)i);
    struct hk_desc d = {.dtype = "'|V256'", .dtype_len = 7, .obj_size = size, .count = 1, .kind = 1};
    uint64_t idx;
    double t0 = now();
    for (uint64_t i = 0; i < n; i++) {
        d.name = names[i];
        check(heap_alloc(h, &d, &idx), "alloc");
    }
    double t = now() - t0;
    struct hk_info info;
    heap_info(h, &info);
    printf("{\"mode\":\"alloc\",\"count\":%lu,\"size\":%lu,\"preallocated\":%d,\"ns_per_alloc\":%.1f,"
           "\"pages_used\":%lu}\n", (unsigned long)n, (unsigned long)size, prealloc, t / n * 1e9,
           (unsigned long)info.pages_used);
    free(names);
    heap_close(h);
    heap_release(h);
}

static void bench_firstwrite(const char *dir, uint64_t n, const char *tracker)
{
    hk_heap *h = make_heap(dir, n * 256 + (64 << 20), 1024, tracker_of(tracker), 0);
    uint64_t idx = pool(h, n, 256);
    checkpoint(h, NULL);   /* everything is now protected (or hashed) */
    for (int round = 0; round < 2; round++) {   /* round 0 warms the page tables */
        double t0 = now();
        for (uint64_t i = 0; i < n; i++)
            *(volatile char *)heap_addr(h, idx, i) = (char)(round + 1);
        double t = now() - t0;
        struct hk_stats s;
        checkpoint(h, &s);
        if (round == 1)
            printf("{\"mode\":\"firstwrite\",\"tracker\":\"%s\",\"count\":%lu,\"ns_per_write\":%.1f,"
                   "\"objects_dirty\":%lu}\n", tracker, (unsigned long)n, t / n * 1e9,
                   (unsigned long)s.objects_dirty);
    }
    heap_close(h);
    heap_release(h);
}

static void bench_paper(const char *dir, uint64_t n, uint64_t size, double frac, const char *tracker,
                        double nvm, int repeats)
{
    hk_heap *h = make_heap(dir, n * (size < 64 ? 64 : size) * 2 + (64 << 20), 1024, tracker_of(tracker), 0);
    uint64_t idx = pool(h, n, size);
    checkpoint(h, NULL);
    for (uint64_t i = 0; i < n; i++)
        memset(heap_addr(h, idx, i), 7, size);
    checkpoint(h, NULL);   /* both shadow slots written once: steady state, no first-touch faults */
    ckpt_set_nvm(h, nvm, 0);
    uint64_t ndirty = (uint64_t)(n * frac + 0.5), seed = 12345;
    uint8_t *hit = calloc(n, 1);
    for (int r = 0; r < repeats; r++) {
        uint64_t written = 0;   /* distinct objects written: what an exact tracker copies */
        memset(hit, 0, n);
        for (uint64_t k = 0; k < ndirty; k++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            uint64_t i = (seed >> 17) % n;
            written += !hit[i];
            hit[i] = 1;
            memset(heap_addr(h, idx, i), r + 1, size);
        }
        double t0 = now();
        struct hk_stats s;
        checkpoint(h, &s);
        double t = now() - t0;
        printf("{\"mode\":\"paper\",\"tracker\":\"%s\",\"count\":%lu,\"size\":%lu,\"fraction\":%g,"
               "\"nvm_gbps\":%g,\"repeat\":%d,\"objects_written\":%lu,\"t_checkpoint\":%.6f,\"objects_dirty\":%lu,\"bytes_dirty\":%lu,"
               "\"bytes_copied\":%lu,\"bytes_meta\":%lu,\"bytes_page_baseline\":%lu,\"t_scan\":%.6f,"
               "\"t_copy\":%.6f,\"t_flush\":%.6f,\"t_commit\":%.6f,\"t_nvm_delay\":%.6f,\"views_degraded\":%lu}\n",
               tracker, (unsigned long)n, (unsigned long)size, frac, nvm, r, (unsigned long)written, t,
               (unsigned long)s.objects_dirty,
               (unsigned long)s.bytes_dirty, (unsigned long)s.bytes_copied, (unsigned long)s.bytes_meta,
               (unsigned long)s.bytes_page_baseline, s.t_scan, s.t_copy, s.t_flush, s.t_commit, s.t_nvm_delay,
               (unsigned long)s.views_degraded);
    }
    free(hit);
    heap_close(h);
    heap_release(h);
}

static void bench_large(const char *dir, uint64_t mb, const char *tracker)
{
    uint64_t bytes = mb << 20;
    hk_heap *h = make_heap(dir, bytes + (64 << 20), 1024, tracker_of(tracker), 0);
    struct hk_desc d = {.name = "big", .dtype = "'|u1'", .dtype_len = 5, .ndim = 1, .shape = {bytes},
                        .obj_size = bytes, .count = 1, .kind = 1};
    uint64_t idx;
    check(heap_alloc(h, &d, &idx), "alloc");
    char *a = heap_addr(h, idx, 0);
    checkpoint(h, NULL);
    memset(a, 1, bytes);
    checkpoint(h, NULL);   /* both slots faulted in */
    char *src = malloc(bytes), *dst = malloc(bytes);
    memset(src, 3, bytes);
    memset(dst, 0, bytes);
    double best_memcpy = 1e9, best_ckpt = 1e9;
    struct hk_stats s;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        memcpy(dst, src, bytes);
        double t = now() - t0;
        best_memcpy = t < best_memcpy ? t : best_memcpy;
        memset(a, r + 2, bytes);
        t0 = now();
        checkpoint(h, &s);
        t = now() - t0;
        best_ckpt = t < best_ckpt ? t : best_ckpt;
    }
    printf("{\"mode\":\"large\",\"tracker\":\"%s\",\"bytes\":%lu,\"memcpy_gbps\":%.3f,\"checkpoint_gbps\":%.3f,"
           "\"ratio\":%.3f,\"bytes_copied\":%lu,\"t_scan\":%.6f,\"t_copy\":%.6f,\"t_flush\":%.6f}\n",
           tracker, (unsigned long)bytes, bytes / best_memcpy / 1e9, bytes / best_ckpt / 1e9,
           best_memcpy / best_ckpt, (unsigned long)s.bytes_copied, s.t_scan, s.t_copy, s.t_flush);
    free(src);
    free(dst);
    heap_close(h);
    heap_release(h);
}

int main(int argc, char **argv)
{
    if (argc >= 6 && !strcmp(argv[1], "alloc"))
        bench_alloc(argv[2], strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10), atoi(argv[5]));
    else if (argc >= 5 && !strcmp(argv[1], "firstwrite"))
        bench_firstwrite(argv[2], strtoull(argv[3], 0, 10), argv[4]);
    else if (argc >= 9 && !strcmp(argv[1], "paper"))
        bench_paper(argv[2], strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10), atof(argv[5]), argv[6],
                    atof(argv[7]), atoi(argv[8]));
    else if (argc >= 5 && !strcmp(argv[1], "large"))
        bench_large(argv[2], strtoull(argv[3], 0, 10), argv[4]);
    else {
        fprintf(stderr, "usage: see the comment at the top of core_bench.c\n");
        return 2;
    }
    return 0;
}
