/* track_uffd.c -- userfaultfd asynchronous write-protect tracker.  Writes to a
 * protected page resolve in the kernel (no signal, no VMA split) and mark the
 * PTE written; PAGEMAP_SCAN reads the written pages and re-protects them in one
 * ioctl.  It watches every page in view 0 and the pages of viewed classes
 * (alias.c) in their views too; which objects of a written page of the other
 * classes changed, ckpt.c finds by comparison.  Needs Linux >= 6.7; the
 * constants are defined here for older headers. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "internal.h"

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

struct uffd_page_region { uint64_t start, end, categories; };
struct uffd_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define UFFD_PAGEMAP_SCAN      _IOWR('f', 16, struct uffd_scan_arg)
#define UFFD_PM_WP_MATCHING    (1 << 0)
#define UFFD_PM_CHECK_WPASYNC  (1 << 1)
#define UFFD_PAGE_IS_WRITTEN   (1 << 1)
#define UFFD_VEC_LEN           4096

#define UFFD_GAP_PAGES 64   /* scan through shorter gaps between watched pages: fewer ioctls */

struct uffd_run { uint64_t lo, hi; };
struct uffd_runs { struct uffd_run *v; size_t n, cap; };

struct uffd_state {
    int uffd, pagemap;
    uint64_t runs_gen;                      /* h->layout_gen the runs were built for, +1 */
    struct uffd_runs runs[HK_NCLASSES];     /* watched pages of class c's views; [HK_PAGE_CLASS]: view 0 */
    struct uffd_page_region vec[UFFD_VEC_LEN];
};

static const uint64_t uffd_features =
    UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

/* uffd_open -- a userfaultfd with the async write-protect features, or -errno. */
static int uffd_open(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0)
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    struct uffdio_api api = {.api = UFFD_API, .features = uffd_features};
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* track_uffd_supported -- does this kernel give us async write-protect? */
int track_uffd_supported(void)
{
    int fd = uffd_open();
    if (fd < 0)
        return 0;
    close(fd);
    return 1;
}

/* uffd_attach -- open the uffd and /proc/self/pagemap and register all views. */
static int uffd_attach(hk_heap *h)
{
    struct uffd_state *s = calloc(1, sizeof *s);
    if (!s)
        return hk_fail(ENOMEM, "out of memory");
    s->uffd = uffd_open();
    if (s->uffd < 0) {
        int e = -s->uffd;
        free(s);
        return hk_fail(e, "userfaultfd with async write-protect is not available (%s); use tracker='mprotect'",
                       strerror(e));
    }
    s->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)h->views, .len = (uint64_t)h->nviews * h->data_len},
        .mode = UFFDIO_REGISTER_MODE_WP};
    if (s->pagemap < 0 || ioctl(s->uffd, UFFDIO_REGISTER, &reg) != 0) {
        int e = errno;
        if (s->pagemap >= 0)
            close(s->pagemap);
        close(s->uffd);
        free(s);
        return hk_fail(e, "%s: registering the views with userfaultfd failed: %s", h->path, strerror(e));
    }
    h->track = s;
    return 0;
}

/* uffd_run_add -- extend the last run to page p, or start a new one past a long gap. */
static int uffd_run_add(struct uffd_runs *r, uint64_t p)
{
    if (r->n && p <= r->v[r->n - 1].hi + UFFD_GAP_PAGES) {
        r->v[r->n - 1].hi = p + 1;
        return 0;
    }
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 16;
        struct uffd_run *v = realloc(r->v, cap * sizeof *v);
        if (!v)
            return hk_fail(ENOMEM, "out of memory for the tracker's page runs");
        r->v = v;
        r->cap = cap;
    }
    r->v[r->n++] = (struct uffd_run){p, p + 1};
    return 0;
}

/* uffd_runs_build -- the runs of pages a tracker must watch: pages in use, except those of
 * objects written only through ckpt_write (heap_put_only).  Rebuilt when the layout changed. */
static int uffd_runs_build(hk_heap *h, struct uffd_state *s)
{
    if (s->runs_gen == h->layout_gen + 1)
        return 0;
    for (unsigned c = 0; c < HK_NCLASSES; c++)
        s->runs[c].n = 0;
    uint64_t lo, hi;
    alias_view_span(h, 0, &lo, &hi);
    for (uint64_t p = lo; p < hi; p++) {
        unsigned pc = h->pcls[p];
        if (pc == HK_PAGE_FREE || pc == HK_PAGE_TAGS || heap_page_put_only(h, p))
            continue;
        int rc = uffd_run_add(&s->runs[HK_PAGE_CLASS], p);
        if (!rc && alias_viewed(h, pc))
            rc = uffd_run_add(&s->runs[pc], p);
        if (rc)
            return rc;
    }
    s->runs_gen = h->layout_gen + 1;
    return 0;
}

/* uffd_scan -- PAGEMAP_SCAN pages [lo, hi) of one view: emit written pages (emit may be
 * NULL) and write-protect them.  Never-touched pages count as written, so the first scan
 * of a page arms it; pages outside the runs are never touched. */
static int uffd_scan(hk_heap *h, uint32_t view, uint64_t lo, uint64_t hi,
                     int (*emit)(hk_heap *, uint32_t, uint64_t))
{
    struct uffd_state *s = h->track;
    uint64_t base = (uintptr_t)h->views + (uint64_t)view * h->data_len;
    uint64_t start = base + lo * HK_PAGE, end = base + hi * HK_PAGE;
    while (start < end) {
        struct uffd_scan_arg a = {
            .size = sizeof a, .flags = UFFD_PM_WP_MATCHING | UFFD_PM_CHECK_WPASYNC,
            .start = start, .end = end, .vec = (uintptr_t)s->vec, .vec_len = UFFD_VEC_LEN,
            .category_mask = UFFD_PAGE_IS_WRITTEN, .return_mask = UFFD_PAGE_IS_WRITTEN};
        long n = ioctl(s->pagemap, UFFD_PAGEMAP_SCAN, &a);
        if (n < 0)
            return hk_fail(errno, "%s: PAGEMAP_SCAN failed: %s", h->path, strerror(errno));
        for (long i = 0; emit && i < n; i++)
            for (uint64_t va = s->vec[i].start; va < s->vec[i].end; va += HK_PAGE) {
                int rc = emit(h, view, (va - base) / HK_PAGE);
                if (rc)
                    return rc;
            }
        if (a.walk_end <= start)
            return hk_fail(EIO, "%s: PAGEMAP_SCAN made no progress", h->path);
        start = a.walk_end;
    }
    return 0;
}

/* uffd_collect -- emit every written (view, page) of the watched runs and re-protect it. */
static int uffd_collect(hk_heap *h, int (*emit)(hk_heap *, uint32_t, uint64_t))
{
    struct uffd_state *s = h->track;
    int rc = uffd_runs_build(h, s);
    for (uint32_t g = 0; !rc && g < h->nviews; g++) {
        unsigned cls = HK_PAGE_CLASS;
        uint32_t slot;
        if (g > 0)
            alias_unit_of(h, g, &cls, &slot);
        const struct uffd_runs *r = &s->runs[cls];
        for (size_t i = 0; !rc && i < r->n; i++)
            rc = uffd_scan(h, g, r->v[i].lo, r->v[i].hi, emit);
    }
    return rc;
}

/* uffd_arm -- protect the spans in use, forgetting what was written before. */
static int uffd_arm(hk_heap *h)
{
    return uffd_collect(h, NULL);
}

/* uffd_detach -- closing the uffd unregisters the ranges. */
static void uffd_detach(hk_heap *h)
{
    struct uffd_state *s = h->track;
    close(s->pagemap);
    close(s->uffd);
    for (unsigned c = 0; c < HK_NCLASSES; c++)
        free(s->runs[c].v);
    free(s);
    h->track = NULL;
}

const struct track_ops track_uffd_ops = {"uffd", uffd_attach, uffd_arm, uffd_collect, uffd_detach, NULL};
