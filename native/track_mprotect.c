/* track_mprotect.c -- the paper's tracker: views are PROT_READ, the first write
 * to a page raises SIGSEGV, the handler records (view, page) and unprotects
 * that page.  Only SEGV_ACCERR inside a registered heap is ours; everything
 * else goes to the handler that was installed before (faulthandler, MPI).
 * When the kernel refuses to split more VMAs (vm.max_map_count) or the record
 * is full, the whole view is unprotected and counted dirty: degraded, never lost.
 * A heap stays registered from attach to release: a thread that faulted just before
 * close made the views writable finds it detached and simply retries its write. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "internal.h"

#define MP_MAX_HEAPS 256
#define MP_RECORD    (1u << 20)

struct mp_state {
    _Atomic uint64_t head;          /* buffer << 32 | count */
    uint64_t *rec[2];               /* view << 32 | page, +1 so 0 means "not yet written" */
    _Atomic uint8_t *degraded;      /* per view */
    _Atomic uint64_t faults, ndegraded;
    _Atomic int detached;           /* closed: the views are writable, nothing is recorded */
};

static struct { _Atomic(hk_heap *) heap; } mp_heaps[MP_MAX_HEAPS];
static struct sigaction mp_prev, mp_older[8];   /* the handler we chain to; those it replaced */
static int mp_installed, mp_depth;
static _Atomic int mp_active;       /* handlers running: release waits for them */
static __thread struct { int set; void *at; } mp_handed;   /* this thread's last fault went to the previous handler */

static void mp_handler(int sig, siginfo_t *si, void *ctx);

/* mp_ours -- our handler, as sigaction wants it. */
static struct sigaction mp_ours(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = mp_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sa;
}

/* mp_install -- put our handler in front once, remembering the one we replace. */
static int mp_install(void)
{
    if (mp_installed)
        return 0;
    struct sigaction sa = mp_ours();
    if (sigaction(SIGSEGV, &sa, &mp_prev) != 0)
        return -errno;
    mp_installed = 1;
    return 0;
}

/* track_mprotect_reassert -- put our handler back in front of one installed since (say
 * faulthandler.enable() after the heap opened), chaining to it; `undo` after that one was
 * removed again (faulthandler.disable()): chain to what it had replaced. */
int track_mprotect_reassert(int undo)
{
    struct sigaction cur, sa = mp_ours();
    if (!mp_installed)
        return 0;
    if (sigaction(SIGSEGV, NULL, &cur) != 0)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == mp_handler) {
        if (undo && mp_depth > 0)
            mp_prev = mp_older[--mp_depth];
        return 0;
    }
    if (!undo && mp_depth < 8)
        mp_older[mp_depth++] = mp_prev;
    return sigaction(SIGSEGV, &sa, &mp_prev) != 0 ? -errno : 0;
}

/* mp_chain -- hand a fault that is not ours to the previous handler. */
static void mp_chain(int sig, siginfo_t *si, void *ctx)
{
    if (mp_prev.sa_flags & SA_SIGINFO) {
        mp_prev.sa_sigaction(sig, si, ctx);
    } else if (mp_prev.sa_handler == SIG_DFL || mp_prev.sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL);   /* the faulting instruction runs again and dies */
    } else {
        mp_prev.sa_handler(sig);
    }
}

/* mp_degrade -- unprotect a whole view and count all of it dirty. */
static void mp_degrade(hk_heap *h, struct mp_state *s, uint32_t view)
{
    if (mprotect(h->views + (size_t)view * h->data_len, h->data_len, PROT_READ | PROT_WRITE) != 0)
        abort();   /* cannot make progress without losing the write */
    if (!atomic_exchange(&s->degraded[view], 1))   /* after unprotecting: see mp_collect */
        atomic_fetch_add(&s->ndegraded, 1);
}

/* mp_fault -- a write fault on a heap view: unprotect its page, then record it (in that
 * order: a record made after the collector swapped lands in the next epoch).  Returns
 * 0 when the fault is not ours. */
static int mp_fault(const siginfo_t *si)
{
    uint8_t *a = si->si_addr;
    for (int i = 0; si->si_code == SEGV_ACCERR && i < MP_MAX_HEAPS; i++) {
        hk_heap *h = atomic_load(&mp_heaps[i].heap);
        if (!h || a < h->views || a >= h->views + (size_t)h->nviews * h->data_len)
            continue;
        struct mp_state *s = h->track;
        if (atomic_load(&s->detached))
            return 1;   /* closed meanwhile: the page is writable now, the write retries */
        uint64_t rel = (uint64_t)(a - h->views);
        uint32_t view = (uint32_t)(rel / h->data_len);
        uint64_t page = (rel % h->data_len) / HK_PAGE;
        atomic_fetch_add(&s->faults, 1);
        if (mprotect(h->views + rel - rel % HK_PAGE, HK_PAGE, PROT_READ | PROT_WRITE) != 0) {
            mp_degrade(h, s, view);   /* vm.max_map_count: the whole view becomes dirty */
            return 1;
        }
        uint64_t hd = atomic_fetch_add(&s->head, 1);
        uint32_t buf = (uint32_t)(hd >> 32), idx = (uint32_t)hd;
        if (idx >= MP_RECORD)
            mp_degrade(h, s, view);
        else
            __atomic_store_n(&s->rec[buf][idx], ((uint64_t)view << 32 | page) + 1, __ATOMIC_RELEASE);
        return 1;
    }
    return 0;
}

/* mp_handler -- ours, or the previous handler's.  A SIGSEGV raise()d by this process is a
 * fault re-raised by a handler: one in front of us that gave up its place (faulthandler
 * installed after the heap opened) -- the write runs again and reaches us -- or the one we
 * handed a fault to -- then, as when a handed fault comes back, the default action kills
 * the process at the faulting instruction. */
static void mp_handler(int sig, siginfo_t *si, void *ctx)
{
    int handed = mp_handed.set;   /* consumed by this signal, whatever it is */
    void *handed_at = mp_handed.at;
    mp_handed.set = 0;
    if (si->si_code <= 0 && si->si_pid == getpid()) {
        if (handed)
            signal(sig, SIG_DFL);
        return;
    }
    atomic_fetch_add(&mp_active, 1);
    int ours = mp_fault(si);
    atomic_fetch_sub(&mp_active, 1);
    if (ours)
        return;
    if (handed && handed_at == si->si_addr) {
        signal(sig, SIG_DFL);   /* the previous handler returned and the same fault came back */
        return;
    }
    mp_handed.set = 1;
    mp_handed.at = si->si_addr;
    mp_chain(sig, si, ctx);
}

/* mp_attach -- register the heap's views with the process-wide handler. */
static int mp_attach(hk_heap *h)
{
    struct mp_state *s = calloc(1, sizeof *s);
    if (!s)
        return hk_fail(ENOMEM, "out of memory");
    s->rec[0] = calloc(MP_RECORD, sizeof(uint64_t));
    s->rec[1] = calloc(MP_RECORD, sizeof(uint64_t));
    s->degraded = calloc(h->nviews, 1);
    if (!s->rec[0] || !s->rec[1] || !s->degraded) {
        free(s->rec[0]);
        free(s->rec[1]);
        free((void *)s->degraded);
        free(s);
        return hk_fail(ENOMEM, "out of memory for the fault record");
    }
    h->track = s;
    int rc = mp_install();
    if (rc)
        return hk_fail(-rc, "installing the SIGSEGV handler failed: %s", strerror(-rc));
    for (int i = 0; i < MP_MAX_HEAPS; i++) {
        hk_heap *none = NULL;
        if (atomic_compare_exchange_strong(&mp_heaps[i].heap, &none, h))
            return 0;
    }
    return hk_fail(EMFILE, "at most %d heaps per process with tracker='mprotect'", MP_MAX_HEAPS);
}

/* mp_protect_all -- make every view read-only again (this also merges split VMAs). */
static int mp_protect_all(hk_heap *h, int prot)
{
    if (mprotect(h->views, (size_t)h->nviews * h->data_len, prot) != 0)
        return hk_fail(errno, "%s: mprotect of the views failed: %s", h->path, strerror(errno));
    return 0;
}

/* mp_arm -- protect everything. */
static int mp_arm(hk_heap *h)
{
    return mp_protect_all(h, PROT_READ);
}

/* mp_collect -- swap the record and take the degraded flags first, then re-protect,
 * then drain: a fault recorded after the swap unprotected its page before recording, so
 * either the re-protect covers it or the next epoch's record has it; never nowhere. */
static int mp_collect(hk_heap *h, int (*emit)(hk_heap *, uint32_t, uint64_t))
{
    struct mp_state *s = h->track;
    uint64_t hd = atomic_load(&s->head), next;
    do
        next = ((hd >> 32) ^ 1) << 32;
    while (!atomic_compare_exchange_weak(&s->head, &hd, next));
    track_mprotect_reassert(0);   /* a handler installed since is chained behind ours */
    uint8_t degraded[HK_NVIEWS_MAX];
    for (uint32_t g = 0; g < h->nviews; g++)
        degraded[g] = atomic_exchange(&s->degraded[g], 0);
    int rc = mp_arm(h);
    if (rc)
        return rc;
    uint32_t buf = (uint32_t)(hd >> 32), n = (uint32_t)hd < MP_RECORD ? (uint32_t)hd : MP_RECORD;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t v;
        while ((v = __atomic_load_n(&s->rec[buf][i], __ATOMIC_ACQUIRE)) == 0)
            ;   /* a handler took the index and is about to store */
        s->rec[buf][i] = 0;
        if (!rc)
            rc = emit(h, (uint32_t)((v - 1) >> 32), (uint32_t)(v - 1));
    }
    for (uint32_t g = 0; g < h->nviews && !rc; g++)
        if (degraded[g])
            for (uint64_t p = 0; p < h->sb->npages && !rc; p++)
                if (h->pcls[p] != HK_PAGE_FREE && h->pcls[p] != HK_PAGE_TAGS)
                    rc = emit(h, g, p);
    h->stats.faults = atomic_exchange(&s->faults, 0);
    h->stats.views_degraded = atomic_exchange(&s->ndegraded, 0);
    return rc;
}

/* mp_detach -- make the views writable for good (the heap stays registered: see the top). */
static void mp_detach(hk_heap *h)
{
    struct mp_state *s = h->track;
    mp_protect_all(h, PROT_READ | PROT_WRITE);
    atomic_store(&s->detached, 1);
}

/* mp_release -- leave the registry, wait for handlers still running, free the record. */
static void mp_release(hk_heap *h)
{
    struct mp_state *s = h->track;
    for (int i = 0; i < MP_MAX_HEAPS; i++) {
        hk_heap *me = h;
        atomic_compare_exchange_strong(&mp_heaps[i].heap, &me, NULL);
    }
    while (atomic_load(&mp_active))
        ;
    if (s) {
        free(s->rec[0]);
        free(s->rec[1]);
        free((void *)s->degraded);
        free(s);
    }
    h->track = NULL;
}

const struct track_ops track_mprotect_ops = {"mprotect", mp_attach, mp_arm, mp_collect, mp_detach, mp_release};
