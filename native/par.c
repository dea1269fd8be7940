/* par.c -- run the independent parts of one checkpoint's comparison or copy on several
 * threads.  Workers live for one call and are joined before it returns, so no thread of ours
 * outlives a checkpoint (fork stays safe), and they run with the asynchronous signals
 * blocked, so that those still reach the application's threads.  The scan is not shared: a
 * second thread in the address space turns every write-protect of PAGEMAP_SCAN into a TLB
 * shootdown to the other CPU, and measured 2x slower (README "Decisions"). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include "internal.h"

struct par_job {
    int (*fn)(void *ctx, unsigned part, unsigned nparts);
    void *ctx;
    unsigned part, nparts;
    int rc;
    char msg[512];
};

/* par_worker -- one part on a worker thread; its error text is kept for the caller. */
static void *par_worker(void *arg)
{
    struct par_job *j = arg;
    j->rc = j->fn(j->ctx, j->part, j->nparts);
    if (j->rc)
        snprintf(j->msg, sizeof j->msg, "%s", hk_errmsg());
    return NULL;
}

/* par_run -- fn(ctx, i, n) for every part i < n: part 0 here, the others on workers (a
 * worker that cannot start has its part run here instead).  The first failure wins. */
int par_run(unsigned n, int (*fn)(void *ctx, unsigned part, unsigned nparts), void *ctx)
{
    if (n > PAR_MAX)
        n = PAR_MAX;
    if (n <= 1)
        return fn(ctx, 0, 1);
    crc_compute(0, "", 1);   /* the core's lazy set-ups happen here, on one thread */
    struct par_job job[PAR_MAX];
    pthread_t tid[PAR_MAX];
    int started[PAR_MAX] = {0};
    sigset_t block, old;
    sigfillset(&block);
    int sync_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP};   /* a fault must reach its handler */
    for (size_t i = 0; i < sizeof sync_signals / sizeof *sync_signals; i++)
        sigdelset(&block, sync_signals[i]);
    int blocked = pthread_sigmask(SIG_SETMASK, &block, &old) == 0;
    for (unsigned i = 1; i < n; i++) {
        job[i] = (struct par_job){.fn = fn, .ctx = ctx, .part = i, .nparts = n};
        started[i] = blocked && pthread_create(&tid[i], NULL, par_worker, &job[i]) == 0;
    }
    if (blocked)
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    int rc = fn(ctx, 0, n);
    char msg[512];
    snprintf(msg, sizeof msg, "%s", rc ? hk_errmsg() : "");
    for (unsigned i = 1; i < n; i++) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            par_worker(&job[i]);
        if (!rc && job[i].rc) {
            rc = job[i].rc;
            snprintf(msg, sizeof msg, "%s", job[i].msg);
        }
    }
    return rc ? hk_fail(-rc, "%s", msg) : 0;
}

/* par_parts -- how many parts `work` units of work make, at least `grain` each, at most
 * the heap's threads. */
unsigned par_parts(const hk_heap *h, uint64_t work, uint64_t grain)
{
    uint64_t n = work / grain;
    unsigned t = h->threads > 0 ? (unsigned)h->threads : 1;
    return n < 1 ? 1 : n < t ? (unsigned)n : t;
}
