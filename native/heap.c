/* heap.c -- the heap file (create, open, close), the catalog, and the
 * allocator.  The allocator lives in DRAM and is rebuilt from the catalog at
 * open; nothing is flushed per allocation: the catalog is made durable by the
 * next checkpoint (ckpt.c) or a clean close. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "internal.h"

#define ROW_FLAG 0x80000000u

const uint32_t heap_class_size[HK_NCLASSES] = {64, 128, 256, 512, 1024, 2048, 4096};

/* vec_push32 -- append to a growable u32 vector. */
int vec_push32(struct u32vec *v, uint32_t x)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 256;
        uint32_t *p = realloc(v->v, cap * sizeof *p);
        if (!p)
            return hk_fail(ENOMEM, "out of memory growing a list to %zu entries", cap);
        v->v = p;
        v->cap = cap;
    }
    v->v[v->n++] = x;
    return 0;
}

/* vec_push_unit -- append to a growable unit vector. */
int vec_push_unit(struct unitvec *v, const struct unit *u)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 1024;
        struct unit *p = realloc(v->v, cap * sizeof *p);
        if (!p)
            return hk_fail(ENOMEM, "out of memory growing the dirty list to %zu units", cap);
        v->v = p;
        v->cap = cap;
    }
    v->v[v->n++] = *u;
    return 0;
}

/* heap_class_of -- the size class of an object of `size` bytes. */
static unsigned heap_class_of(uint64_t size)
{
    unsigned c = 0;
    while (c < HK_PAGE_CLASS && heap_class_size[c] < size)
        c++;
    return c;
}

static uint64_t pages_per_obj(const struct hk_entry *e)
{
    return e->obj_size ? (e->obj_size + HK_PAGE - 1) / HK_PAGE : 1;
}

/* slot_mask -- the mask of slots 0..n-1 of a page (n <= 64). */
static uint64_t slot_mask(uint64_t n)
{
    return n >= 64 ? ~0ull : (1ull << n) - 1;
}

/* heap_units -- how many units an entry has: objects (small), pages (large). */
uint64_t heap_units(const struct hk_entry *e)
{
    if (e->cls == HK_PAGE_CLASS)
        return e->npages;
    return e->npages ? e->count : 1;
}

/* heap_unit_place -- data-area offset and byte length of unit u of entry e. */
void heap_unit_place(const hk_heap *h, const struct hk_entry *e, uint64_t u, uint64_t *off, uint32_t *len)
{
    (void)h;
    if (e->cls == HK_PAGE_CLASS) {
        uint64_t ppo = pages_per_obj(e), q = u % ppo, rest = e->obj_size - q * HK_PAGE;
        *off = (e->first_page + u) * HK_PAGE;
        *len = (uint32_t)(rest < HK_PAGE ? rest : HK_PAGE);
        return;
    }
    uint32_t s = heap_class_size[e->cls], k = HK_PAGE / s;
    uint64_t p = e->npages ? e->first_page + u / k : e->first_page;
    uint32_t j = e->npages ? (uint32_t)(u % k) : e->slot;
    *off = p * HK_PAGE + (uint64_t)j * s;
    *len = (uint32_t)e->obj_size;
}

/* heap_tag -- the tag of unit u: inline for single-unit objects, else in the tag run. */
struct hk_tag *heap_tag(hk_heap *h, struct hk_entry *e, uint64_t u)
{
    if (heap_units(e) == 1)
        return &e->tag;
    return (struct hk_tag *)(h->data + e->tag_page * HK_PAGE) + u;
}

/* heap_entry_crc -- checksum of an entry's immutable fields. */
uint32_t heap_entry_crc(const struct hk_entry *e)
{
    uint32_t c = crc_compute(0, &e->kind, offsetof(struct hk_entry, tag) - offsetof(struct hk_entry, kind));
    return crc_compute(c, e->dtype, e->dtype_len < HK_DTYPE_MAX ? e->dtype_len : HK_DTYPE_MAX);
}

/* heap_span_add -- widen a class's span to include pages [first, first+n). */
static void heap_span_add(hk_heap *h, unsigned cls, uint64_t first, uint64_t n)
{
    if (cls >= HK_NCLASSES)
        return;
    if (first < h->span_lo[cls])
        h->span_lo[cls] = first;
    if (first + n > h->span_hi[cls])
        h->span_hi[cls] = first + n;
}

/* heap_pages_alloc -- next-fit run of n free pages; returns the first or -1. */
static int64_t heap_pages_alloc(hk_heap *h, uint64_t n, uint8_t cls, uint32_t owner)
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
            heap_span_add(h, cls, first, n);
            return (int64_t)first;
        }
    }
    return -1;
}

/* heap_pages_free -- return a run of pages. */
static void heap_pages_free(hk_heap *h, uint64_t first, uint64_t n)
{
    memset(h->pcls + first, HK_PAGE_FREE, n);
    h->pages_used -= n;
}

/* heap_zero -- zero a data range: punch whole pages out of the file, memset the rest. */
void heap_zero(hk_heap *h, uint64_t off, uint64_t len)
{
    if (!(h->sb->flags & HK_FLAG_PREALLOCATED) && len >= HK_PAGE && off % HK_PAGE == 0 && len % HK_PAGE == 0 &&
        fallocate(h->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(h->sb->off_data + off),
                  (off_t)len) == 0)
        return;
    memset(h->data + off, 0, len);
    pmem_flush(h, h->data + off, len);
}

/* heap_row_new -- a 64-entry slot-owner row for a shared small page. */
static int64_t heap_row_new(hk_heap *h)
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

/* heap_slot_alloc -- a free slot of class c on a shared page. */
static int heap_slot_alloc(hk_heap *h, unsigned c, uint32_t idx, uint64_t *page, uint32_t *slot)
{
    uint32_t k = HK_PAGE / heap_class_size[c];
    uint64_t full = slot_mask(k);
    struct u32vec *pv = &h->partial[c];
    while (pv->n) {   /* drop pages that filled up or were given back since they were listed */
        uint64_t q = pv->v[pv->n - 1];
        if (h->pcls[q] == c && (h->powner[q] & ROW_FLAG) && h->pmask[q] != full)
            break;
        pv->n--;
    }
    if (pv->n == 0) {
        int64_t row = heap_row_new(h);
        int64_t p = row < 0 ? -1 : heap_pages_alloc(h, 1, (uint8_t)c, ROW_FLAG | (uint32_t)row);
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
    h->slotowner[(size_t)(h->powner[p] & ~ROW_FLAG) * 64 + j] = idx;
    *page = p;
    *slot = j;
    return 0;
}

/* heap_slot_free -- give a shared slot back to its class; an empty page goes back to the
 * page pool (its stale entries in the partial list are skipped by heap_slot_alloc). */
static void heap_slot_free(hk_heap *h, uint64_t p, uint32_t j)
{
    unsigned c = h->pcls[p];
    uint64_t full = slot_mask(HK_PAGE / heap_class_size[c]);
    if (h->pmask[p] == full)
        vec_push32(&h->partial[c], (uint32_t)p);
    h->pmask[p] &= ~(1ull << j);
    if (h->pmask[p] == 0) {
        vec_push32(&h->free_rows, h->powner[p] & ~ROW_FLAG);
        heap_pages_free(h, p, 1);
    }
}

/* heap_space_free -- return the pages or slot and the tag run of an entry to the allocator. */
static void heap_space_free(hk_heap *h, struct hk_entry *e)
{
    if (e->npages)
        heap_pages_free(h, e->first_page, e->npages);
    else
        heap_slot_free(h, e->first_page, e->slot);
    if (heap_units(e) > 1)
        heap_pages_free(h, e->tag_page, (heap_units(e) * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE);
}

/* heap_wipe -- invalidate an entry (one atomic store), zero its data and tag run, then
 * clear the entry.  Free space and free entries are always zero, so allocation never has
 * to clear anything.  A crash part way leaves an invalid or torn entry, which the next
 * open clears and follows with a sweep of all free space.  Returns -1 when the entry
 * points outside the heap (then only the entry is cleared). */
int heap_wipe(hk_heap *h, struct hk_entry *e)
{
    __atomic_store_n(&e->epochs, 0, __ATOMIC_RELEASE);
    pmem_flush(h, e, 8);
    uint64_t np = h->sb->npages, units = heap_units(e);
    uint64_t tp = (units * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE;
    int ok = e->cls <= HK_PAGE_CLASS && e->first_page < np && e->npages <= np - e->first_page &&
             (units <= 1 || (e->tag_page < np && tp <= np - e->tag_page));
    if (ok && e->npages)
        heap_zero(h, e->first_page * HK_PAGE, e->npages * HK_PAGE);
    else if (ok && e->cls < HK_PAGE_CLASS && e->slot < HK_PAGE / heap_class_size[e->cls])
        heap_zero(h, e->first_page * HK_PAGE + (uint64_t)e->slot * heap_class_size[e->cls],
                  heap_class_size[e->cls]);
    if (ok && units > 1)
        heap_zero(h, e->tag_page * HK_PAGE, tp * HK_PAGE);
    memset(e, 0, sizeof *e);
    pmem_flush(h, e, sizeof *e);
    return ok ? 0 : -1;
}

/* heap_release_entry -- forget an entry for good: space and catalog slot become reusable. */
void heap_release_entry(hk_heap *h, uint32_t idx)
{
    struct hk_entry *e = &h->cat[idx];
    heap_space_free(h, e);
    heap_wipe(h, e);
    vec_push32(&h->free_entries, idx);
    vec_push32(&h->touched, idx);
    h->entries_live--;
}

/* heap_alloc_space -- claim pages or a slot, and a tag run, for a new entry (DRAM only). */
static int heap_alloc_space(hk_heap *h, uint32_t idx, unsigned cls, uint64_t count, uint64_t npages, uint64_t units,
                            int64_t *first, uint32_t *slot, int64_t *tags)
{
    *tags = 0;
    if (npages && cls == HK_PAGE_CLASS) {
        *first = heap_pages_alloc(h, npages, HK_PAGE_CLASS, idx);
        for (uint64_t i = 0; *first >= 0 && i < npages; i++)
            h->pmask[*first + i] = 1;   /* one unit per page: slot 0 */
    } else if (npages) {
        uint32_t k = HK_PAGE / heap_class_size[cls];
        *first = heap_pages_alloc(h, npages, (uint8_t)cls, idx);
        for (uint64_t i = 0; *first >= 0 && i < npages; i++)
            h->pmask[*first + i] = slot_mask(count - i * k < k ? count - i * k : k);
    } else {
        uint64_t page;
        int rc = heap_slot_alloc(h, cls, idx, &page, slot);
        if (rc && rc != -ENOSPC)
            return rc;
        *first = rc ? -1 : (int64_t)page;
    }
    if (*first < 0)
        return -ENOSPC;
    if (units > 1) {
        *tags = heap_pages_alloc(h, (units * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE, HK_PAGE_TAGS, idx);
        if (*tags < 0) {
            if (npages)
                heap_pages_free(h, (uint64_t)*first, npages);
            else
                heap_slot_free(h, (uint64_t)*first, *slot);
            return -ENOSPC;
        }
    }
    return 0;
}

/* heap_alloc -- create a catalog entry and its space.  The object is zero (free space
 * always is) and counts as dirty at the next checkpoint.  The entry is written only once
 * its space is secured, and becomes valid with the single store of its epochs. */
int heap_alloc(hk_heap *h, const struct hk_desc *d, uint64_t *index)
{
    if (h->closed || h->readonly)
        return hk_fail(h->closed ? EBADF : EROFS, "%s: heap is %s", h->path, h->closed ? "closed" : "read-only");
    if (h->prepared != h->committed)
        return hk_fail(EBUSY, "%s: epoch %lu is being checkpointed; allocate after it commits", h->path,
                       (unsigned long)h->prepared);
    size_t nl = strlen(d->name);
    if (nl == 0 || nl >= HK_NAME_MAX)
        return hk_fail(EINVAL, "name must be 1 to %d bytes, got %zu", HK_NAME_MAX - 1, nl);
    if (d->dtype_len >= HK_DTYPE_MAX)
        return hk_fail(EINVAL, "dtype description is %u bytes, at most %d fit", d->dtype_len, HK_DTYPE_MAX - 1);
    if (d->ndim > HK_NDIM_MAX)
        return hk_fail(EINVAL, "at most %d dimensions, got %u", HK_NDIM_MAX, d->ndim);
    unsigned cls = heap_class_of(d->obj_size);
    uint64_t count = d->count ? d->count : 1, bytes, npages = 0, units = 1;
    int pooled = d->kind == HK_KIND_POOL && count > 1;
    int too_big = __builtin_mul_overflow(count, d->obj_size, &bytes) || bytes > h->sb->capacity;
    if (!too_big && cls == HK_PAGE_CLASS)
        units = npages = count * ((d->obj_size + HK_PAGE - 1) / HK_PAGE);
    else if (!too_big && pooled)
        npages = (count + HK_PAGE / heap_class_size[cls] - 1) / (HK_PAGE / heap_class_size[cls]), units = count;
    if (too_big || npages > h->sb->npages)
        return hk_fail(ENOSPC, "%s: '%s' needs more than the heap's whole capacity (%lu objects of %lu bytes)",
                       h->path, d->name, (unsigned long)count, (unsigned long)d->obj_size);
    uint32_t idx;
    if (h->free_entries.n)
        idx = h->free_entries.v[--h->free_entries.n];
    else if (h->st->entries_hwm < h->sb->max_entries)
        idx = (uint32_t)h->st->entries_hwm++;
    else
        return hk_fail(ENOSPC, "%s: catalog full (%lu objects); create the heap with a larger max_objects",
                       h->path, (unsigned long)h->sb->max_entries);
    int64_t first, tags;
    uint32_t slot = 0;
    int rc = heap_alloc_space(h, idx, cls, count, npages, units, &first, &slot, &tags);
    if (rc) {
        vec_push32(&h->free_entries, idx);
        if (rc != -ENOSPC)
            return rc;
        return hk_fail(ENOSPC, "%s: out of space for '%s' (%lu bytes): %lu of %lu pages free; free objects "
                       "(del heap[name]) or create a larger heap", h->path, d->name, (unsigned long)bytes,
                       (unsigned long)(h->sb->npages - h->pages_used), (unsigned long)h->sb->npages);
    }
    struct hk_entry *e = &h->cat[idx];   /* free entries are all zero (heap_wipe) */
    e->kind = (uint16_t)d->kind;
    e->cls = (uint8_t)cls;
    e->ndim = (uint8_t)d->ndim;
    e->first_page = (uint64_t)first;
    e->npages = npages;
    e->count = count;
    e->obj_size = d->obj_size;
    e->tag_page = (uint64_t)tags;
    e->slot = slot;
    e->dtype_len = (uint16_t)d->dtype_len;
    memcpy(e->shape, d->shape, d->ndim * sizeof e->shape[0]);
    memcpy(e->name, d->name, nl);
    memcpy(e->dtype, d->dtype, d->dtype_len);
    e->crc = heap_entry_crc(e);
    if ((rc = vec_push32(&h->fresh, idx)) || (rc = vec_push32(&h->touched, idx))) {
        h->fresh.n -= h->fresh.n && h->fresh.v[h->fresh.n - 1] == idx;
        heap_space_free(h, e);
        memset(e, 0, sizeof *e);
        vec_push32(&h->free_entries, idx);
        return rc;
    }
    __atomic_store_n(&e->epochs, HK_EPOCHS(h->committed + 1, 0), __ATOMIC_RELEASE);
    h->entries_live++;
    *index = idx;
    return 0;
}

/* heap_free -- free an object.  Its space is reused once the free is committed. */
int heap_free(hk_heap *h, uint64_t index)
{
    if (h->closed || h->readonly)
        return hk_fail(h->closed ? EBADF : EROFS, "%s: heap is %s", h->path, h->closed ? "closed" : "read-only");
    if (h->prepared != h->committed)
        return hk_fail(EBUSY, "%s: epoch %lu is being checkpointed; free after it commits", h->path,
                       (unsigned long)h->prepared);
    if (index >= h->st->entries_hwm || h->cat[index].kind == HK_KIND_FREE ||
        HK_EPOCH_DEAD(h->cat[index].epochs))
        return hk_fail(ENOENT, "%s: no live object at catalog index %lu", h->path, (unsigned long)index);
    struct hk_entry *e = &h->cat[index];
    uint32_t born = HK_EPOCH_BORN(e->epochs);
    if (born > h->committed) {   /* never part of a committed epoch: gone at once */
        heap_release_entry(h, (uint32_t)index);
        return 0;
    }
    __atomic_store_n(&e->epochs, HK_EPOCHS(born, h->committed + 1), __ATOMIC_RELEASE);
    h->entries_live--;
    int rc = vec_push32(&h->pending, (uint32_t)index);
    return rc ? rc : vec_push32(&h->touched, (uint32_t)index);
}

/* heap_object_span -- data offset and units of object `obj` of a live entry. */
int heap_object_span(hk_heap *h, uint64_t index, uint64_t obj, uint64_t *off, uint64_t *first_unit,
                     uint64_t *units)
{
    struct hk_entry *e = &h->cat[index];
    if (obj >= e->count)
        return hk_fail(ERANGE, "'%.63s' has %lu objects; index %lu is out of range", e->name,
                       (unsigned long)e->count, (unsigned long)obj);
    uint32_t len;
    *units = e->cls == HK_PAGE_CLASS ? pages_per_obj(e) : 1;
    *first_unit = obj * *units;
    heap_unit_place(h, e, *first_unit, off, &len);
    return 0;
}

/* heap_read -- copy objects objs[0..n) of an entry into dst, packed. */
int heap_read(hk_heap *h, uint64_t index, const uint64_t *objs, size_t n, void *dst, size_t dst_len)
{
    if (h->closed || index >= h->st->entries_hwm || h->cat[index].kind == HK_KIND_FREE)
        return hk_fail(ENOENT, "%s: no live object at catalog index %lu", h->path, (unsigned long)index);
    uint64_t size = h->cat[index].obj_size, off, u, nu;
    if (dst_len / (size ? size : 1) < n)
        return hk_fail(EINVAL, "buffer of %zu bytes is too small for %zu objects of %lu bytes", dst_len, n,
                       (unsigned long)size);
    for (size_t i = 0; i < n; i++) {
        int rc = heap_object_span(h, index, objs[i], &off, &u, &nu);
        if (rc)
            return rc;
        memcpy((uint8_t *)dst + i * size, h->data + off, size);
    }
    return 0;
}

/* heap_lookup -- describe a live entry; name and dtype are copied into the caller's buffers. */
int heap_lookup(hk_heap *h, uint64_t index, struct hk_desc *d, char *name, char *dtype)
{
    if (h->closed)
        return hk_fail(EBADF, "%s: heap is closed", h->path);
    if (index >= h->st->entries_hwm || h->cat[index].kind == HK_KIND_FREE)
        return hk_fail(ENOENT, "no object at catalog index %lu", (unsigned long)index);
    const struct hk_entry *e = &h->cat[index];
    memcpy(name, e->name, HK_NAME_MAX);
    name[HK_NAME_MAX - 1] = 0;
    memcpy(dtype, e->dtype, e->dtype_len);
    dtype[e->dtype_len] = 0;
    d->name = name;
    d->dtype = dtype;
    d->dtype_len = e->dtype_len;
    d->ndim = e->ndim < HK_NDIM_MAX ? e->ndim : HK_NDIM_MAX;
    memcpy(d->shape, e->shape, sizeof d->shape);
    d->obj_size = e->obj_size;
    d->count = e->count;
    d->kind = e->kind;
    return 0;
}

/* heap_next_live -- first live entry at or after `from`, or -1. */
int64_t heap_next_live(hk_heap *h, uint64_t from)
{
    if (h->closed)
        return -1;
    for (uint64_t i = from; i < h->st->entries_hwm; i++)
        if (h->cat[i].kind != HK_KIND_FREE && !HK_EPOCH_DEAD(h->cat[i].epochs))
            return (int64_t)i;
    return -1;
}

/* heap_addr -- where object `obj` of entry `index` is seen by the program. */
void *heap_addr(hk_heap *h, uint64_t index, uint64_t obj)
{
    if (h->closed || index >= h->st->entries_hwm || h->cat[index].kind == HK_KIND_FREE ||
        obj >= h->cat[index].count)
        return NULL;
    struct hk_entry *e = &h->cat[index];
    uint64_t off;
    uint32_t len;
    if (e->cls == HK_PAGE_CLASS) {
        heap_unit_place(h, e, obj * pages_per_obj(e), &off, &len);
        return h->views + off;
    }
    heap_unit_place(h, e, obj, &off, &len);
    uint32_t slot = (uint32_t)(off % HK_PAGE) / heap_class_size[e->cls];
    return h->views + (size_t)alias_view_of(h, e->cls, slot) * h->data_len + off;
}

/* heap_mark -- claim an existing entry's space while rebuilding; refuses overlaps. */
static int heap_mark(hk_heap *h, uint32_t idx)
{
    struct hk_entry *e = &h->cat[idx];
    uint64_t np = h->sb->npages, units = heap_units(e);
    if (e->cls > HK_PAGE_CLASS || e->first_page >= np || e->npages > np - e->first_page)
        return hk_fail(EBADMSG, "%s: catalog entry %u ('%.63s') points outside the heap", h->path, idx, e->name);
    if (e->npages) {
        for (uint64_t p = e->first_page; p < e->first_page + e->npages; p++)
            if (h->pcls[p] != HK_PAGE_FREE)
                return hk_fail(EBADMSG, "%s: catalog entry %u ('%.63s') overlaps another object", h->path, idx,
                               e->name);
        memset(h->pcls + e->first_page, e->cls, e->npages);
        heap_span_add(h, e->cls, e->first_page, e->npages);
        uint32_t k = HK_PAGE / heap_class_size[e->cls];
        for (uint64_t i = 0; i < e->npages; i++) {
            uint64_t left = e->cls == HK_PAGE_CLASS ? 1 : e->count - i * k;
            h->powner[e->first_page + i] = idx;
            h->pmask[e->first_page + i] = slot_mask(left < k ? left : k);
        }
        h->pages_used += e->npages;
    } else {
        uint64_t p = e->first_page;
        uint32_t k = HK_PAGE / heap_class_size[e->cls];
        if (e->cls == HK_PAGE_CLASS || e->slot >= k || (h->pcls[p] != HK_PAGE_FREE && h->pcls[p] != e->cls) ||
            (h->pcls[p] == e->cls && (!(h->powner[p] & ROW_FLAG) || (h->pmask[p] >> e->slot) & 1)))
            return hk_fail(EBADMSG, "%s: catalog entry %u ('%.63s') has a bad slot", h->path, idx, e->name);
        if (h->pcls[p] == HK_PAGE_FREE) {
            heap_span_add(h, e->cls, p, 1);
            int64_t row = heap_row_new(h);
            if (row < 0)
                return hk_fail(ENOMEM, "out of memory rebuilding the allocator");
            h->pcls[p] = e->cls;
            h->powner[p] = ROW_FLAG | (uint32_t)row;
            h->pmask[p] = 0;
            h->pages_used++;
        }
        h->pmask[p] |= 1ull << e->slot;
        h->slotowner[(size_t)(h->powner[p] & ~ROW_FLAG) * 64 + e->slot] = idx;
    }
    if (units > 1) {
        uint64_t tp = (units * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE;
        if (e->tag_page >= np || tp > np - e->tag_page)
            return hk_fail(EBADMSG, "%s: catalog entry %u ('%.63s') has a bad tag run", h->path, idx, e->name);
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

/* entry_is_zero -- is a free catalog entry all zero, as allocation expects? */
static int entry_is_zero(const struct hk_entry *e)
{
    const uint64_t *w = (const uint64_t *)e;
    for (size_t i = 0; i < sizeof *e / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

/* heap_sweep -- zero all free space (after damage: the slow path that restores the invariant). */
static void heap_sweep(hk_heap *h)
{
    for (uint64_t p = 0; p < h->sb->npages; p++) {
        unsigned c = h->pcls[p];
        if (c == HK_PAGE_FREE) {
            uint64_t q = p;
            while (q < h->sb->npages && h->pcls[q] == HK_PAGE_FREE)
                q++;
            heap_zero(h, p * HK_PAGE, (q - p) * HK_PAGE);
            p = q - 1;
        } else if (c < HK_PAGE_CLASS && (h->powner[p] & ROW_FLAG)) {
            uint32_t s = heap_class_size[c];
            for (uint32_t j = 0; j < HK_PAGE / s; j++)
                if (!((h->pmask[p] >> j) & 1))
                    heap_zero(h, p * HK_PAGE + (uint64_t)j * s, s);
        }
    }
}

/* heap_rebuild -- rebuild the DRAM allocator from the catalog.  A death in the
 * newest epoch stays pending: under MPI the job may restart one epoch earlier. */
int heap_rebuild(hk_heap *h)
{
    uint64_t np = h->sb->npages;
    memset(h->pcls, HK_PAGE_FREE, np);
    h->pages_used = 0;
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
    if (h->st->entries_hwm > h->sb->max_entries)
        return hk_fail(EBADMSG, "%s: catalog high-water mark %lu exceeds its size %lu", h->path,
                       (unsigned long)h->st->entries_hwm, (unsigned long)h->sb->max_entries);
    int rc, sweep = 0;
    for (uint64_t i = h->st->entries_hwm; i-- > 0;) {
        struct hk_entry *e = &h->cat[i];
        uint32_t born = HK_EPOCH_BORN(e->epochs), dead = HK_EPOCH_DEAD(e->epochs);
        int bad = e->kind > HK_KIND_POOL || (e->kind != HK_KIND_FREE && heap_entry_crc(e) != e->crc);
        if (bad && born <= h->prepared && born != 0 && !(dead && dead <= h->prepared))
            return hk_fail(EBADMSG, "%s: catalog entry %lu is corrupt (checksum mismatch)", h->path,
                           (unsigned long)i);
        if (bad || e->kind == HK_KIND_FREE || born == 0 || (dead && dead < h->committed)) {
            /* empty, an allocation cut short, a wipe cut short (torn, dead), uncommitted
             * damage, or death committed: reusable.  Only a valid entry's fields say where
             * its space is; otherwise sweep all free space. */
            if (!h->readonly && !bad && born && e->kind != HK_KIND_FREE)
                sweep |= heap_wipe(h, e) != 0;
            else if (!h->readonly && !entry_is_zero(e)) {
                memset(e, 0, sizeof *e);
                sweep = 1;
            }
            if ((rc = vec_push32(&h->free_entries, (uint32_t)i)))
                return rc;
            continue;
        }
        if ((rc = heap_mark(h, (uint32_t)i)))
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
        if (c < HK_PAGE_CLASS && (h->powner[p] & ROW_FLAG)) {
            uint32_t k = HK_PAGE / heap_class_size[c];
            if (h->pmask[p] != slot_mask(k) && (rc = vec_push32(&h->partial[c], (uint32_t)p)))
                return rc;
        }
    }
    h->page_cursor = 0;
    if (sweep)
        heap_sweep(h);
    return 0;
}

/* heap_record_valid -- is epoch record r intact? */
static int heap_record_valid(const struct hk_record *r)
{
    return r->magic == HK_STATE_MAGIC && r->meta_len <= HK_META_MAX &&
           r->crc == crc_compute(0, r, offsetof(struct hk_record, crc));
}

/* heap_create -- create a new heap file (sparse) with the given geometry and owner. */
int heap_create(const char *path, const struct hk_create_opts *o)
{
    uint64_t npages = (o->capacity + HK_PAGE - 1) / HK_PAGE;
    if (npages == 0 || npages > 0xfffffff0ull)
        return hk_fail(EINVAL, "capacity %lu bytes is out of range", (unsigned long)o->capacity);
    uint64_t maxe = o->max_entries ? o->max_entries : 1024;
    if (maxe > 0xfffffff0ull)
        return hk_fail(EINVAL, "max_objects %lu is out of range", (unsigned long)maxe);
    struct hk_super sb = {0};
    sb.magic = HK_MAGIC;
    sb.major = HK_MAJOR;
    sb.minor = HK_MINOR;
    sb.page_size = HK_PAGE;
    sb.entry_size = sizeof(struct hk_entry);
    sb.capacity = npages * HK_PAGE;
    sb.npages = npages;
    sb.max_entries = maxe;
    sb.off_catalog = 2 * HK_PAGE;
    sb.off_data = sb.off_catalog + (maxe * sizeof(struct hk_entry) + HK_PAGE - 1) / HK_PAGE * HK_PAGE;
    sb.off_shadow[0] = sb.off_data + sb.capacity;
    sb.off_shadow[1] = sb.off_shadow[0] + sb.capacity;
    sb.file_size = sb.off_shadow[1] + sb.capacity;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    sb.created_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    sb.rank = o->rank;
    sb.world_size = o->world_size;
    sb.flags = o->preallocate ? HK_FLAG_PREALLOCATED : 0;
    snprintf(sb.job, sizeof sb.job, "%s", o->job ? o->job : "");
    sb.crc = crc_compute(0, &sb, offsetof(struct hk_super, crc));

    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return hk_fail(errno, "%s: cannot create: %s", path, strerror(errno));
    struct hk_state st = {0};
    st.clean = 1;
    int rc = 0;
    if (o->preallocate && (rc = posix_fallocate(fd, 0, (off_t)sb.file_size)) != 0)
        rc = hk_fail(rc, "%s: cannot reserve %lu bytes for the heap: %s", path, (unsigned long)sb.file_size,
                     strerror(rc));
    else if (ftruncate(fd, (off_t)sb.file_size) != 0 || pwrite(fd, &sb, sizeof sb, 0) != (ssize_t)sizeof sb ||
        pwrite(fd, &st, sizeof st, HK_PAGE) != (ssize_t)sizeof st || fsync(fd) != 0)
        rc = hk_fail(errno ? errno : EIO, "%s: cannot write the new heap: %s", path, strerror(errno ? errno : EIO));
    close(fd);
    if (rc)
        unlink(path);
    return rc;
}

/* heap_check_super -- refuse files that are not heaps of this format. */
static int heap_check_super(const char *path, int fd, struct hk_super *sb)
{
    struct stat stt;
    if (fstat(fd, &stt) != 0)
        return hk_fail(errno, "%s: stat failed: %s", path, strerror(errno));
    ssize_t n = pread(fd, sb, sizeof *sb, 0);
    if (n < 0)
        return hk_fail(errno, "%s: read failed: %s", path, strerror(errno));
    if (n < 8 || sb->magic != HK_MAGIC)
        return hk_fail(EBADMSG, "%s: not an hpcckpt heap (bad magic)", path);
    if (n != (ssize_t)sizeof *sb)
        return hk_fail(EBADMSG, "%s: truncated heap (superblock is %zd of %zu bytes)", path, n, sizeof *sb);
    if (sb->major != HK_MAJOR)
        return hk_fail(EPROTO, "%s: heap format version %u.%u, this hpcckpt reads %d.x", path, sb->major,
                       sb->minor, HK_MAJOR);
    if (sb->crc != crc_compute(0, sb, offsetof(struct hk_super, crc)))
        return hk_fail(EBADMSG, "%s: superblock is corrupt (checksum mismatch)", path);
    if (sb->page_size != HK_PAGE || sb->entry_size != sizeof(struct hk_entry))
        return hk_fail(EPROTO, "%s: heap written with page size %u / entry size %u, expected %u / %zu", path,
                       sb->page_size, sb->entry_size, HK_PAGE, sizeof(struct hk_entry));
    if ((uint64_t)stt.st_size < sb->file_size)
        return hk_fail(EBADMSG, "%s: truncated heap (%ld of %lu bytes)", path, (long)stt.st_size,
                       (unsigned long)sb->file_size);
    return 0;
}

/* heap_alloc_dram -- the allocator's DRAM arrays. */
static int heap_alloc_dram(hk_heap *h)
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

/* heap_free_dram -- free everything heap_open allocated in DRAM. */
static void heap_free_dram(hk_heap *h)
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
    free(h->dmask);
    free(h->dpages.v);
    free(h->work.v);
}

/* heap_set_tracker -- choose the tracker (before the views are mapped). */
int heap_set_tracker(hk_heap *h, int tracker)
{
    h->tracker = tracker;
    h->aliased = tracker == HK_TRACK_UFFD || tracker == HK_TRACK_MPROTECT;
    h->ops = NULL;
    if (tracker == HK_TRACK_UFFD || (tracker == HK_TRACK_PAGE && track_uffd_supported()))
        h->ops = &track_uffd_ops;
    else if (tracker == HK_TRACK_MPROTECT || tracker == HK_TRACK_PAGE)
        h->ops = &track_mprotect_ops;
    return 0;
}

/* heap_uffd_supported -- can tracker='uffd' work on this kernel? */
int heap_uffd_supported(void) { return track_uffd_supported(); }

/* heap_open -- map an existing heap and rebuild the allocator; no recovery here
 * (ckpt_recover restores a committed epoch; the caller decides which). */
int heap_open(const char *path, int tracker, const char *job, int32_t rank, int32_t world, hk_heap **out)
{
    hk_heap *h = calloc(1, sizeof *h);
    if (!h)
        return hk_fail(ENOMEM, "out of memory");
    snprintf(h->path, sizeof h->path, "%s", path);
    h->readonly = tracker == HK_TRACK_NONE;
    h->fd = open(path, (h->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (h->fd < 0) {
        int rc = hk_fail(errno, "%s: cannot open: %s", path, strerror(errno));
        free(h);
        return rc;
    }
    struct hk_super sb;
    int rc = heap_check_super(path, h->fd, &sb);
    if (!rc && ((job && strncmp(job, sb.job, HK_JOB_MAX) != 0) || (rank >= 0 && rank != sb.rank) ||
                (world >= 0 && world != sb.world_size)))
        rc = hk_fail(EACCES, "%s: heap belongs to job '%.63s', rank %d of %d, not job '%s', rank %d of %d; use "
                     "another root or name, or remove it", path, sb.job, sb.rank, sb.world_size,
                     job ? job : sb.job, rank >= 0 ? rank : sb.rank, world >= 0 ? world : sb.world_size);
    if (!rc && flock(h->fd, (h->readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0)
        rc = errno == EWOULDBLOCK ? hk_fail(EBUSY, "%s: heap is open in another process", path)
                                  : hk_fail(errno, "%s: flock failed: %s", path, strerror(errno));
    h->data_len = sb.capacity;
    heap_set_tracker(h, tracker);
    if (!rc)
        rc = alias_reserve(h, sb.file_size);
    if (rc)
        goto fail;
    h->sb = (struct hk_super *)h->raw;
    h->st = (struct hk_state *)(h->raw + HK_PAGE);
    h->cat = (struct hk_entry *)(h->raw + h->sb->off_catalog);
    h->data = h->raw + h->sb->off_data;
    for (int i = 0; i < 2; i++) {
        const struct hk_record *r = &h->st->rec[i];
        if (heap_record_valid(r) && r->epoch > h->prepared)
            h->prepared = r->epoch;
    }
    h->committed = h->prepared;
    h->was_clean = h->st->clean == 1;
    if ((rc = heap_alloc_dram(h)) || (rc = heap_rebuild(h)) || (rc = alias_map_views(h, 0)))
        goto fail;
    if ((h->sb->flags & HK_FLAG_PREALLOCATED) && !h->readonly)
        pmem_populate(h, h->raw + h->sb->off_catalog, h->sb->off_data + h->sb->capacity - h->sb->off_catalog);
    if (h->ops && ((rc = h->ops->attach(h)) || (rc = h->ops->arm(h))))
        goto fail;
    h->all_dirty = h->was_clean && h->prepared > 0;
    if (h->readonly) {
        *out = h;
        return 0;
    }
    h->st->clean = 0;
    h->st->open_pid = (uint64_t)getpid();
    pmem_flush(h, h->st, sizeof *h->st);
    if ((rc = pmem_drain(h)))
        goto fail;
    *out = h;
    return 0;
fail:
    if (h->ops && h->track)
        h->ops->detach(h);
    alias_release(h);
    heap_free_dram(h);
    close(h->fd);
    free(h);
    return rc;
}

/* heap_detach -- stop tracking, detach the views from the file, drop the file. */
static void heap_detach(hk_heap *h)
{
    if (h->ops && h->track)
        h->ops->detach(h);
    alias_map_views(h, 1);   /* lingering numpy arrays keep working on private copies */
    void *r = mmap(h->raw, (size_t)(h->views - h->raw), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    (void)r;
    h->sb = NULL;
    h->st = NULL;
    h->cat = NULL;
    flock(h->fd, LOCK_UN);   /* the private views still reference the file */
    close(h->fd);
    h->fd = -1;
    h->closed = 1;
}

/* heap_close -- make the heap durable and mark it clean. */
int heap_close(hk_heap *h)
{
    if (h->closed)
        return 0;
    if (h->readonly)
        return heap_abandon(h);
    for (size_t i = 0; i < h->touched.n; i++)
        pmem_flush(h, &h->cat[h->touched.v[i]], sizeof(struct hk_entry));
    int rc = msync(h->raw, (size_t)(h->views - h->raw), MS_SYNC) ? -errno : 0;   /* on DAX: cache flush */
    if (rc)
        rc = hk_fail(-rc, "%s: msync failed: %s", h->path, strerror(-rc));
    if (!rc && !(rc = pmem_drain(h))) {
        h->st->clean = 1;
        h->st->open_pid = 0;
        pmem_flush(h, h->st, sizeof *h->st);
        rc = pmem_drain(h);
    }
    heap_detach(h);
    return rc;
}

/* heap_abandon -- drop the heap as a crash would: nothing more is written. */
int heap_abandon(hk_heap *h)
{
    if (!h->closed)
        heap_detach(h);
    return 0;
}

/* heap_release -- unmap the reservation and free the DRAM state. */
void heap_release(hk_heap *h)
{
    if (!h)
        return;
    heap_abandon(h);
    alias_release(h);
    heap_free_dram(h);
    free(h);
}

/* heap_info -- geometry, owner and state for the caller. */
int heap_info(hk_heap *h, struct hk_info *o)
{
    if (h->closed)
        return hk_fail(EBADF, "%s: heap is closed", h->path);
    memset(o, 0, sizeof *o);
    o->major = h->sb->major;
    o->minor = h->sb->minor;
    o->page_size = h->sb->page_size;
    o->tracker = (uint32_t)h->tracker;
    o->capacity = h->sb->capacity;
    o->npages = h->sb->npages;
    o->max_entries = h->sb->max_entries;
    o->file_size = h->sb->file_size;
    o->rank = h->sb->rank;
    o->world_size = h->sb->world_size;
    memcpy(o->job, h->sb->job, sizeof o->job);
    o->job[sizeof o->job - 1] = 0;
    o->prepared = h->prepared;
    o->committed = h->committed;
    o->was_clean = h->was_clean;
    o->dax = h->dax;
    o->pages_used = h->pages_used;
    o->pages_free = h->sb->npages - h->pages_used;
    o->entries_live = h->entries_live;
    o->entries_hwm = h->st->entries_hwm;
    o->nviews = h->nviews;
    o->va_bytes = h->va_len;
    o->va_base = h->va;
    o->off_data = h->sb->off_data;
    o->views_offset = (uint64_t)(h->views - h->va);
    return 0;
}
