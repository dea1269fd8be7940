/* state.c -- what recovery cannot do without, kept twice and checked: the header and
 * the epoch records (each copy in its own page, with its CRC; the newest intact copy
 * wins and repairs the other), and the epoch digest that ties the catalog and the unit
 * tags to an epoch record, so that a damaged tag, born/dead epoch or high-water mark is
 * refused before anything is restored. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "internal.h"

/* state_rec -- copy c (0, 1) of record slot s. */
static struct hk_record *state_rec(hk_heap *h, unsigned s, unsigned c) { return &h->st[2 * c + s].rec; }

/* state_hdr -- copy c (0, 1) of the header. */
static struct hk_header *state_hdr(hk_heap *h, unsigned c) { return &h->st[2 * c].hdr; }

/* state_note -- count a repair (or, read-only, a damaged copy that a twin stood in for); say the latest. */
void state_note(hk_heap *h, const char *fmt, ...)
{
    h->repairs++;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(h->note, sizeof h->note, fmt, ap);
    va_end(ap);
}

/* state_record_valid -- is this copy of an epoch record intact? */
static int state_record_valid(const struct hk_record *r)
{
    return r->magic == HK_STATE_MAGIC && r->meta_len <= HK_META_MAX &&
           r->crc == crc_compute(0, r, offsetof(struct hk_record, crc));
}

/* state_header_valid -- is this copy of the header intact? */
static int state_header_valid(const struct hk_header *x)
{
    return x->magic == HK_HEADER_MAGIC && x->crc == crc_compute(0, x, offsetof(struct hk_header, crc));
}

/* state_put -- write `len` bytes over a state copy and make them durable. */
static int state_put(hk_heap *h, void *dst, const void *src, size_t len)
{
    memcpy(dst, src, len);
    persist_flush(h, dst, len);
    return persist_drain(h);
}

/* state_put_twin -- write the second copy: flushed, made durable by the next drain (a crash
 * before that leaves it stale or torn, and the durable first copy repairs it at open). */
static void state_put_twin(hk_heap *h, void *dst, const void *src, size_t len)
{
    memcpy(dst, src, len);
    persist_flush(h, dst, len);
}

/* state_load -- read the header and both record slots from their newest intact copies,
 * repair a damaged or stale copy from its twin (on a writable heap), set `prepared`. */
int state_load(hk_heap *h)
{
    int ok0 = state_header_valid(state_hdr(h, 0)), ok1 = state_header_valid(state_hdr(h, 1)), rc = 0;
    if (!ok0 && !ok1)
        return hk_fail(EBADMSG, "%s: header is corrupt (both copies, pages 1 and 3)", h->path);
    unsigned best = ok0 && (!ok1 || state_hdr(h, 0)->seq >= state_hdr(h, 1)->seq) ? 0 : 1;
    h->hdr = *state_hdr(h, best);
    if (!(best ? ok0 : ok1)) {
        state_note(h, "header copy %u (page %u) was damaged; its twin was used", !best, best ? 1 : 3);
        if (!h->readonly && (rc = state_put(h, state_hdr(h, !best), &h->hdr, sizeof h->hdr)))
            return rc;
    }
    h->prepared = 0;
    for (unsigned s = 0; s < 2; s++) {
        struct hk_record *a = state_rec(h, s, 0), *b = state_rec(h, s, 1);
        int va = state_record_valid(a) && a->epoch % 2 == s, vb = state_record_valid(b) && b->epoch % 2 == s;
        const struct hk_record *r = va && (!vb || a->epoch >= b->epoch) ? a : vb ? b : NULL;
        memset(&h->rec[s], 0, sizeof h->rec[s]);
        if (!r)
            continue;
        h->rec[s] = *r;
        if (h->rec[s].epoch > h->prepared)
            h->prepared = h->rec[s].epoch;
        struct hk_record *other = r == a ? b : a;
        if (memcmp(other, r, sizeof *r) != 0) {   /* damaged, or a write or invalidation cut short */
            state_note(h, "epoch record %lu: copy %d (page %u) was damaged or stale; its twin was used",
                       (unsigned long)r->epoch, other == b, other == b ? 3 + s : 1 + s);
            if (!h->readonly && (rc = state_put(h, other, &h->rec[s], sizeof *r)))
                return rc;
        }
    }
    return 0;
}

/* state_live_hwm -- the high-water mark as the file says now (for a peek handle beside its owner). */
uint64_t state_live_hwm(const hk_heap *h)
{
    uint64_t m = 0;
    for (unsigned c = 0; c < 2; c++) {
        struct hk_header x = h->st[2 * c].hdr;
        if (state_header_valid(&x) && x.entries_hwm > m)
            m = x.entries_hwm;
    }
    return m < h->sb->max_entries ? m : h->sb->max_entries;
}

/* state_record -- the record of epoch E, or NULL (none, or E is 0). */
const struct hk_record *state_record(hk_heap *h, uint64_t E)
{
    const struct hk_record *r = &h->rec[E & 1];
    return E && r->magic && r->epoch == E ? r : NULL;
}

/* state_write_record -- persist record r (copy 0, then copy 1): "prepared = r->epoch". */
int state_write_record(hk_heap *h, struct hk_record *r)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    r->magic = HK_STATE_MAGIC;
    r->time_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    r->crc = crc_compute(0, r, offsetof(struct hk_record, crc));
    unsigned s = r->epoch & 1;
    int rc = state_put(h, state_rec(h, s, 0), r, sizeof *r);
    if (!rc)
        state_put_twin(h, state_rec(h, s, 1), r, sizeof *r);
    if (rc)   /* reported as failed: it must not be restorable either */
        state_kill_record(h, r->epoch);
    else
        h->rec[s] = *r;
    return rc;
}

/* state_kill_record -- make epoch E unrestorable (both copies of its record). */
int state_kill_record(hk_heap *h, uint64_t E)
{
    unsigned s = E & 1;
    uint64_t zero = 0;
    memset(&h->rec[s], 0, sizeof h->rec[s]);
    int rc = state_put(h, &state_rec(h, s, 0)->magic, &zero, 8);
    int rc2 = state_put(h, &state_rec(h, s, 1)->magic, &zero, 8);
    return rc ? rc : rc2;
}

/* state_write_header -- persist the DRAM header (copy 0, then copy 1) with the next seq. */
int state_write_header(hk_heap *h)
{
    h->hdr.magic = HK_HEADER_MAGIC;
    h->hdr.seq++;
    h->hdr.crc = crc_compute(0, &h->hdr, offsetof(struct hk_header, crc));
    int rc = state_put(h, state_hdr(h, 0), &h->hdr, sizeof h->hdr);
    if (!rc)
        state_put_twin(h, state_hdr(h, 1), &h->hdr, sizeof h->hdr);
    return rc;
}

/* state_init -- the state pages of a new heap (written by heap_create with pwrite). */
void state_init(struct hk_state st[HK_NSTATE])
{
    memset(st, 0, HK_NSTATE * sizeof *st);
    struct hk_header x = {.magic = HK_HEADER_MAGIC, .seq = 1, .clean = 1};
    x.crc = crc_compute(0, &x, offsetof(struct hk_header, crc));
    st[0].hdr = st[2].hdr = x;
}

/* state_unit_hash -- the digest term of one unit: (entry, unit, slot, CRC of the slot). */
uint64_t state_unit_hash(uint64_t idx, uint64_t u, uint32_t slot, uint32_t crc)
{
    uint64_t x = (idx + 1) * 0x9e3779b97f4a7c15ull ^ (u + 1) * 0xc2b2ae3d27d4eb4full ^
                 (((uint64_t)crc << 1 | slot) + 0x165667b19e3779f9ull) * 0xd6e8feb86659fd93ull;
    x ^= x >> 32;
    x *= 0xd6e8feb86659fd93ull;
    x ^= x >> 29;
    x *= 0x9e3779b97f4a7c15ull;
    return x ^ (x >> 32);
}

/* state_alive_at -- is entry e an object of epoch E by its epochs alone? */
int state_alive_at(const struct hk_entry *e, uint64_t E)
{
    uint32_t born = HK_EPOCH_BORN(e->epochs), dead = HK_EPOCH_DEAD(e->epochs);
    return e->kind != HK_KIND_FREE && born && born <= E && !(dead && dead <= E);
}

/* state_entry_term -- XOR of the digest terms of an entry's units at epoch E; *newer (if
 * not NULL) counts the units with a copy newer than E. */
uint64_t state_entry_term(hk_heap *h, uint32_t idx, uint64_t E, uint64_t *newer)
{
    struct hk_entry *e = &h->cat[idx];
    uint64_t d = 0, later = 0;
    for (uint64_t u = 0, n = heap_units(e); u < n; u++) {
        const struct hk_tag *t = heap_tag(h, e, u);
        uint32_t s = tag_slot_at(t->latest, E);
        d ^= state_unit_hash(idx, u, s, t->crc[s]);
        later += HK_TAG_EPOCH(t->latest) > E;
    }
    if (newer)
        *newer += later;
    return d;
}

/* state_check -- does the catalog and every tag agree with the record of epoch E?
 * Reads only the catalog and the tags; names the entry when one is plainly damaged. */
int state_check(hk_heap *h, uint64_t E)
{
    const struct hk_record *r = state_record(h, E);
    if (E && !r)
        return hk_fail(EBADMSG, "%s: the record of epoch %lu is missing or damaged", h->path, (unsigned long)E);
    uint64_t hwm = h->hdr.entries_hwm, d = 0, units = 0;
    if (hwm > h->sb->max_entries || (r && r->entries_hwm > hwm))
        return hk_fail(EBADMSG, "%s: catalog high-water mark %lu is damaged (epoch %lu had %lu entries, the "
                       "catalog holds %lu)", h->path, (unsigned long)hwm, (unsigned long)E,
                       (unsigned long)(r ? r->entries_hwm : 0), (unsigned long)h->sb->max_entries);
    uint64_t beyond = 0;   /* signs of an epoch newer than E: objects born after it, copies made after it */
    for (uint64_t i = 0; i < hwm; i++) {
        struct hk_entry *e = &h->cat[i];
        if (!state_alive_at(e, E)) {
            beyond += e->kind != HK_KIND_FREE && e->kind <= HK_KIND_MAX ? HK_EPOCH_BORN(e->epochs) > E : 0;
            continue;
        }
        int pending = h->was_clean && E == h->prepared && HK_EPOCH_DEAD(e->epochs);   /* a clean heap has none */
        if (pending || e->kind > HK_KIND_MAX || e->crc != heap_entry_crc(e) || !heap_entry_sane(h, e))
            return hk_fail(EBADMSG, "%s: catalog entry %lu is corrupt (file bytes %lu..%lu)", h->path,
                           (unsigned long)i, (unsigned long)(h->sb->off_catalog + i * sizeof *e),
                           (unsigned long)(h->sb->off_catalog + (i + 1) * sizeof *e));
        d ^= state_entry_term(h, (uint32_t)i, E, &beyond);
        units += heap_units(e);
    }
    if (d != (r ? r->digest : 0) || units != (r ? r->units : 0))
        return hk_fail(EBADMSG, "%s: the catalog and the unit tags do not match the record of epoch %lu "
                       "(%lu live units, the record says %lu): a tag, an object's epochs or the catalog size "
                       "is damaged", h->path, (unsigned long)E, (unsigned long)units,
                       (unsigned long)(r ? r->units : 0));
    if (beyond && h->was_clean && E == h->prepared) {   /* a newer record was lost: not the state a close left */
        h->was_clean = 0;
        state_note(h, "the heap was closed after epoch %lu, whose record is gone: restore epoch %lu",
                   (unsigned long)E, (unsigned long)E);
    }
    return 0;
}
