/* heap.c -- the catalog and its objects: allocate, free, look up, address, read.
 * Catalog entries are written once, whole, and become valid with one atomic store of
 * their epochs; the catalog is made durable by the next checkpoint or a clean close. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "internal.h"

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

/* pages_per_obj -- whole pages one object of a page-class entry takes. */
static uint64_t pages_per_obj(const struct hk_entry *e)
{
    return e->obj_size ? (e->obj_size + HK_PAGE - 1) / HK_PAGE : 1;
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

/* heap_entry_sane -- do an entry's geometry fields describe space inside the heap? */
int heap_entry_sane(const hk_heap *h, const struct hk_entry *e)
{
    uint64_t np = h->sb->npages, bytes;
    if (e->cls > HK_PAGE_CLASS || e->ndim > HK_NDIM_MAX || e->dtype_len >= HK_DTYPE_MAX || e->count == 0 ||
        __builtin_mul_overflow(e->count, e->obj_size, &bytes) || bytes > h->sb->capacity ||
        e->first_page >= np || e->npages > np - e->first_page)
        return 0;
    if (e->cls == HK_PAGE_CLASS) {
        if (e->npages != e->count * pages_per_obj(e))
            return 0;
    } else {
        uint32_t k = HK_PAGE / heap_class_size[e->cls];
        if (e->obj_size > heap_class_size[e->cls] ||
            (e->npages == 0 ? e->count != 1 || e->slot >= k : e->npages != (e->count + k - 1) / k))
            return 0;
    }
    uint64_t units = heap_units(e), tp = (units * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE;
    return units <= 1 || (e->tag_page < np && tp <= np - e->tag_page);
}

/* heap_release_entry -- forget an entry for good: space and catalog slot become reusable. */
void heap_release_entry(hk_heap *h, uint32_t idx)
{
    struct hk_entry *e = &h->cat[idx];
    int alive = !HK_EPOCH_DEAD(e->epochs);   /* a freed entry left the live count at its free */
    alloc_space_free(h, e);
    alloc_wipe(h, e);
    if (h->putonly)
        h->putonly[idx] = 0;
    vec_push32(&h->free_entries, idx);
    vec_push32(&h->touched, idx);
    h->entries_live -= alive;
}

/* heap_grow_catalog -- raise the high-water mark by a share of itself, durably, before any
 * entry above the old mark is used: a reopen always sees every entry that was ever written. */
static int heap_grow_catalog(hk_heap *h)
{
    uint64_t old = h->hdr.entries_hwm, max = h->sb->max_entries, step = old / 4 > 16 ? old / 4 : 16;
    if (old >= max)
        return hk_fail(ENOSPC, "%s: catalog full (%lu objects); create the heap with a larger max_objects",
                       h->path, (unsigned long)max);
    uint64_t hwm = max - old < step ? max : old + step;
    for (uint64_t i = hwm; i-- > old;) {
        int rc = vec_push32(&h->free_entries, (uint32_t)i);
        if (rc)
            return rc;
    }
    h->hdr.entries_hwm = hwm;
    return state_write_header(h);
}

/* heap_warm -- note both checkpoint copies of a new object as cold (persist_populate): the
 * next checkpoint's copy threads map them in before they copy, so allocation touches no
 * memory and no checkpoint takes a page fault on a copy of a small object. */
static void heap_warm(hk_heap *h, const struct hk_entry *e)
{
    uint64_t off = e->first_page * HK_PAGE, len = (e->npages ? e->npages : 1) * HK_PAGE;
    for (int s = 0; s < 2 && !h->dax; s++)
        persist_populate(h, h->raw + h->sb->off_shadow[s] + off, len);
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
    int table = d->kind == HK_KIND_TABLE, pooled = (d->kind == HK_KIND_POOL && count > 1) || table;
    if (table && (d->obj_size != 64 || count % (HK_PAGE / 64)))
        return hk_fail(EINVAL, "'%s': a table is whole pages of 64-byte units (got %lu units of %lu bytes)",
                       d->name, (unsigned long)count, (unsigned long)d->obj_size);
    if (d->kind < HK_KIND_ARRAY || d->kind > HK_KIND_MAX)
        return hk_fail(EINVAL, "'%s': unknown object kind %d", d->name, d->kind);
    int too_big = __builtin_mul_overflow(count, d->obj_size, &bytes) || bytes > h->sb->capacity;
    if (!too_big && cls == HK_PAGE_CLASS)
        units = npages = count * ((d->obj_size + HK_PAGE - 1) / HK_PAGE);
    else if (!too_big && pooled)
        npages = (count + HK_PAGE / heap_class_size[cls] - 1) / (HK_PAGE / heap_class_size[cls]), units = count;
    if (too_big || npages > h->sb->npages)
        return hk_fail(ENOSPC, "%s: '%s' needs more than the heap's whole capacity (%lu objects of %lu bytes)",
                       h->path, d->name, (unsigned long)count, (unsigned long)d->obj_size);
    int rc = h->free_entries.n ? 0 : heap_grow_catalog(h);
    if (rc)
        return rc;
    uint32_t idx = h->free_entries.v[--h->free_entries.n];
    int64_t first, tags;
    uint32_t slot = 0;
    rc = alloc_space(h, idx, cls, count, npages, units, &first, &slot, &tags);
    if (rc) {
        vec_push32(&h->free_entries, idx);
        if (rc != -ENOSPC)
            return rc;
        return hk_fail(ENOSPC, "%s: out of space for '%s' (%lu bytes): %lu of %lu pages free; free objects "
                       "(del heap[name]) or create a larger heap", h->path, d->name, (unsigned long)bytes,
                       (unsigned long)(h->sb->npages - h->pages_used), (unsigned long)h->sb->npages);
    }
    if (npages)   /* free space is zero; damage there is cleared before it is handed out */
        alloc_check_zero(h, (uint64_t)first * HK_PAGE, npages * HK_PAGE);
    else
        alloc_check_zero(h, (uint64_t)first * HK_PAGE + (uint64_t)slot * heap_class_size[cls], heap_class_size[cls]);
    if (units > 1)
        alloc_check_zero(h, (uint64_t)tags * HK_PAGE, (units * sizeof(struct hk_tag) + HK_PAGE - 1) / HK_PAGE * HK_PAGE);
    struct hk_entry *e = &h->cat[idx];   /* free entries are all zero (alloc_wipe) */
    if (!alloc_entry_is_zero(e)) {
        state_note(h, "free catalog entry %u was not zero; cleared before reuse", idx);
        memset(e, 0, sizeof *e);
    }
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
        alloc_space_free(h, e);
        memset(e, 0, sizeof *e);
        vec_push32(&h->free_entries, idx);
        return rc;
    }
    __atomic_store_n(&e->epochs, HK_EPOCHS(h->committed + 1, 0), __ATOMIC_RELEASE);
    h->entries_live++;
    heap_warm(h, e);
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
    if (index >= heap_hwm(h) || h->cat[index].kind == HK_KIND_FREE ||
        HK_EPOCH_DEAD(h->cat[index].epochs))
        return hk_fail(ENOENT, "%s: no live object at catalog index %lu", h->path, (unsigned long)index);
    struct hk_entry *e = &h->cat[index];
    uint32_t born = HK_EPOCH_BORN(e->epochs);
    ckpt_unexpose(h, (uint32_t)index);
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
    if (h->closed || index >= heap_hwm(h) || h->cat[index].kind == HK_KIND_FREE)
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

/* heap_fill_write -- pwrite all of buf at `at` of the heap file (short writes resumed). */
static int heap_fill_write(hk_heap *h, const uint8_t *buf, uint64_t len, uint64_t at)
{
    while (len) {
        ssize_t k = pwrite(h->fd, buf, len, (off_t)at);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return hk_fail(k < 0 ? errno : EIO, "%s: cannot write at offset %lu: %s", h->path, (unsigned long)at,
                           k < 0 ? strerror(errno) : "no progress");
        buf += k, len -= (uint64_t)k, at += (uint64_t)k;
    }
    return 0;
}

/* heap_fill_entry -- the entry `index` if bytes byte_off..+len of a new one, else an error. */
static struct hk_entry *heap_fill_entry(hk_heap *h, uint64_t index, uint64_t byte_off, uint64_t len, int *rc)
{
    *rc = 0;
    if (h->closed || h->readonly || index >= heap_hwm(h) || h->cat[index].kind == HK_KIND_FREE) {
        *rc = hk_fail(ENOENT, "%s: no writable live object at catalog index %lu", h->path, (unsigned long)index);
        return NULL;
    }
    struct hk_entry *e = &h->cat[index];
    uint64_t total = e->obj_size * e->count;
    if (HK_EPOCH_BORN(e->epochs) <= h->committed)
        *rc = hk_fail(EPERM, "%s: '%.63s' has a committed copy: only a new object is filled this way", h->path,
                      e->name);
    else if (byte_off > total || len > total - byte_off)
        *rc = hk_fail(ERANGE, "%s: '%.63s' holds %lu bytes; bytes %lu..%lu are out of range", h->path, e->name,
                      (unsigned long)total, (unsigned long)byte_off, (unsigned long)(byte_off + len));
    return *rc ? NULL : e;
}

/* heap_fill_scatter -- pwrite buf (bytes byte_off.. of the entry's objects laid end to end)
 * into the heap file, in runs of objects that lie next to each other there. */
static int heap_fill_scatter(hk_heap *h, uint64_t index, uint64_t byte_off, const uint8_t *buf, uint64_t n)
{
    const struct hk_entry *e = &h->cat[index];
    uint64_t size = e->obj_size, off, next, u, nu;
    int rc = 0;
    for (uint64_t k = 0; k < n && !rc;) {
        uint64_t obj = (byte_off + k) / size, in = (byte_off + k) % size;
        if ((rc = heap_object_span(h, index, obj, &off, &u, &nu)))
            break;
        uint64_t start = off + in, run = size - in < n - k ? size - in : n - k;
        while (k + run < n && obj + 1 < e->count && !heap_object_span(h, index, obj + 1, &next, &u, &nu) &&
               next == start + run) {
            obj++;
            run += size < n - k - run ? size : n - k - run;
        }
        rc = heap_fill_write(h, buf + k, run, h->sb->off_data + start);
        k += run;
    }
    return rc;
}

/* heap_fill_rows -- place n bytes of a fill (stream bytes pos..): stream row k (of `row`
 * bytes) goes to bytes byte_off + k*stride of the entry's objects laid end to end. */
static int heap_fill_rows(hk_heap *h, uint64_t index, uint64_t byte_off, uint64_t row, uint64_t stride, uint64_t pos,
                          const uint8_t *buf, uint64_t n)
{
    if (row == stride)
        return heap_fill_scatter(h, index, byte_off + pos, buf, n);
    int rc = 0;
    for (uint64_t i = 0; i < n && !rc;) {
        uint64_t k = (pos + i) / row, c = (pos + i) % row, run = row - c < n - i ? row - c : n - i;
        rc = heap_fill_scatter(h, index, byte_off + k * stride + c, buf + i, run);
        i += run;
    }
    return rc;
}

/* heap_fill_check -- the entry if the rows of a fill (len bytes of `row`, every `stride`) fit
 * a new one, else NULL and the error. */
static struct hk_entry *heap_fill_check(hk_heap *h, uint64_t index, uint64_t byte_off, uint64_t len, uint64_t row,
                                        uint64_t stride, int *rc)
{
    if (row == 0 || stride < row || len % row) {
        *rc = hk_fail(EINVAL, "%s: a fill of %lu bytes in rows of %lu every %lu bytes is not whole rows", h->path,
                      (unsigned long)len, (unsigned long)row, (unsigned long)stride);
        return NULL;
    }
    uint64_t rows = len / row, extent = rows ? (rows - 1) * stride + row : 0;
    if (rows && (rows - 1) > (UINT64_MAX - row) / stride) {
        *rc = hk_fail(ERANGE, "%s: a fill of %lu rows every %lu bytes is out of range", h->path, (unsigned long)rows,
                      (unsigned long)stride);
        return NULL;
    }
    return heap_fill_entry(h, index, byte_off, extent, rc);
}

/* heap_fill -- copy `len` bytes of file `fd` from offset `at` into an entry born in the open
 * epoch: rows of `row` bytes to bytes byte_off, byte_off + stride, ... of its objects laid
 * end to end (stride = row: one run); *crc is their CRC32C.  The bytes pass through a small
 * buffer (read, checksummed while cache-hot) and pwrite, so no mapping of the heap is
 * touched: the file system makes the working pages, without a fault each.  No marks are
 * needed: the next prepare copies a new entry whole. */
int heap_fill(hk_heap *h, uint64_t index, uint64_t byte_off, uint64_t row, uint64_t stride, int fd, uint64_t at,
              uint64_t len, uint32_t *crc)
{
    int rc;
    *crc = 0;
    if (!heap_fill_check(h, index, byte_off, len, row, stride, &rc))
        return rc;
    enum { CHUNK = 256 << 10 };
    uint8_t *buf = malloc(CHUNK);
    if (!buf)
        return hk_fail(ENOMEM, "out of memory for a fill buffer");
    for (uint64_t pos = 0; pos < len && !rc;) {
        uint64_t n = len - pos < CHUNK ? len - pos : CHUNK, got = 0;
        while (got < n && !rc) {
            ssize_t k = pread(fd, buf + got, n - got, (off_t)(at + pos + got));
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0)
                rc = hk_fail(k < 0 ? errno : EIO, "cannot read %lu bytes at offset %lu: %s", (unsigned long)(n - got),
                             (unsigned long)(at + pos + got), k < 0 ? strerror(errno) :
                             "the file ends there (truncated?)");
            else
                got += (uint64_t)k;
        }
        if (!rc) {
            *crc = crc_compute(*crc, buf, n);
            rc = heap_fill_rows(h, index, byte_off, row, stride, pos, buf, n);
        }
        pos += n;
    }
    free(buf);
    return rc;
}

/* heap_fill_bytes -- heap_fill from memory (no checksum: the caller checked the bytes). */
int heap_fill_bytes(hk_heap *h, uint64_t index, uint64_t byte_off, uint64_t row, uint64_t stride, const void *src,
                    uint64_t len)
{
    int rc;
    if (!heap_fill_check(h, index, byte_off, len, row, stride, &rc))
        return rc;
    return heap_fill_rows(h, index, byte_off, row, stride, 0, src, len);
}

/* heap_lookup -- describe a live entry; name and dtype are copied into the caller's buffers. */
int heap_lookup(hk_heap *h, uint64_t index, struct hk_desc *d, char *name, char *dtype)
{
    if (h->closed)
        return hk_fail(EBADF, "%s: heap is closed", h->path);
    if (index >= heap_hwm(h) || h->cat[index].kind == HK_KIND_FREE)
        return hk_fail(ENOENT, "no object at catalog index %lu", (unsigned long)index);
    const struct hk_entry *e = &h->cat[index];
    if (e->crc != heap_entry_crc(e) || e->dtype_len >= HK_DTYPE_MAX)   /* lengths are never trusted */
        return hk_fail(EBADMSG, "%s: catalog entry %lu is corrupt (checksum mismatch)", h->path,
                       (unsigned long)index);
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
    for (uint64_t i = from; i < heap_hwm(h); i++)
        if (h->cat[i].kind != HK_KIND_FREE && !HK_EPOCH_DEAD(h->cat[i].epochs))
            return (int64_t)i;
    return -1;
}

/* heap_put_only -- the program promises that a live object is written only through
 * ckpt_write: no tracker watches its pages (its checkpoints cost what was written).
 * A promise of this process, kept in DRAM: a reopened heap tracks the object again. */
int heap_put_only(hk_heap *h, uint64_t index)
{
    if (h->closed || h->readonly || index >= heap_hwm(h) || h->cat[index].kind == HK_KIND_FREE ||
        HK_EPOCH_DEAD(h->cat[index].epochs))
        return hk_fail(ENOENT, "%s: no live object at catalog index %lu", h->path, (unsigned long)index);
    if (!h->putonly && !(h->putonly = calloc(h->sb->max_entries, 1)))
        return hk_fail(ENOMEM, "out of memory");
    h->putonly[index] = 1;
    h->layout_gen++;
    return 0;
}

/* heap_page_put_only -- does page p belong to one object written only through ckpt_write? */
int heap_page_put_only(const hk_heap *h, uint64_t page)
{
    uint32_t own = h->powner[page];
    return h->putonly && !(own & HK_ROW_FLAG) && h->putonly[own];
}

/* heap_addr -- where object `obj` of entry `index` is seen by the program. */
void *heap_addr(hk_heap *h, uint64_t index, uint64_t obj)
{
    if (h->closed || index >= heap_hwm(h) || h->cat[index].kind == HK_KIND_FREE ||
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

