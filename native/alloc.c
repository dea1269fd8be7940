/* alloc.c -- the allocator, all in DRAM and rebuilt from the catalog at open: runs of
 * whole pages (next fit), slots of shared small-class pages (a stack of pages with a free
 * slot per class), tag runs.  Free space is always zero: it is wiped when it is released,
 * so allocation never clears memory.  Nothing here is flushed per allocation. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "internal.h"


/* alloc_slot_mask -- the mask of slots 0..n-1 of a page (n <= 64). */
static uint64_t alloc_slot_mask(uint64_t n)
{
    return n >= 64 ? ~0ull : (1ull << n) - 1;
}

/* alloc_span_add -- widen a class's span to include pages [first, first+n). */
static void alloc_span_add(hk_heap *h, unsigned cls, uint64_t first, uint64_t n)
{
    if (cls >= HK_NCLASSES)
        return;
    if (first < h->span_lo[cls])
        h->span_lo[cls] = first;
    if (first + n > h->span_hi[cls])
        h->span_hi[cls] = first + n;
}

/* alloc_pages -- next-fit run of n free pages; returns the first or -1. */
static int64_t alloc_pages(hk_heap *h, uint64_t n, uint8_t cls, uint32_t owner)
{
    uint64_t np = h->sb->npages, start = h->page_cursor, run = 0, p = start;
    if (n == 0 || n > np)
        return -1;
    for (uint64_t scanned = 0; scanned < np + n; scanned++, p++) {
        if (p == np) {
            p = 0;
            run = 0;
        }
        run = h->pcls[p] == HK_PAGE_FREE ? run + 1 : 0;
        if (run == n) {
            uint64_t first = p + 1 - n;
            memset(h->pcls + first, cls, n);
            for (uint64_t q = first; q <= p; q++) {
                h->powner[q] = owner;
                h->pmask[q] = 0;
            }
            h->page_cursor = (p + 1) % np;
            h->pages_used += n;
            h->layout_gen++;
            alloc_span_add(h, cls, first, n);
            return (int64_t)first;
        }
    }
    return -1;
}

/* alloc_pages_free -- return a run of pages. */
static void alloc_pages_free(hk_heap *h, uint64_t first, uint64_t n)
{
    memset(h->pcls + first, HK_PAGE_FREE, n);
    h->pages_used -= n;
    h->layout_gen++;
}

/* alloc_zero -- zero a data range: punch whole pages out of the file, memset the rest. */
static void alloc_zero(hk_heap *h, uint64_t off, uint64_t len)
{
    if (!(h->sb->flags & HK_FLAG_PREALLOCATED) && len >= HK_PAGE && off % HK_PAGE == 0 && len % HK_PAGE == 0 &&
        fallocate(h->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(h->sb->off_data + off),
                  (off_t)len) == 0)
        return;
    memset(h->data + off, 0, len);
    persist_flush(h, h->data + off, len);
}

/* alloc_nonzero -- does [p, p+len) hold a byte that is not zero? */
static int alloc_nonzero(const uint8_t *p, uint64_t len)
{
    for (; len && ((uintptr_t)p & 7); len--)
        if (*p++)
            return 1;
    const uint64_t *w = (const uint64_t *)p;
    for (; len >= 64; len -= 64, w += 8)
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
            return 1;
    for (p = (const uint8_t *)w; len; len--)
        if (*p++)
            return 1;
    return 0;
}

/* alloc_check_zero -- is a data range about to be handed out zero, as free space must be?
 * If not, clear it and note the repair.  Holes of a sparse file are zero: only data is read. */
int alloc_check_zero(hk_heap *h, uint64_t off, uint64_t len)
{
    uint64_t end = off + len, at = off, base = h->sb->off_data;
    int sparse = !(h->sb->flags & HK_FLAG_PREALLOCATED) && len >= HK_PAGE, found = 0;
    while (at < end) {
        uint64_t lo = at, hi = end;
        if (sparse) {
            off_t d = lseek(h->fd, (off_t)(base + at), SEEK_DATA), x;
            if (d < 0 && errno == ENXIO)
                break;   /* nothing but holes from here on */
            if (d >= 0) {
                lo = (uint64_t)d - base;
                x = lseek(h->fd, d, SEEK_HOLE);
                hi = x < 0 || (uint64_t)x - base > end ? end : (uint64_t)x - base;
            }
            if (lo >= end)
                break;
        }
        if (alloc_nonzero(h->data + lo, hi - lo)) {
            memset(h->data + lo, 0, hi - lo);
            persist_flush(h, h->data + lo, hi - lo);
            found = 1;
        }
        at = hi;
    }
    if (found)
        state_note(h, "free space at data bytes %lu..%lu was not zero; cleared before reuse", (unsigned long)off,
                   (unsigned long)end);
    return found;
}

/* alloc_row_new -- a 64-entry slot-owner row for a shared small page. */
static int64_t alloc_row_new(hk_heap *h)
{
    if (h->free_rows.n)
        return h->free_rows.v[--h->free_rows.n];
    if (h->slot_rows == h->slot_rows_cap) {
        size_t cap = h->slot_rows_cap ? h->slot_rows_cap * 2 : 1024;
        uint32_t *p = realloc(h->slotowner, cap * 64 * sizeof *p);
        if (!p)
            return -1;
        h->slotowner = p;
        h->slot_rows_cap = cap;
    }
    return (int64_t)h->slot_rows++;
}

/* alloc_slot -- a free slot of class c on a shared page. */
static int alloc_slot(hk_heap *h, unsigned c, uint32_t idx, uint64_t *page, uint32_t *slot)
{
    uint32_t k = HK_PAGE / heap_class_size[c];
    uint64_t full = alloc_slot_mask(k);
    struct u32vec *pv = &h->partial[c];
    while (pv->n) {   /* drop pages that filled up or were given back since they were listed */
        uint64_t q = pv->v[pv->n - 1];
        if (h->pcls[q] == c && (h->powner[q] & HK_ROW_FLAG) && h->pmask[q] != full)
            break;
        pv->n--;
    }
    if (pv->n == 0) {
        int64_t row = alloc_row_new(h);
        int64_t p = row < 0 ? -1 : alloc_pages(h, 1, (uint8_t)c, HK_ROW_FLAG | (uint32_t)row);
        if (p < 0) {
            if (row >= 0)
                vec_push32(&h->free_rows, (uint32_t)row);
            return -ENOSPC;
        }
        int rc = vec_push32(pv, (uint32_t)p);
        if (rc)
            return rc;
    }
    uint64_t p = pv->v[pv->n - 1];
    uint32_t j = (uint32_t)__builtin_ctzll(~h->pmask[p]);
    h->pmask[p] |= 1ull << j;
    if (h->pmask[p] == full)
        pv->n--;
    h->slotowner[(size_t)(h->powner[p] & ~HK_ROW_FLAG) * 64 + j] = idx;
    *page = p;
    *slot = j;
    return 0;
}

/* alloc_slot_free -- give a shared slot back to its class; an empty page goes back to the
 * page pool (its stale entries in the partial list are skipped by alloc_slot). */
static void alloc_slot_free(hk_heap *h, uint64_t p, uint32_t j)
{
    unsigned c = h->pcls[p];
    uint64_t full = alloc_slot_mask(HK_PAGE / heap_class_size[c]);
    if (h->pmask[p] == full)
        vec_push32(&h->partial[c], (uint32_t)p);
    h->pmask[p] &= ~(1ull << j);
    if (h->pmask[p] == 0) {
        vec_push32(&h->free_rows, h->powner[p] & ~HK_ROW_FLAG);
        alloc_pages_free(h, p, 1);
    }
}

/* alloc_space_free -- return the pages or slot and the tag run of an entry to the allocator. */
void alloc_space_free(hk_heap *h, struct hk_entry *e)
{
    if (e->npages)
        alloc_pages_free(h, e->first_page, e->npages);
    else
        alloc_slot_free(h, e->first_page, e->slot);
    if (heap_units(e) > 1)
        alloc_pages_free(h, e->tag_page, (heap_units(e) * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE);
}

/* alloc_wipe -- invalidate an entry (one atomic store), zero its data and tag run, then
 * clear the entry.  Free space and free entries are always zero, so allocation never has
 * to clear anything.  A crash part way leaves an invalid or torn entry, which the next
 * open clears and follows with a sweep of all free space.  Returns -1 when the entry
 * points outside the heap (then only the entry is cleared). */
int alloc_wipe(hk_heap *h, struct hk_entry *e)
{
    __atomic_store_n(&e->epochs, 0, __ATOMIC_RELEASE);
    persist_flush(h, e, 8);
    uint64_t np = h->sb->npages, units = heap_units(e);
    uint64_t tp = (units * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE;
    int ok = e->cls <= HK_PAGE_CLASS && e->first_page < np && e->npages <= np - e->first_page &&
             (units <= 1 || (e->tag_page < np && tp <= np - e->tag_page));
    if (ok && e->npages)
        alloc_zero(h, e->first_page * HK_PAGE, e->npages * HK_PAGE);
    else if (ok && e->cls < HK_PAGE_CLASS && e->slot < HK_PAGE / heap_class_size[e->cls])
        alloc_zero(h, e->first_page * HK_PAGE + (uint64_t)e->slot * heap_class_size[e->cls],
                  heap_class_size[e->cls]);
    if (ok && units > 1)
        alloc_zero(h, e->tag_page * HK_PAGE, tp * HK_PAGE);
    memset(e, 0, sizeof *e);
    persist_flush(h, e, sizeof *e);
    return ok ? 0 : -1;
}

/* alloc_space -- claim pages or a slot, and a tag run, for a new entry (DRAM only). */
int alloc_space(hk_heap *h, uint32_t idx, unsigned cls, uint64_t count, uint64_t npages, uint64_t units,
                            int64_t *first, uint32_t *slot, int64_t *tags)
{
    *tags = 0;
    if (npages && cls == HK_PAGE_CLASS) {
        *first = alloc_pages(h, npages, HK_PAGE_CLASS, idx);
        for (uint64_t i = 0; *first >= 0 && i < npages; i++)
            h->pmask[*first + i] = 1;   /* one unit per page: slot 0 */
    } else if (npages) {
        uint32_t k = HK_PAGE / heap_class_size[cls];
        *first = alloc_pages(h, npages, (uint8_t)cls, idx);
        for (uint64_t i = 0; *first >= 0 && i < npages; i++)
            h->pmask[*first + i] = alloc_slot_mask(count - i * k < k ? count - i * k : k);
    } else {
        uint64_t page;
        int rc = alloc_slot(h, cls, idx, &page, slot);
        if (rc && rc != -ENOSPC)
            return rc;
        *first = rc ? -1 : (int64_t)page;
    }
    if (*first < 0)
        return -ENOSPC;
    if (units > 1) {
        *tags = alloc_pages(h, (units * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE, HK_PAGE_TAGS, idx);
        if (*tags < 0) {
            if (npages)
                alloc_pages_free(h, (uint64_t)*first, npages);
            else
                alloc_slot_free(h, (uint64_t)*first, *slot);
            return -ENOSPC;
        }
    }
    return 0;
}

/* alloc_mark -- claim an existing entry's space while rebuilding; refuses overlaps. */
static int alloc_mark(hk_heap *h, uint32_t idx)
{
    struct hk_entry *e = &h->cat[idx];
    uint64_t units = heap_units(e);
    if (!heap_entry_sane(h, e))
        return hk_fail(EBADMSG, "%s: catalog entry %u ('%.63s') points outside the heap", h->path, idx, e->name);
    if (e->npages) {
        for (uint64_t p = e->first_page; p < e->first_page + e->npages; p++)
            if (h->pcls[p] != HK_PAGE_FREE)
                return hk_fail(EBADMSG, "%s: catalog entry %u ('%.63s') overlaps another object", h->path, idx,
                               e->name);
        memset(h->pcls + e->first_page, e->cls, e->npages);
        alloc_span_add(h, e->cls, e->first_page, e->npages);
        uint32_t k = HK_PAGE / heap_class_size[e->cls];
        for (uint64_t i = 0; i < e->npages; i++) {
            uint64_t left = e->cls == HK_PAGE_CLASS ? 1 : e->count - i * k;
            h->powner[e->first_page + i] = idx;
            h->pmask[e->first_page + i] = alloc_slot_mask(left < k ? left : k);
        }
        h->pages_used += e->npages;
    } else {
        uint64_t p = e->first_page;
        uint32_t k = HK_PAGE / heap_class_size[e->cls];
        if (e->cls == HK_PAGE_CLASS || e->slot >= k || (h->pcls[p] != HK_PAGE_FREE && h->pcls[p] != e->cls) ||
            (h->pcls[p] == e->cls && (!(h->powner[p] & HK_ROW_FLAG) || (h->pmask[p] >> e->slot) & 1)))
            return hk_fail(EBADMSG, "%s: catalog entry %u ('%.63s') has a bad slot", h->path, idx, e->name);
        if (h->pcls[p] == HK_PAGE_FREE) {
            alloc_span_add(h, e->cls, p, 1);
            int64_t row = alloc_row_new(h);
            if (row < 0)
                return hk_fail(ENOMEM, "out of memory rebuilding the allocator");
            h->pcls[p] = e->cls;
            h->powner[p] = HK_ROW_FLAG | (uint32_t)row;
            h->pmask[p] = 0;
            h->pages_used++;
        }
        h->pmask[p] |= 1ull << e->slot;
        h->slotowner[(size_t)(h->powner[p] & ~HK_ROW_FLAG) * 64 + e->slot] = idx;
    }
    if (units > 1) {
        uint64_t tp = (units * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE;
        for (uint64_t p = e->tag_page; p < e->tag_page + tp; p++) {
            if (h->pcls[p] != HK_PAGE_FREE)
                return hk_fail(EBADMSG, "%s: catalog entry %u ('%.63s') tag run overlaps", h->path, idx, e->name);
            h->pcls[p] = HK_PAGE_TAGS;
            h->powner[p] = idx;
        }
        h->pages_used += tp;
    }
    return 0;
}

/* alloc_entry_is_zero -- is a free catalog entry all zero, as allocation expects? */
int alloc_entry_is_zero(const struct hk_entry *e)
{
    const uint64_t *w = (const uint64_t *)e;
    for (size_t i = 0; i < sizeof *e / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

/* alloc_sweep -- zero all free space (after damage: the slow path that restores the invariant). */
static void alloc_sweep(hk_heap *h)
{
    for (uint64_t p = 0; p < h->sb->npages; p++) {
        unsigned c = h->pcls[p];
        if (c == HK_PAGE_FREE) {
            uint64_t q = p;
            while (q < h->sb->npages && h->pcls[q] == HK_PAGE_FREE)
                q++;
            alloc_zero(h, p * HK_PAGE, (q - p) * HK_PAGE);
            p = q - 1;
        } else if (c < HK_PAGE_CLASS && (h->powner[p] & HK_ROW_FLAG)) {
            uint32_t s = heap_class_size[c];
            for (uint32_t j = 0; j < HK_PAGE / s; j++)
                if (!((h->pmask[p] >> j) & 1))
                    alloc_zero(h, p * HK_PAGE + (uint64_t)j * s, s);
        }
    }
}

/* alloc_rebuild -- rebuild the DRAM allocator from the catalog.  A death in the
 * newest epoch stays pending: under MPI the job may restart one epoch earlier. */
int alloc_rebuild(hk_heap *h)
{
    uint64_t np = h->sb->npages;
    memset(h->pcls, HK_PAGE_FREE, np);
    h->pages_used = 0;
    h->layout_gen++;
    if (h->putonly)   /* the program's promises were about the objects before this rebuild */
        memset(h->putonly, 0, h->sb->max_entries);
    h->slot_rows = 0;
    h->entries_live = 0;
    for (unsigned c = 0; c < HK_NCLASSES; c++) {
        h->span_lo[c] = UINT64_MAX;
        h->span_hi[c] = 0;
    }
    h->free_entries.n = h->pending.n = h->fresh.n = h->free_rows.n = 0;
    for (size_t i = 0; i < h->dpages.n; i++)
        h->dmask[h->dpages.v[i]] = 0;
    h->dpages.n = 0;
    for (unsigned c = 0; c < HK_PAGE_CLASS; c++)
        h->partial[c].n = 0;
    if (heap_hwm(h) > h->sb->max_entries)
        return hk_fail(EBADMSG, "%s: catalog high-water mark %lu exceeds its size %lu", h->path,
                       (unsigned long)heap_hwm(h), (unsigned long)h->sb->max_entries);
    int rc, sweep = 0;
    for (uint64_t i = heap_hwm(h); i-- > 0;) {
        struct hk_entry *e = &h->cat[i];
        uint32_t born = HK_EPOCH_BORN(e->epochs), dead = HK_EPOCH_DEAD(e->epochs);
        int bad = e->kind > HK_KIND_MAX || (e->kind != HK_KIND_FREE && heap_entry_crc(e) != e->crc);
        if (bad && born <= h->prepared && born != 0 && !(dead && dead <= h->prepared))
            return hk_fail(EBADMSG, "%s: catalog entry %lu is corrupt (checksum mismatch)", h->path,
                           (unsigned long)i);
        if (bad || e->kind == HK_KIND_FREE || born == 0 || (dead && dead < h->committed)) {
            /* empty, an allocation cut short, a wipe cut short (torn, dead), uncommitted
             * damage, or death committed: reusable.  Only a valid entry's fields say where
             * its space is; otherwise sweep all free space. */
            if (!h->readonly && !bad && born && e->kind != HK_KIND_FREE)
                sweep |= alloc_wipe(h, e) != 0;
            else if (!h->readonly && !alloc_entry_is_zero(e)) {
                memset(e, 0, sizeof *e);
                sweep = 1;
            }
            if ((rc = vec_push32(&h->free_entries, (uint32_t)i)))
                return rc;
            continue;
        }
        if ((rc = alloc_mark(h, (uint32_t)i)))
            return rc;
        if (dead)
            rc = vec_push32(&h->pending, (uint32_t)i);
        else
            h->entries_live++;
        if (!rc && born > h->committed)
            rc = vec_push32(&h->fresh, (uint32_t)i);
        if (rc)
            return rc;
    }
    for (uint64_t p = np; p-- > 0;) {
        unsigned c = h->pcls[p];
        if (c < HK_PAGE_CLASS && (h->powner[p] & HK_ROW_FLAG)) {
            uint32_t k = HK_PAGE / heap_class_size[c];
            if (h->pmask[p] != alloc_slot_mask(k) && (rc = vec_push32(&h->partial[c], (uint32_t)p)))
                return rc;
        }
    }
    h->page_cursor = 0;
    if (sweep)
        alloc_sweep(h);
    return 0;
}

/* alloc_dram -- the allocator's DRAM arrays. */
int alloc_dram(hk_heap *h)
{
    uint64_t np = h->sb->npages;
    h->pcls = malloc(np);
    h->pmask = malloc(np * sizeof *h->pmask);
    h->powner = malloc(np * sizeof *h->powner);
    h->dmask = calloc(np, sizeof *h->dmask);
    if (!h->pcls || !h->pmask || !h->powner || !h->dmask)
        return hk_fail(ENOMEM, "out of memory for the allocator of %lu pages", (unsigned long)np);
    return 0;
}

/* alloc_free_dram -- free everything heap_open allocated in DRAM. */
void alloc_free_dram(hk_heap *h)
{
    free(h->pcls);
    free(h->pmask);
    free(h->powner);
    free(h->slotowner);
    free(h->free_rows.v);
    for (unsigned c = 0; c < HK_PAGE_CLASS; c++)
        free(h->partial[c].v);
    free(h->free_entries.v);
    free(h->pending.v);
    free(h->fresh.v);
    free(h->touched.v);
    free(h->exposed.v);
    free(h->putonly);
    free(h->dmask);
    free(h->dpages.v);
    free(h->sift.v);
    free(h->work.v);
    free(h->delta);
    persist_free_cold(h);
}

