/* ckpt.c -- checkpoints: collect the dirty units, copy each into the shadow
 * slot that does not hold its newest committed version, tag it, make it
 * durable, then persist the epoch record ("prepared = n") last.  Commit and
 * withdraw finish the epoch; recover restores the working area to an epoch. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>
#include "internal.h"

/* ckpt_crash -- the test hook: die here if asked to. */
static void ckpt_crash(hk_heap *h, int point, uint64_t epoch)
{
    if (h->crash_point == point && (h->crash_epoch == 0 || h->crash_epoch == epoch))
        kill(getpid(), SIGKILL);
}

/* entry_alive -- is the entry a live object (born, not freed)? */
static int entry_alive(const struct hk_entry *e)
{
    return e->kind != HK_KIND_FREE && HK_EPOCH_BORN(e->epochs) && !HK_EPOCH_DEAD(e->epochs);
}

/* ckpt_mark -- note that (page, slot) is dirty: one bit per unit in the page's dirty mask. */
static int ckpt_mark(hk_heap *h, uint64_t page, uint32_t slot)
{
    if (h->dmask[page] == 0) {
        int rc = vec_push32(&h->dpages, (uint32_t)page);
        if (rc) {
            h->all_dirty = 1;   /* out of memory: never lose the mark, copy everything next time */
            return rc;
        }
    }
    h->dmask[page] |= 1ull << slot;
    return 0;
}

/* ckpt_owner -- the live entry and unit number of (page, slot), or -1. */
static int64_t ckpt_owner(hk_heap *h, uint64_t page, uint32_t slot, uint64_t *u)
{
    unsigned pc = h->pcls[page];
    if (pc == HK_PAGE_FREE || pc == HK_PAGE_TAGS || !((h->pmask[page] >> slot) & 1))
        return -1;
    uint32_t own = h->powner[page], idx = own;
    *u = 0;
    if (pc == HK_PAGE_CLASS)
        *u = page - h->cat[idx].first_page;
    else if (own & HK_ROW_FLAG)
        idx = h->slotowner[(size_t)(own & ~HK_ROW_FLAG) * 64 + slot];
    else
        *u = (page - h->cat[idx].first_page) * (HK_PAGE / heap_class_size[pc]) + slot;
    return entry_alive(&h->cat[idx]) ? (int64_t)idx : -1;
}

/* ckpt_unchanged -- is unit u of e, at data offset off, equal to its committed copy (the
 * object's bytes: the copy writes no more)?  Not when it was never copied, was born in the
 * open epoch, or its newest copy is not committed (a withdrawn epoch's: the retry must copy
 * it again). */
static inline int ckpt_unchanged(hk_heap *h, const struct hk_entry *e, const struct hk_tag *t, uint64_t off)
{
    uint32_t l = t->latest;
    return l && HK_TAG_EPOCH(l) <= h->committed && HK_EPOCH_BORN(e->epochs) <= h->committed &&
           memcmp(h->data + off, h->raw + h->sb->off_shadow[HK_TAG_SLOT(l)] + off, e->obj_size) == 0;
}

/* ckpt_table_page -- does page p belong to a table (reached through view 0 only, its units compared)? */
static inline int ckpt_table_page(const hk_heap *h, uint64_t page)
{
    uint32_t own = h->powner[page];
    return !(own & HK_ROW_FLAG) && h->cat[own].kind == HK_KIND_TABLE;
}

/* ckpt_sift_table -- ckpt_sift of a table's page: one owner, consecutive tags, every unit
 * 64 bytes (compared inline, no call per unit). */
static uint64_t ckpt_sift_table(hk_heap *h, uint64_t page, uint64_t m)
{
    struct hk_entry *e = &h->cat[h->powner[page]];
    if (!entry_alive(e) || HK_EPOCH_BORN(e->epochs) > h->committed)
        return m;   /* born in the open epoch: every unit is copied (a dead one's are skipped later) */
    const struct hk_tag *t = heap_tag(h, e, (page - e->first_page) * (HK_PAGE / 64));
    const uint8_t *w = h->data + page * HK_PAGE;
    for (uint64_t b = m; b; b &= b - 1) {
        uint32_t j = (uint32_t)__builtin_ctzll(b), l = t[j].latest;
        if (l && HK_TAG_EPOCH(l) <= h->committed &&
            memcmp(w + j * 64, h->raw + h->sb->off_shadow[HK_TAG_SLOT(l)] + page * HK_PAGE + j * 64, 64) == 0)
            m &= ~(b & -b);
    }
    return m;
}

/* ckpt_sift -- of the used slots m of a written small-class page, those whose object
 * changed: one write fault names the page, the comparison names the objects. */
static uint64_t ckpt_sift(hk_heap *h, uint64_t page, uint64_t m)
{
    if (ckpt_table_page(h, page))
        return ckpt_sift_table(h, page, m);
    uint64_t off = page * HK_PAGE, u;
    uint32_t size = heap_class_size[h->pcls[page]];
    for (uint64_t b = m; b; b &= b - 1) {
        uint32_t j = (uint32_t)__builtin_ctzll(b);
        int64_t idx = ckpt_owner(h, page, j, &u);
        if (idx >= 0 && ckpt_unchanged(h, &h->cat[idx], heap_tag(h, &h->cat[idx], u), off + (uint64_t)j * size))
            m &= ~(b & -b);
    }
    return m;
}

#define SIFT_GRAIN (1u << 20)   /* bytes read per part at least (a page and its copy: 8 KiB) */

/* ckpt_sift_part -- part `part` of the written shared pages: mark the objects that changed. */
static int ckpt_sift_part(void *ctx, unsigned part, unsigned nparts)
{
    hk_heap *h = ctx;
    size_t lo = h->sift.n * part / nparts, hi = h->sift.n * (part + 1) / nparts;
    for (size_t i = lo; i < hi; i++) {
        if (i + 2 < hi) {   /* pages are scattered: start on the next ones' lines */
            uint64_t off = (uint64_t)h->sift.v[i + 2] * HK_PAGE;
            __builtin_prefetch(h->data + off, 0, 0);
            __builtin_prefetch(h->raw + h->sb->off_shadow[0] + off, 0, 0);
            __builtin_prefetch(h->raw + h->sb->off_shadow[1] + off, 0, 0);
        }
        uint32_t p = h->sift.v[i];
        h->dmask[p] |= ckpt_sift(h, p, h->pmask[p]);   /* parts own distinct pages */
    }
    return 0;
}

/* ckpt_emit -- tracker callback: (view, page) written -> mark the units it names. */
static int ckpt_emit(hk_heap *h, uint32_t view, uint64_t page)
{
    if (page >= h->sb->npages)
        return 0;
    unsigned pc = h->pcls[page];
    if (pc == HK_PAGE_FREE || pc == HK_PAGE_TAGS)
        return 0;
    if (pc == HK_PAGE_CLASS)
        return view == 0 ? ckpt_mark(h, page, 0) : 0;
    int table = view == 0 && ckpt_table_page(h, page);
    if (view == 0 && (!alias_viewed(h, pc) || table)) {   /* no views: the objects on the page it names */
        uint64_t m = h->pmask[page];
        if (h->dmask[page] == 0 && m) {
            int rc = vec_push32(&h->dpages, (uint32_t)page);
            if (rc) {
                h->all_dirty = 1;
                return rc;
            }
        }
        /* several objects share it (not under `page`): ckpt_sift_part names those that changed;
         * should the list not grow, the whole page is taken */
        if ((h->tracker == HK_TRACK_PAGE && !table) || !(m & (m - 1)) || vec_push32(&h->sift, (uint32_t)page))
            h->dmask[page] |= m;
        return 0;
    }
    unsigned cls = pc;
    uint32_t slot = 0;
    if (view > 0)
        alias_unit_of(h, view, &cls, &slot);
    return cls == pc ? ckpt_mark(h, page, slot) : 0;
}

/* ckpt_mark_unit -- mark unit u of entry idx dirty (the page tracker: its whole page,
 * whatever the write path, so that it stays the page-grained baseline). */
int ckpt_mark_unit(hk_heap *h, uint32_t idx, uint64_t u)
{
    const struct hk_entry *e = &h->cat[idx];
    uint64_t off;
    uint32_t len;
    heap_unit_place(h, e, u, &off, &len);
    if (h->tracker == HK_TRACK_PAGE && e->kind != HK_KIND_TABLE)   /* a table's units are compared instead */
        return ckpt_emit(h, 0, off / HK_PAGE);
    return ckpt_mark(h, off / HK_PAGE, (uint32_t)(off % HK_PAGE) / heap_class_size[e->cls]);
}

/* ckpt_mark_entry -- mark every unit of a live entry (hash: only the changed ones; a table's
 * units are compared with their committed copies under every tracker). */
static int ckpt_mark_entry(hk_heap *h, uint32_t idx, int by_hash)
{
    struct hk_entry *e = &h->cat[idx];
    if (!entry_alive(e) || (by_hash && h->putonly && h->putonly[idx]))   /* put marks what it writes */
        return 0;
    int table = e->kind == HK_KIND_TABLE && !by_hash;
    for (uint64_t u = 0, n = heap_units(e); u < n; u++) {
        if (table) {
            uint64_t off;
            uint32_t len;
            heap_unit_place(h, e, u, &off, &len);
            if (ckpt_unchanged(h, e, heap_tag(h, e, u), off))
                continue;
        } else if (by_hash) {
            uint64_t off;
            uint32_t len;
            heap_unit_place(h, e, u, &off, &len);
            struct hk_tag *t = heap_tag(h, e, u);
            if (t->latest && t->crc[HK_TAG_SLOT(t->latest)] == crc_compute(0, h->data + off, len))
                continue;
        }
        int rc = ckpt_mark_unit(h, idx, u);
        if (rc)
            return rc;
    }
    return 0;
}

/* ckpt_open_pages -- make an exposed object's pages writable in the views it is seen through. */
static int ckpt_open_pages(hk_heap *h, uint32_t idx)
{
    struct hk_entry *e = &h->cat[idx];
    for (uint64_t u = 0, n = heap_units(e); u < n; u++) {
        uint64_t off;
        uint32_t len;
        heap_unit_place(h, e, u, &off, &len);
        uint32_t view = e->cls == HK_PAGE_CLASS || e->kind == HK_KIND_TABLE ? 0
                        : alias_view_of(h, e->cls, (uint32_t)(off % HK_PAGE) / heap_class_size[e->cls]);
        uint8_t *page = h->views + (size_t)view * h->data_len + off - off % HK_PAGE;
        if (mprotect(page, HK_PAGE, PROT_READ | PROT_WRITE) != 0)
            return hk_fail(errno, "%s: cannot make '%.63s' writable for system calls: %s", h->path, e->name,
                           strerror(errno));
    }
    return 0;
}

/* ckpt_expose -- let system calls (read, recv, MPI's CMA) write into an object: the mprotect
 * trackers keep its pages writable and count all of it written at every checkpoint.  The
 * uffd tracker and those without protection see such writes already: nothing to do. */
int ckpt_expose(hk_heap *h, uint64_t index)
{
    if (h->closed || h->readonly || index >= heap_hwm(h) || !entry_alive(&h->cat[index]))
        return hk_fail(h->readonly ? EROFS : ENOENT, "%s: no writable live object at catalog index %lu",
                       h->path, (unsigned long)index);
    if (h->ops != &track_mprotect_ops)
        return 0;
    for (size_t i = 0; i < h->exposed.n; i++)
        if (h->exposed.v[i] == index)
            return ckpt_open_pages(h, (uint32_t)index);
    int rc = vec_push32(&h->exposed, (uint32_t)index);
    return rc ? rc : ckpt_open_pages(h, (uint32_t)index);
}

/* ckpt_unexpose -- forget an exposed object (it is freed, or the heap restored). */
void ckpt_unexpose(hk_heap *h, uint32_t index)
{
    for (size_t i = 0; i < h->exposed.n; i++)
        if (h->exposed.v[i] == index)
            h->exposed.v[i--] = h->exposed.v[--h->exposed.n];
}

/* page_cmp -- qsort order of page numbers. */
static int page_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* ckpt_collect -- the dirty set of this epoch, in address order: every source marks
 * bits in the per-page dirty masks, then the marked pages are walked in order. */
static int ckpt_collect(hk_heap *h, int by_hash)
{
    int rc = 0;
    h->work.n = 0;
    int everything = h->tracker == HK_TRACK_FULL || h->tracker == HK_TRACK_HASH || h->all_dirty;
    by_hash |= h->tracker == HK_TRACK_HASH && !h->all_dirty;
    if (h->ops)
        rc = h->ops->collect(h, ckpt_emit);
    if (!rc && h->sift.n)   /* read-only work, after the scan: no page changes protection now */
        par_run(par_parts(h, (uint64_t)h->sift.n * 2 * HK_PAGE, SIFT_GRAIN), ckpt_sift_part, h);
    h->sift.n = 0;
    for (size_t i = 0; !rc && i < h->exposed.n; i++)   /* re-protected by collect: open them again */
        if (!(rc = ckpt_mark_entry(h, h->exposed.v[i], 0)))
            rc = ckpt_open_pages(h, h->exposed.v[i]);
    for (uint64_t i = 0; !rc && everything && i < heap_hwm(h); i++)
        rc = ckpt_mark_entry(h, (uint32_t)i, by_hash);
    for (size_t i = 0; !rc && i < h->fresh.n; i++)
        rc = ckpt_mark_entry(h, h->fresh.v[i], 0);
    if (rc)
        return rc;
    qsort(h->dpages.v, h->dpages.n, sizeof *h->dpages.v, page_cmp);
    for (size_t i = 0; i < h->dpages.n && !rc; i++) {
        uint64_t page = h->dpages.v[i], m = h->dmask[page], u;
        h->dmask[page] = 0;
        for (; m && !rc; m &= m - 1) {
            int64_t idx = ckpt_owner(h, page, (uint32_t)__builtin_ctzll(m), &u);
            if (idx >= 0) {
                struct unit x = {.entry = (uint32_t)idx, .u = u};
                heap_unit_place(h, &h->cat[idx], u, &x.off, &x.len);
                rc = vec_push_unit(&h->work, &x);
            }
        }
    }
    h->dpages.n = 0;
    return rc;
}

/* ckpt_count -- stats of one copied unit (units arrive sorted by address). */
static void ckpt_count(hk_heap *h, const struct unit *x, uint64_t *last_page, uint64_t *last_entry, uint64_t *last_obj)
{
    struct hk_stats *s = &h->stats;
    const struct hk_entry *e = &h->cat[x->entry];
    uint64_t page = x->off / HK_PAGE;
    uint64_t obj = e->cls == HK_PAGE_CLASS ? x->u / ((e->obj_size + HK_PAGE - 1) / HK_PAGE) : x->u;
    s->bytes_copied += x->len;
    s->bytes_meta += 8;
    s->pages_dirty += page != *last_page;
    s->objects_dirty += x->entry != *last_entry || obj != *last_obj;
    *last_page = page;
    *last_entry = x->entry;
    *last_obj = obj;
}

/* One checkpoint's copy, cut into parts that run side by side (par_run): each part
 * takes a contiguous range of the work list and keeps its own share of the digest. */
struct copy_job {
    hk_heap *h;
    uint64_t n;
    uint64_t digest[PAR_MAX], units[PAR_MAX];
    uint8_t *delta;             /* keep_delta: where the units go packed, part p from pos[p] */
    uint64_t pos[PAR_MAX];
};

#define COPY_GRAIN (256u << 10)   /* bytes per part at least: a thread costs tens of microseconds */
#define DELTA_KEEP_MAX (64u << 20)   /* a larger delta is not packed (DRAM kept for the job's life) */

/* ckpt_copy_part -- copy part `part` of the queued units into their free shadow slots,
 * checksumming each on the way (one read of the source), and tag them. */
static int ckpt_copy_part(void *ctx, unsigned part, unsigned nparts)
{
    struct copy_job *job = ctx;
    hk_heap *h = job->h;
    uint64_t n = job->n, digest = 0, units = 0, pos = job->pos[part];
    size_t lo = h->work.n * part / nparts, hi = h->work.n * (part + 1) / nparts;
    for (size_t i = lo; i < hi; i++) {
        if (i % 4096 == 0)
            atomic_fetch_add(&h->prog_done, i + 4096 <= hi ? 4096 : hi - i);
        if (i + 16 < hi) {   /* units are scattered: fetch their data and tags ahead */
            const struct unit *y = &h->work.v[i + 16];
            __builtin_prefetch(y->src ? y->src : h->data + y->off, 0, 0);
            __builtin_prefetch(heap_tag(h, &h->cat[y->entry], y->u), 1, 0);
        }
        if (i + 8 < hi && h->work.v[i + 8].len % 64) {   /* and the slot of what cannot stream */
            const struct unit *y = &h->work.v[i + 8];
            uint32_t ly = heap_tag(h, &h->cat[y->entry], y->u)->latest;
            __builtin_prefetch(h->raw + h->sb->off_shadow[ly == 0 ? 0 : !tag_slot_at(ly, h->committed)] + y->off, 1, 0);
        }
        if (i == h->work.n / 2)   /* for an empty set: see ckpt_finish */
            ckpt_crash(h, HK_CRASH_MID_COPY, n);
        struct unit *x = &h->work.v[i];
        struct hk_tag *t = heap_tag(h, &h->cat[x->entry], x->u);
        uint32_t l = t->latest, slot = l == 0 ? 0 : !tag_slot_at(l, h->committed);
        if (HK_EPOCH_BORN(h->cat[x->entry].epochs) <= h->committed) {   /* its committed copy leaves the digest */
            uint32_t old = tag_slot_at(l, h->committed);
            digest ^= state_unit_hash(x->entry, x->u, old, t->crc[old]);
        } else {
            units++;
        }
        uint8_t *dst = h->raw + h->sb->off_shadow[slot] + x->off;
        const uint8_t *src = x->src ? x->src : h->data + x->off;
        uint32_t crc = crc_copy(dst, src, x->len);
        persist_flush(h, dst, x->len);
        if (job->delta) {   /* packed for the partner while in cache; checked like the copy */
            uint8_t *out = job->delta + pos;
            memcpy(out, src, x->len);
            if (crc_compute(0, out, x->len) != crc)   /* written to meanwhile: take the copy's bytes */
                memcpy(out, dst, x->len);
            pos += x->len;
        }
        digest ^= state_unit_hash(x->entry, x->u, slot, crc);
        t->crc[slot] = crc;
        __atomic_store_n(&t->latest, (uint32_t)n | slot << 31, __ATOMIC_RELEASE);
        persist_flush(h, t, sizeof *t);
    }
    crc_fence();   /* a tag may become visible before its streamed copy: harmless, the epoch is
                    * not prepared until persist_drain, and restores never read its slot before */
    job->digest[part] = digest;
    job->units[part] = units;
    return 0;
}

/* ckpt_copy -- count the queued units in address order (which sizes the parts), then copy
 * them, on several threads when there is enough to copy. */
static void ckpt_copy(hk_heap *h, uint64_t n)
{
    struct hk_stats *s = &h->stats;
    uint64_t last_page = ~0ull, last_entry = ~0ull, last_obj = ~0ull;
    for (size_t i = 0; i < h->work.n; i++)
        ckpt_count(h, &h->work.v[i], &last_page, &last_entry, &last_obj);
    persist_warm(h);   /* new objects' copies are mapped in here, on the copy's threads */
    atomic_store(&h->prog_total, h->work.n);
    atomic_store(&h->prog_done, 0);
    struct copy_job job = {.h = h, .n = n};
    unsigned parts = par_parts(h, s->bytes_copied, COPY_GRAIN);
    if (h->keep_delta && s->bytes_copied <= DELTA_KEEP_MAX && delta_room(h, s->bytes_copied)) {
        job.delta = h->delta;
        uint64_t at = 0;
        for (size_t p = 0, i = 0; p < parts; p++) {   /* where each part starts: its first unit's bytes */
            for (size_t lo = h->work.n * p / parts; i < lo; i++)
                at += h->work.v[i].len;
            job.pos[p] = at;
        }
    }
    par_run(parts, ckpt_copy_part, &job);   /* the parts cannot fail */
    if (job.delta) {
        h->delta_len = s->bytes_copied;
        h->delta_epoch = n;
    }
    for (unsigned p = 0; p < parts; p++) {
        h->next_digest ^= job.digest[p];
        h->next_units += job.units[p];
    }
    s->units_dirty = h->work.n;
    s->bytes_dirty = s->bytes_copied;
    s->bytes_page_baseline = s->pages_dirty * HK_PAGE;
    s->copy_threads = parts;
}

/* ckpt_write_record -- persist "prepared = n" with the user's metadata and the epoch's digest. */
static int ckpt_write_record(hk_heap *h, uint64_t n, const char *meta, uint32_t meta_len)
{
    struct hk_record r = {.epoch = n, .entries_hwm = h->hdr.entries_hwm, .digest = h->next_digest,
                          .units = h->next_units, .meta_len = meta_len};
    memcpy(r.meta, meta, meta_len);
    return state_write_record(h, &r);
}

/* ckpt_leaving -- take the entries freed in epoch n out of its digest. */
static void ckpt_leaving(hk_heap *h, uint64_t n)
{
    for (size_t i = 0; i < h->pending.n; i++) {
        struct hk_entry *e = &h->cat[h->pending.v[i]];
        if (HK_EPOCH_DEAD(e->epochs) == n && HK_EPOCH_BORN(e->epochs) <= h->committed) {
            h->next_digest ^= state_entry_term(h, h->pending.v[i], h->committed, NULL);
            h->next_units -= heap_units(e);
        }
    }
}

/* ckpt_write -- write objects through the untracked mapping and mark them dirty:
 * the bulk path, with no write fault per object. */
int ckpt_write(hk_heap *h, uint64_t index, const uint64_t *objs, size_t n, const void *src, size_t src_len)
{
    if (h->closed || h->readonly || index >= heap_hwm(h) || !entry_alive(&h->cat[index]))
        return hk_fail(h->readonly ? EROFS : ENOENT, "%s: no writable live object at catalog index %lu",
                       h->path, (unsigned long)index);
    struct hk_entry *e = &h->cat[index];
    if (src_len / (e->obj_size ? e->obj_size : 1) < n)
        return hk_fail(EINVAL, "buffer of %zu bytes is too small for %zu objects of %lu bytes", src_len, n,
                       (unsigned long)e->obj_size);
    for (size_t i = 0; i < n; i++) {
        uint64_t off, u, nu;
        int rc = heap_object_span(h, index, objs[i], &off, &u, &nu);
        if (rc)
            return rc;
        memcpy(h->data + off, (const uint8_t *)src + i * e->obj_size, e->obj_size);
        for (uint64_t k = 0; k < nu; k++)
            if ((rc = ckpt_mark_unit(h, (uint32_t)index, u + k)))
                return rc;
    }
    return 0;
}

/* ckpt_start -- may epoch committed+1 be prepared with meta_len bytes of metadata?  Resets the stats. */
int ckpt_start(hk_heap *h, uint32_t meta_len)
{
    h->delta_epoch = 0;   /* what an earlier prepare packed is never handed on for this one */
    if (h->closed || h->readonly)
        return hk_fail(h->closed ? EBADF : EROFS, "%s: heap is %s", h->path, h->closed ? "closed" : "read-only");
    if (meta_len > HK_META_MAX)
        return hk_fail(EINVAL, "checkpoint metadata is %u bytes, at most %d fit", meta_len, HK_META_MAX);
    if (h->prepared != h->committed)
        return hk_fail(EALREADY, "%s: epoch %lu is prepared but neither committed nor withdrawn", h->path,
                       (unsigned long)h->prepared);
    if (h->committed + 1 >= 0x7fffffffu)
        return hk_fail(EOVERFLOW, "%s: epoch counter exhausted", h->path);
    memset(&h->stats, 0, sizeof h->stats);
    h->stats.epoch = h->committed + 1;
    return 0;
}

/* ckpt_prepare -- steps 1-3 of the protocol for epoch committed+1. */
int ckpt_prepare(hk_heap *h, const char *meta, uint32_t meta_len, uint64_t *epoch)
{
    int rc = ckpt_start(h, meta_len);
    if (rc)
        return rc;
    uint64_t n = h->committed + 1;
    double t0 = persist_now();
    rc = ckpt_collect(h, 0);
    if (rc) {
        h->all_dirty = 1;   /* the tracker may have forgotten writes: copy everything next time */
        return rc;
    }
    return ckpt_finish(h, n, meta, meta_len, t0, epoch);
}

/* ckpt_finish -- copy the collected units, flush the catalog, persist the record of epoch n. */
int ckpt_finish(hk_heap *h, uint64_t n, const char *meta, uint32_t meta_len, double t0, uint64_t *epoch)
{
    struct hk_stats *s = &h->stats;
    int rc;
    double t1 = persist_now();
    h->next_digest = h->digest;
    h->next_units = h->units;
    ckpt_leaving(h, n);
    ckpt_crash(h, HK_CRASH_BEFORE_COPY, n);
    if (h->work.n == 0)
        ckpt_crash(h, HK_CRASH_MID_COPY, n);
    ckpt_copy(h, n);
    double t2 = persist_now();
    if (h->nvm_gbps > 0 || h->nvm_lat_ns > 0) {
        double model = (h->nvm_gbps > 0 ? s->bytes_copied / (h->nvm_gbps * 1e9) : 0) +
                       h->work.n * h->nvm_lat_ns * 1e-9;
        s->t_nvm_delay = model > t2 - t1 ? model - (t2 - t1) : 0;
        persist_delay(s->t_nvm_delay);
    }
    ckpt_crash(h, HK_CRASH_AFTER_COPY, n);
    double t3 = persist_now();
    for (size_t i = 0; i < h->touched.n; i++)
        persist_flush(h, &h->cat[h->touched.v[i]], sizeof(struct hk_entry));
    s->bytes_meta += h->touched.n * sizeof(struct hk_entry);
    rc = persist_drain(h);
    double t4 = persist_now();
    if (rc || (rc = ckpt_write_record(h, n, meta, meta_len))) {
        h->all_dirty = 1;   /* copies may be lost: copy everything next time */
        return rc;
    }
    s->bytes_meta += sizeof(struct hk_record);
    ckpt_crash(h, HK_CRASH_AFTER_PREPARE, n);
    h->prepared = n;
    h->touched.n = h->fresh.n = 0;
    h->all_dirty = 0;
    s->t_scan = t1 - t0;
    s->t_copy = t2 - t1;
    s->t_flush = t4 - t3;
    s->t_commit = persist_now() - t4;
    *epoch = n;
    return 0;
}

/* ckpt_commit -- every rank prepared: the epoch is committed; frees become reusable. */
int ckpt_commit(hk_heap *h)
{
    if (h->closed)
        return hk_fail(EBADF, "%s: heap is closed", h->path);
    if (h->prepared != h->committed + 1)
        return hk_fail(EINVAL, "%s: no prepared epoch to commit", h->path);
    h->committed = h->prepared;
    h->digest = h->next_digest;
    h->units = h->next_units;
    for (size_t i = 0; i < h->pending.n; i++)
        heap_release_entry(h, h->pending.v[i]);
    h->pending.n = 0;
    return 0;
}

/* ckpt_withdraw -- some rank failed: drop the prepared epoch, keep its dirty set for the retry. */
int ckpt_withdraw(hk_heap *h)
{
    if (h->closed)
        return hk_fail(EBADF, "%s: heap is closed", h->path);
    if (h->prepared != h->committed + 1)
        return hk_fail(EINVAL, "%s: no prepared epoch to withdraw", h->path);
    int rc = state_kill_record(h, h->prepared);
    if (rc)
        return rc;
    h->prepared = h->committed;
    for (size_t i = 0; i < h->work.n && !rc; i++)   /* copied in vain: dirty again for the retry */
        rc = ckpt_mark_unit(h, h->work.v[i].entry, h->work.v[i].u);
    return rc;
}

/* One live entry's restore, cut into parts of its units that run side by side (par_run). */
struct restore_job {
    hk_heap *h;
    uint32_t idx;
    uint64_t E;
};

#define RESTORE_GRAIN (4u << 20)   /* bytes per part at least */

/* ckpt_restore_part -- bring units of part `part` back from their newest slot <= E: the
 * working pages of the part are mapped in at once (one call, not a fault per page), each
 * unit is copied and checksummed in one pass (crc_copy), and a copy whose checksum is not
 * its tag's fails the restore (what it wrote is working data, which the restore owns). */
static int ckpt_restore_part(void *ctx, unsigned part, unsigned nparts)
{
    struct restore_job *job = ctx;
    hk_heap *h = job->h;
    struct hk_entry *e = &h->cat[job->idx];
    uint64_t n = heap_units(e), lo = n * part / nparts, hi = n * (part + 1) / nparts, E = job->E;
    if (e->npages && hi - lo > 1) {
        uint64_t first = e->first_page + (e->cls == HK_PAGE_CLASS ? lo : 0);
        uint64_t last = e->cls == HK_PAGE_CLASS ? e->first_page + hi : e->first_page + e->npages;
        if (!h->dax && (e->cls == HK_PAGE_CLASS || nparts == 1))
            persist_map_in(h, h->data + first * HK_PAGE, (last - first) * HK_PAGE);
    }
    int rc = 0;
    for (uint64_t u = lo; u < hi && !rc; u++) {
        struct hk_tag *t = heap_tag(h, e, u);
        uint32_t l = t->latest, slot = tag_slot_at(l, E);
        if (l == 0) {
            rc = hk_fail(EBADMSG, "%s: object '%.63s' (unit %lu) has no checkpoint copy", h->path, e->name,
                         (unsigned long)u);
            break;
        }
        uint64_t off;
        uint32_t len;
        heap_unit_place(h, e, u, &off, &len);
        const uint8_t *src = h->raw + h->sb->off_shadow[slot] + off;
        if (crc_copy(h->data + off, src, len) != t->crc[slot])
            rc = hk_fail(EBADMSG, "%s: checkpoint copy of '%.63s' (unit %lu, epoch <= %lu) is corrupt "
                         "(checksum mismatch)", h->path, e->name, (unsigned long)u, (unsigned long)E);
        else if (HK_TAG_EPOCH(l) > E) {
            __atomic_store_n(&t->latest, (uint32_t)E | slot << 31, __ATOMIC_RELEASE);
            persist_flush(h, t, sizeof *t);
        }
    }
    crc_fence();   /* the streamed copies are in place before the restore goes on */
    return rc;
}

/* ckpt_restore_entry -- bring every unit of a live entry back from its newest slot <= E,
 * on several threads when it is large. */
static int ckpt_restore_entry(hk_heap *h, uint32_t idx, uint64_t E)
{
    struct hk_entry *e = &h->cat[idx];
    struct restore_job job = {.h = h, .idx = idx, .E = E};
    uint64_t bytes = (e->npages ? e->npages : 1) * HK_PAGE;
    return par_run(par_parts(h, bytes, RESTORE_GRAIN), ckpt_restore_part, &job);
}

/* ckpt_recover -- restore the working area to committed epoch E (prepared or prepared-1). */
int ckpt_recover(hk_heap *h, uint64_t E)
{
    if (h->closed || h->readonly)
        return hk_fail(h->closed ? EBADF : EROFS, "%s: heap is %s", h->path, h->closed ? "closed" : "read-only");
    if (E > h->prepared || E + 1 < h->prepared)
        return hk_fail(ERANGE, "%s: cannot restore epoch %lu: this heap is at epoch %lu and holds only "
                       "epochs %lu..%lu", h->path, (unsigned long)E, (unsigned long)h->prepared,
                       (unsigned long)(h->prepared ? h->prepared - 1 : 0), (unsigned long)h->prepared);
    int rc = state_check(h, E);   /* nothing is changed before the catalog and tags are known good */
    if (rc)
        return rc;
    if (h->prepared > E && (rc = state_kill_record(h, h->prepared)))   /* a crash from here on is harmless */
        return rc;
    atomic_store(&h->prog_total, heap_hwm(h));
    for (uint64_t i = 0; i < heap_hwm(h); i++) {
        struct hk_entry *e = &h->cat[i];
        uint32_t born = HK_EPOCH_BORN(e->epochs), dead = HK_EPOCH_DEAD(e->epochs);
        atomic_store(&h->prog_done, i);
        if (i == heap_hwm(h) / 2)
            ckpt_crash(h, HK_CRASH_MID_RESTORE, 0);
        if (e->kind == HK_KIND_FREE)
            continue;
        if (born == 0) {
            memset(e, 0, sizeof *e);   /* an allocation cut short: its fields are not to be trusted */
        } else if (born > E || (dead && dead <= E)) {
            alloc_wipe(h, e);
        } else {
            if (dead)
                __atomic_store_n(&e->epochs, HK_EPOCHS(born, 0), __ATOMIC_RELEASE);
            if ((rc = ckpt_restore_entry(h, (uint32_t)i, E)))
                return rc;
        }
        persist_flush(h, e, sizeof *e);
    }
    h->prepared = h->committed = E;
    h->touched.n = h->exposed.n = 0;
    h->all_dirty = 0;
    h->good_epoch = (int64_t)E;
    const struct hk_record *r = state_record(h, E);
    h->digest = r ? r->digest : 0;
    h->units = r ? r->units : 0;
    if ((rc = alloc_rebuild(h)) || (rc = persist_drain(h)))
        return rc;
    return h->ops ? h->ops->arm(h) : 0;
}

/* ckpt_meta -- the metadata saved with the newest valid epoch record. */
int ckpt_meta(hk_heap *h, char *buf, uint32_t cap, uint32_t *len)
{
    *len = 0;
    if (h->closed)
        return hk_fail(EBADF, "%s: heap is closed", h->path);
    if (h->prepared == 0)
        return 0;
    const struct hk_record *r = state_record(h, h->prepared);
    if (!r || r->meta_len > cap)
        return hk_fail(EBADMSG, "%s: epoch record %lu is damaged", h->path, (unsigned long)h->prepared);
    memcpy(buf, r->meta, r->meta_len);
    *len = r->meta_len;
    return 0;
}

/* ckpt_stats -- figures of the last prepare. */
int ckpt_stats(hk_heap *h, struct hk_stats *out)
{
    *out = h->stats;
    return 0;
}

/* ckpt_unit_at -- byte offset of unit u inside its object's packed bytes. */
static uint64_t ckpt_unit_at(const struct hk_entry *e, uint64_t u)
{
    uint64_t ppo = e->obj_size ? (e->obj_size + HK_PAGE - 1) / HK_PAGE : 1;
    return e->cls == HK_PAGE_CLASS ? (u / ppo) * e->obj_size + (u % ppo) * HK_PAGE : u * e->obj_size;
}

/* ckpt_crcs -- CRC32C of n buffers of the lengths given. */
static void ckpt_crcs(const uint8_t *const *p, const uint32_t *len, size_t n, uint32_t *out)
{
    for (size_t k = 0; k < n; k++)
        out[k] = crc_compute(0, p[k], len[k]);
}

/* ckpt_scan_entry -- ckpt_scan of one live entry, three units at a time. */
static int ckpt_scan_entry(hk_heap *h, struct hk_entry *e, uint64_t E, int flags, uint64_t *checked)
{
    for (uint64_t u0 = 0, n = heap_units(e); u0 < n; u0 += 3) {
        size_t m = n - u0 < 3 ? (size_t)(n - u0) : 3;
        const uint8_t *copy[3], *work[3];
        uint32_t len[3], want[3], slot[3], ccopy[3] = {0}, cwork[3] = {0};
        uint64_t off[3];
        for (size_t k = 0; k < m; k++) {
            struct hk_tag *t = heap_tag(h, e, u0 + k);
            slot[k] = tag_slot_at(t->latest, E);
            want[k] = t->crc[slot[k]];
            heap_unit_place(h, e, u0 + k, &off[k], &len[k]);
            copy[k] = h->raw + h->sb->off_shadow[slot[k]] + off[k];
            work[k] = h->data + off[k];
        }
        if (flags & CKPT_SHADOW)
            ckpt_crcs(copy, len, m, ccopy);
        if (flags & CKPT_WORKING)
            ckpt_crcs(work, len, m, cwork);
        for (size_t k = 0; k < m; k++) {
            int bad_work = (flags & CKPT_WORKING) && cwork[k] != want[k];
            int bad_copy = (flags & CKPT_SHADOW) ? ccopy[k] != want[k]
                           : bad_work && crc_compute(0, copy[k], len[k]) != want[k];
            uint64_t at = ckpt_unit_at(e, u0 + k);
            if (bad_work && (flags & CKPT_REPAIR) && !bad_copy) {
                memcpy(h->data + off[k], copy[k], len[k]);
                persist_flush(h, h->data + off[k], len[k]);
                state_note(h, "'%.63s' bytes %lu..%lu: working data was damaged; restored from its checkpoint copy",
                           e->name, (unsigned long)at, (unsigned long)(at + len[k]));
            } else if (bad_work || ((flags & CKPT_SHADOW) && bad_copy)) {
                uint64_t file = (bad_work ? h->sb->off_data : h->sb->off_shadow[slot[k]]) + off[k];
                return hk_fail(EBADMSG, "%s: %s of '%.63s' (bytes %lu..%lu of the object, %lu..%lu of the file, "
                               "epoch %lu) is corrupt (checksum mismatch)%s", h->path,
                               bad_work ? "working data" : "checkpoint copy", e->name, (unsigned long)at,
                               (unsigned long)(at + len[k]), (unsigned long)file, (unsigned long)(file + len[k]),
                               (unsigned long)E, bad_work && bad_copy ? ", and so is its checkpoint copy" : "");
            }
            (*checked)++;
        }
    }
    return 0;
}

/* ckpt_scan -- check every unit of epoch E (after state_check): CKPT_SHADOW its checkpoint
 * copy, CKPT_WORKING its working data (a clean heap's equals its copy); CKPT_REPAIR puts an
 * intact copy back over damaged working data.  Names the object and the bytes. */
int ckpt_scan(hk_heap *h, uint64_t E, int flags, uint64_t *checked)
{
    atomic_store(&h->prog_done, 0);
    atomic_store(&h->prog_total, heap_hwm(h));
    for (uint64_t i = 0, hwm = heap_hwm(h); i < hwm; i++) {
        atomic_store(&h->prog_done, i);
        int rc = state_alive_at(&h->cat[i], E) ? ckpt_scan_entry(h, &h->cat[i], E, flags, checked) : 0;
        if (rc)
            return rc;
    }
    return flags & CKPT_REPAIR ? persist_drain(h) : 0;
}

/* ckpt_verify -- check the committed epoch: catalog and tags against its record, every
 * checkpoint copy, and (a cleanly closed heap) the working data against its copies. */
int ckpt_verify(hk_heap *h, uint64_t *checked)
{
    *checked = 0;
    if (h->closed)
        return hk_fail(EBADF, "%s: heap is closed", h->path);
    int rc = state_check(h, h->committed);
    return rc ? rc : ckpt_scan(h, h->committed, CKPT_SHADOW | (h->was_clean ? CKPT_WORKING : 0), checked);
}

/* ckpt_seal -- at a clean close, whatever changed since the last checkpoint becomes a local
 * epoch that keeps the last metadata, so the working data a clean reopen keeps is
 * checkpointed and checked like any epoch.  Nothing changed: no new epoch. */
int ckpt_seal(hk_heap *h)
{
    h->keep_delta = 0;   /* no partner takes a close's epoch */
    if (h->prepared != h->committed)
        return hk_fail(EALREADY, "%s: epoch %lu is prepared but neither committed nor withdrawn", h->path,
                       (unsigned long)h->prepared);
    memset(&h->stats, 0, sizeof h->stats);
    double t0 = persist_now();
    int rc = ckpt_collect(h, 1);
    if (rc || (h->work.n == 0 && h->touched.n == 0 && h->pending.n == 0))
        return rc;
    const struct hk_record *r = state_record(h, h->committed);
    char meta[HK_META_MAX];
    uint32_t len = r ? r->meta_len : 0;
    if (r)
        memcpy(meta, r->meta, len);
    uint64_t n = h->committed + 1, e;
    h->stats.epoch = n;
    if (n >= 0x7fffffffu)
        return hk_fail(EOVERFLOW, "%s: epoch counter exhausted", h->path);
    rc = ckpt_finish(h, n, meta, len, t0, &e);
    return rc ? rc : ckpt_commit(h);
}

/* ckpt_set_crash -- arm the test hook: SIGKILL ourselves at `point` (of epoch, or any if 0). */
void ckpt_set_crash(hk_heap *h, int point, uint64_t epoch)
{
    h->crash_point = point;
    h->crash_epoch = epoch;
}

/* ckpt_set_nvm -- model NVM writes at `write_gbps` GB/s plus a latency per flushed unit. */
void ckpt_set_nvm(hk_heap *h, double write_gbps, double flush_latency_ns)
{
    h->nvm_gbps = write_gbps;
    h->nvm_lat_ns = flush_latency_ns;
}

/* ckpt_set_threads -- threads one checkpoint may copy on. */
void ckpt_set_threads(hk_heap *h, int threads)
{
    h->threads = threads < 1 ? 1 : threads > PAR_MAX ? PAR_MAX : threads;
}

/* ckpt_read_epoch -- copy units [u0, u1) of entry `index` as committed at epoch E into dst,
 * packed as in the object (dst[0] is the first byte of unit u0), each unit checked against
 * the CRC of its shadow slot; *crc (if not NULL) gets the CRC32C of all the bytes copied,
 * combined from the unit CRCs.  The slots of E stay untouched until epoch E+2 prepares, so
 * this may run beside the owner (peek handle) while it computes. */
int ckpt_read_epoch(hk_heap *h, uint64_t index, uint64_t E, uint64_t u0, uint64_t u1, void *dst, size_t dst_len,
                    uint32_t *crc)
{
    if (h->closed)
        return hk_fail(EBADF, "%s: heap is closed", h->path);
    if (index >= heap_hwm(h) || index >= h->sb->max_entries)
        return hk_fail(ENOENT, "%s: no object at catalog index %lu", h->path, (unsigned long)index);
    struct hk_entry *e = &h->cat[index];
    uint32_t born = HK_EPOCH_BORN(e->epochs), dead = HK_EPOCH_DEAD(e->epochs);
    if (e->kind == HK_KIND_FREE || born == 0 || born > E || (dead && dead <= E))
        return hk_fail(ENOENT, "%s: catalog entry %lu is not an object of epoch %lu", h->path,
                       (unsigned long)index, (unsigned long)E);
    if (e->crc != heap_entry_crc(e))
        return hk_fail(EBADMSG, "%s: catalog entry %lu is corrupt (checksum mismatch)", h->path,
                       (unsigned long)index);
    uint64_t bytes, units = heap_units(e);
    if (__builtin_mul_overflow(e->count, e->obj_size, &bytes) || bytes > h->sb->capacity || u0 > u1 || u1 > units)
        return hk_fail(EINVAL, "%s: '%.63s' has %lu units, cannot read units %lu..%lu", h->path, e->name,
                       (unsigned long)units, (unsigned long)u0, (unsigned long)u1);
    uint64_t base = 0;
    uint32_t all = 0, xlen = 0, xpow = 0;   /* x^(8 len) of the last unit length seen */
    for (uint64_t u = u0; u < u1; u++) {
        struct hk_tag *t = heap_tag(h, e, u);
        uint32_t l = __atomic_load_n(&t->latest, __ATOMIC_ACQUIRE);
        uint32_t slot = tag_slot_at(l, E);
        if (l == 0)
            return hk_fail(EBADMSG, "%s: object '%.63s' (unit %lu) has no checkpoint copy", h->path, e->name,
                           (unsigned long)u);
        uint64_t off, at = ckpt_unit_at(e, u);
        uint32_t len;
        heap_unit_place(h, e, u, &off, &len);
        if (u == u0)
            base = at;
        if (off + len > h->sb->capacity || at + len > bytes)
            return hk_fail(EBADMSG, "%s: '%.63s' (unit %lu) lies outside the heap", h->path, e->name,
                           (unsigned long)u);
        if (at - base + len > dst_len)
            return hk_fail(EINVAL, "buffer of %zu bytes is too small for units %lu..%lu of '%.63s'", dst_len,
                           (unsigned long)u0, (unsigned long)u1, e->name);
        at -= base;
        const uint8_t *src = h->raw + h->sb->off_shadow[slot] + off;
        memcpy((uint8_t *)dst + at, src, len);
        uint32_t c = crc_compute(0, (uint8_t *)dst + at, len);
        if (c != t->crc[slot])
            return hk_fail(EBADMSG, "%s: checkpoint copy of '%.63s' (unit %lu, epoch <= %lu) is corrupt "
                           "(checksum mismatch)", h->path, e->name, (unsigned long)u, (unsigned long)E);
        if (len != xlen)
            xpow = crc_xpow(xlen = len);
        all = u == u0 ? c : crc_append(all, c, xpow);
    }
    if (crc)
        *crc = all;
    return 0;
}

/* ckpt_rebase -- a heap that never prepared an epoch continues at E: next prepare is E+1. */
int ckpt_rebase(hk_heap *h, uint64_t E)
{
    if (h->closed || h->readonly)
        return hk_fail(h->closed ? EBADF : EROFS, "%s: heap is %s", h->path, h->closed ? "closed" : "read-only");
    if (h->prepared || h->committed || E >= 0x7ffffffeu)
        return hk_fail(EINVAL, "%s: only a fresh heap can be rebased (it is at epoch %lu)", h->path,
                       (unsigned long)h->prepared);
    h->prepared = h->committed = E;
    h->good_epoch = (int64_t)E;
    h->digest = h->units = 0;
    for (size_t i = 0; i < h->fresh.n; i++)   /* objects made before: born in the first epoch after E */
        __atomic_store_n(&h->cat[h->fresh.v[i]].epochs, HK_EPOCHS(E + 1, 0), __ATOMIC_RELEASE);
    return 0;
}
