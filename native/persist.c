/* persist.c -- map the heap file, detect DAX (MAP_SYNC), make writes durable, and
 * model slower NVM.  On DAX flushes are clwb/clflushopt + sfence; otherwise
 * fdatasync.  On tmpfs a heap survives a process crash, not a power loss. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
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

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* persist_populate -- map [addr, addr+len) in now, so the allocator never page-faults
 * (best effort: kernels before 5.14 lack MADV_POPULATE_WRITE and fault lazily). */
void persist_populate(hk_heap *h, void *addr, size_t len)
{
    (void)h;
    madvise(addr, len, MADV_POPULATE_WRITE);
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
