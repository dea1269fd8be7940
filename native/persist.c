/* persist.c -- map the heap file, detect DAX (MAP_SYNC), make writes durable, and
 * model slower NVM.  On DAX flushes are clwb/clflushopt + sfence; otherwise
 * fdatasync.  On tmpfs a heap survives a process crash, not a power loss. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>
#include "internal.h"

#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif
#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif

static _Thread_local char hk_err[512];

/* hk_errmsg -- the words of the last failure in this thread. */
const char *hk_errmsg(void) { return hk_err; }

/* hk_fail -- record a message and return -err. */
int hk_fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(hk_err, sizeof hk_err, fmt, ap);
    va_end(ap);
    return -err;
}

/* persist_map_file -- map the whole file shared at `at`; MAP_SYNC when the file is on DAX. */
int persist_map_file(hk_heap *h, uint8_t *at, size_t len)
{
    int prot = h->readonly ? PROT_READ : PROT_READ | PROT_WRITE;
    void *p = h->readonly ? MAP_FAILED : mmap(at, len, prot, MAP_SHARED_VALIDATE | MAP_SYNC | MAP_FIXED, h->fd, 0);
    h->dax = p != MAP_FAILED;
    if (p == MAP_FAILED)
        p = mmap(at, len, prot, MAP_SHARED | MAP_FIXED, h->fd, 0);
    if (p == MAP_FAILED)
        return hk_fail(errno, "%s: mmap of %zu bytes failed: %s", h->path, len, strerror(errno));
    struct statfs fs;   /* only a hint for persist_map_in: unknown is "not tmpfs" */
    h->shmem = fstatfs(h->fd, &fs) == 0 && fs.f_type == TMPFS_MAGIC;
    return 0;
}

static int persist_flush_kind = -1;   /* 2 clwb, 1 clflushopt, 0 clflush */

/* persist_flush -- write back the cache lines of [addr, addr+len) on DAX; no-op otherwise. */
void persist_flush(hk_heap *h, const void *addr, size_t len)
{
    if (!h->dax || len == 0)
        return;
#if defined(__x86_64__)
    if (persist_flush_kind < 0) {
        unsigned a, b, c, d;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
        persist_flush_kind = (b >> 24) & 1 ? 2 : (b >> 23) & 1 ? 1 : 0;
    }
    uintptr_t p = (uintptr_t)addr & ~(uintptr_t)63, end = (uintptr_t)addr + len;
    for (; p < end; p += 64) {
        if (persist_flush_kind == 2)
            __asm__ volatile(".byte 0x66, 0x0f, 0xae, 0x30" ::"a"(p) : "memory"); /* clwb (%rax) */
        else if (persist_flush_kind == 1)
            __asm__ volatile(".byte 0x66, 0x0f, 0xae, 0x38" ::"a"(p) : "memory"); /* clflushopt */
        else
            __asm__ volatile("clflush (%0)" ::"r"(p) : "memory");
    }
#endif
}

/* persist_drain -- make everything flushed so far durable: sfence on DAX, fdatasync otherwise. */
int persist_drain(hk_heap *h)
{
    if (h->dax) {
#if defined(__x86_64__)
        __asm__ volatile("sfence" ::: "memory");
#endif
        return 0;
    }
    if (fdatasync(h->fd) != 0)
        return hk_fail(errno, "%s: fdatasync failed: %s", h->path, strerror(errno));
    return 0;
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif

/* persist_populate_now -- map [addr, addr+len) in now, for writing (best effort: kernels
 * before 5.14 lack MADV_POPULATE_* and fault lazily). */
void persist_populate_now(hk_heap *h, void *addr, size_t len)
{
    (void)h;
    madvise(addr, len, MADV_POPULATE_WRITE);
}

/* persist_map_in -- persist_populate_now for pages about to be overwritten whole (a restore).
 * On tmpfs a read fault maps a shared page writable already (tmpfs keeps no dirty accounting
 * to be told of writes) at less than half the cost of a write fault on a page that exists. */
void persist_map_in(hk_heap *h, void *addr, size_t len)
{
    madvise(addr, len, h->shmem ? MADV_POPULATE_READ : MADV_POPULATE_WRITE);
}

/* persist_populate -- note that the checkpoint copy at [addr, addr+len) (inside shadow A or
 * B) is to be mapped in before a checkpoint writes it: the next checkpoint's copy threads do
 * it (persist_warm), not the allocation, which stays O(catalog).  Ranges that follow or
 * overlap the last one noted are merged.  Anything else, or no memory, maps in now. */
void persist_populate(hk_heap *h, void *addr, size_t len)
{
    uint64_t at = (uint64_t)((uint8_t *)addr - h->raw);
    for (unsigned s = 0; s < 2; s++) {
        uint64_t lo = h->sb->off_shadow[s];
        if (at < lo || at - lo >= h->data_len || len > h->data_len - (at - lo))
            continue;
        struct spanvec *v = &h->cold[s];
        uint64_t off = at - lo;
        if (v->n && v->v[v->n - 1].off <= off && off <= v->v[v->n - 1].off + v->v[v->n - 1].len) {
            struct span *l = &v->v[v->n - 1];
            if (off + len > l->off + l->len)
                l->len = off + len - l->off;
            return;
        }
        if (v->n == v->cap) {
            size_t cap = v->cap ? v->cap * 2 : 64;
            struct span *p = realloc(v->v, cap * sizeof *p);
            if (!p)
                break;
            v->v = p;
            v->cap = cap;
        }
        v->v[v->n++] = (struct span){off, len};
        return;
    }
    persist_populate_now(h, addr, len);
}

/* The ranges one checkpoint maps in, as file offsets, cut among the copy threads by bytes. */
struct warm_job {
    hk_heap *h;
    struct span *v;
    size_t n;
    uint64_t total;
};

#define WARM_GRAIN (8u << 20)   /* bytes per thread at least */

/* persist_warm_part -- map in part `part` of the job's bytes. */
static int persist_warm_part(void *ctx, unsigned part, unsigned nparts)
{
    struct warm_job *j = ctx;
    uint64_t lo = j->total * part / nparts, hi = j->total * (part + 1) / nparts, at = 0;
    lo &= ~(uint64_t)(HK_PAGE - 1);
    hi = part + 1 == nparts ? j->total : hi & ~(uint64_t)(HK_PAGE - 1);
    for (size_t i = 0; i < j->n && at < hi; at += j->v[i++].len) {
        uint64_t a = at > lo ? at : lo, b = at + j->v[i].len < hi ? at + j->v[i].len : hi;
        if (a < b)
            persist_populate_now(j->h, j->h->raw + j->v[i].off + (a - at), b - a);
    }
    return 0;
}

/* persist_warm -- before a checkpoint copies, map in the copies noted since the last one, on
 * the checkpoint's threads: every range of slot A (a new unit's first copy goes there, so
 * this checkpoint writes it), and the slot B ranges of small-class pages (their units share
 * pages, so a unit's first write there would fault once per unit, for hundreds of
 * checkpoints).  A page-class range of slot B is left to fault when a checkpoint first
 * writes that page: one fault per page written, what the copy costs anyway. */
void persist_warm(hk_heap *h)
{
    size_t n = h->cold[0].n + h->cold[1].n;
    if (n == 0)
        return;
    struct span *v = malloc(n * sizeof *v);
    struct warm_job job = {.h = h, .v = v};
    for (unsigned s = 0; v && s < 2; s++)
        for (size_t i = 0; i < h->cold[s].n; i++) {
            struct span r = h->cold[s].v[i];
            uint64_t page = r.off / HK_PAGE;
            if (s == 1 && (page >= h->sb->npages || h->pcls[page] >= HK_PAGE_CLASS))
                continue;
            v[job.n++] = (struct span){h->sb->off_shadow[s] + r.off, r.len};
            job.total += r.len;
        }
    if (v)   /* no memory: the copies fault in as they are written */
        par_run(par_parts(h, job.total, WARM_GRAIN), persist_warm_part, &job);
    free(v);
    h->cold[0].n = h->cold[1].n = 0;
}

/* persist_free_cold -- the lists of copies not mapped in yet. */
void persist_free_cold(hk_heap *h)
{
    free(h->cold[0].v);
    free(h->cold[1].v);
}

/* persist_now -- monotonic seconds. */
double persist_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* persist_delay -- spin for the NVM model (sleeping would round up to scheduler ticks). */
void persist_delay(double seconds)
{
    if (seconds <= 0)
        return;
    double end = persist_now() + seconds;
    while (persist_now() < end)
        ;
}
