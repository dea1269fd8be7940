/* alias.c -- the views: one address-space reservation holding the raw file
 * mapping and then the views of the data area.  View 0 serves slot 0 of every
 * class and whole-page objects; a viewed class of size s gets views for slots
 * 1..k-1 (k = 4096/s), so the object in slot j of page p sits at view(j) +
 * p*4096 + j*s, alone on its virtual page.  Which classes are viewed is the
 * tracker's choice (h->viewed). */
#define _GNU_SOURCE
#include <string.h>
#include <sys/mman.h>
#include "internal.h"

/* alias_layout -- number the views: slot j>0 of class c is view first_view[c] + j - 1. */
static void alias_layout(hk_heap *h)
{
    uint32_t g = 1;
    for (unsigned c = 0; c < HK_NCLASSES; c++) {
        h->first_view[c] = g;
        if (alias_viewed(h, c))
            g += HK_PAGE / heap_class_size[c] - 1;
    }
    h->nviews = g;
}

/* alias_reserve -- reserve raw + views in one PROT_NONE range and map the file raw. */
int alias_reserve(hk_heap *h, size_t file_len)
{
    alias_layout(h);
    h->va_len = file_len + (size_t)h->nviews * h->data_len;
    void *va = mmap(NULL, h->va_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (va == MAP_FAILED)
        return hk_fail(errno, "%s: cannot reserve %zu bytes of address space: %s", h->path, h->va_len,
                       strerror(errno));
    h->va = va;
    h->raw = va;
    h->views = h->va + file_len;
    int rc = persist_map_file(h, h->raw, file_len);
    if (rc)
        alias_release(h);
    return rc;
}

/* alias_map_views -- map every view onto the data area; private_copy detaches them from the file. */
int alias_map_views(hk_heap *h, int private_copy)
{
    int flags = MAP_FIXED | (private_copy ? MAP_PRIVATE : MAP_SHARED);
    for (uint32_t g = 0; g < h->nviews; g++) {
        int prot = h->readonly && !private_copy ? PROT_READ : PROT_READ | PROT_WRITE;
        void *p = mmap(h->views + (size_t)g * h->data_len, h->data_len, prot, flags, h->fd,
                       (off_t)h->sb->off_data);
        if (p == MAP_FAILED)
            return hk_fail(errno, "%s: mapping view %u failed: %s", h->path, g, strerror(errno));
    }
    return 0;
}

/* alias_release -- give back the whole reservation. */
void alias_release(hk_heap *h)
{
    if (h->va)
        munmap(h->va, h->va_len);
    h->va = h->raw = h->views = NULL;
}

/* alias_view_of -- the view through which slot `slot` of class `cls` is reached. */
uint32_t alias_view_of(const hk_heap *h, unsigned cls, uint32_t slot)
{
    return (slot == 0 || !alias_viewed(h, cls)) ? 0 : h->first_view[cls] + slot - 1;
}

/* alias_unit_of -- invert alias_view_of for a view > 0. */
void alias_unit_of(const hk_heap *h, uint32_t view, unsigned *cls, uint32_t *slot)
{
    unsigned c = 0;
    while (c + 1 < HK_PAGE_CLASS && view >= h->first_view[c + 1])
        c++;
    *cls = c;
    *slot = view - h->first_view[c] + 1;
}

/* alias_view_span -- the pages of a view that can hold objects: the span of its
 * class (view 0: of every class).  Trackers arm and scan only these. */
void alias_view_span(const hk_heap *h, uint32_t view, uint64_t *lo, uint64_t *hi)
{
    unsigned first = 0, last = HK_NCLASSES - 1;
    uint32_t slot;
    if (view > 0) {
        alias_unit_of(h, view, &first, &slot);
        last = first;
    }
    *lo = UINT64_MAX;
    *hi = 0;
    for (unsigned c = first; c <= last; c++) {
        if (h->span_lo[c] < *lo)
            *lo = h->span_lo[c];
        if (h->span_hi[c] > *hi)
            *hi = h->span_hi[c];
    }
}
