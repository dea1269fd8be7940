/* delta.c -- what a checkpoint hands a partner rank: the units it copied in the epoch just
 * prepared (or every unit of that epoch, to seed a new partner), read back from their
 * checkpoint slots and checked against those slots' CRCs; and the partner's side: units
 * written into the objects of a mirror heap, the bytes checked against their CRC first. */
#include <stdlib.h>
#include <string.h>
#include "internal.h"

/* delta_keep -- pack the units each prepare copies (a partner takes them next: delta_read). */
void delta_keep(hk_heap *h, int on)
{
    h->keep_delta = on;
    h->delta_epoch = 0;
    if (!on) {   /* a full copy is walked: the buffer is not kept for it */
        free(h->delta);
        h->delta = NULL;
        h->delta_cap = 0;
    }
}

/* delta_room -- room for `bytes` of packed units in h->delta; 0 (no packing) if memory is short. */
int delta_room(hk_heap *h, uint64_t bytes)
{
    if (bytes <= h->delta_cap)
        return 1;
    uint8_t *p = realloc(h->delta, bytes);
    if (!p)
        return 0;
    h->delta = p;
    h->delta_cap = bytes;
    return 1;
}

/* delta_slot -- the slot holding unit u of entry idx as of epoch E, or -1 if it has none. */
static int delta_slot(hk_heap *h, struct hk_entry *e, uint64_t u, uint64_t E)
{
    uint32_t l = heap_tag(h, e, u)->latest;
    return l == 0 || HK_TAG_EPOCH(l) == 0 ? -1 : (int)tag_slot_at(l, E);
}

/* delta_walk -- visit the units of the delta: those copied for the prepared epoch, or (all)
 * every unit of every object of it.  fn gets (entry, unit, slot, offset, length). */
static int delta_walk(hk_heap *h, int all, int (*fn)(void *, hk_heap *, uint32_t, uint64_t, int, uint64_t, uint32_t),
                      void *arg)
{
    uint64_t E = h->prepared;
    if (h->closed || E == 0)
        return hk_fail(h->closed ? EBADF : ENOENT, "%s: %s", h->path, h->closed ? "heap is closed" : "nothing prepared");
    if (!all) {
        for (size_t i = 0; i < h->work.n; i++) {
            if (i + 16 < h->work.n) {   /* units are scattered: fetch their tags and copies ahead */
                const struct unit *y = &h->work.v[i + 16];
                struct hk_tag *t = heap_tag(h, &h->cat[y->entry], y->u);
                __builtin_prefetch(t, 0, 0);
                if (i + 32 < h->work.n)
                    __builtin_prefetch(heap_tag(h, &h->cat[h->work.v[i + 32].entry], h->work.v[i + 32].u), 0, 0);
                int slot = delta_slot(h, &h->cat[y->entry], y->u, E);
                if (slot >= 0)
                    __builtin_prefetch(h->raw + h->sb->off_shadow[slot] + y->off, 0, 0);
            }
            struct unit *x = &h->work.v[i];
            int rc = fn(arg, h, x->entry, x->u, delta_slot(h, &h->cat[x->entry], x->u, E), x->off, x->len);
            if (rc)
                return rc;
        }
        return 0;
    }
    for (uint64_t i = 0; i < heap_hwm(h); i++) {
        struct hk_entry *e = &h->cat[i];
        if (!state_alive_at(e, E))
            continue;
        for (uint64_t u = 0, n = heap_units(e); u < n; u++) {
            uint64_t off;
            uint32_t len;
            heap_unit_place(h, e, u, &off, &len);
            int rc = fn(arg, h, (uint32_t)i, u, delta_slot(h, e, u, E), off, len);
            if (rc)
                return rc;
        }
    }
    return 0;
}

struct delta_out {
    uint64_t n, bytes, cap_n, cap_bytes;
    uint32_t *entries;
    uint64_t *units;
    uint8_t *data;
};

/* delta_put -- delta_walk callback: count a unit, or copy it out, checked against its slot's CRC. */
static int delta_put(void *arg, hk_heap *h, uint32_t entry, uint64_t u, int slot, uint64_t off, uint32_t len)
{
    struct delta_out *o = arg;
    if (slot < 0)
        return hk_fail(EBADMSG, "%s: object '%.63s' (unit %lu) has no checkpoint copy", h->path, h->cat[entry].name,
                       (unsigned long)u);
    if (o->data) {
        if (o->n >= o->cap_n || o->bytes + len > o->cap_bytes)
            return hk_fail(EOVERFLOW, "%s: the delta grew while it was read", h->path);
        o->entries[o->n] = entry;
        o->units[o->n] = u;
        uint32_t crc = crc_copy(o->data + o->bytes, h->raw + h->sb->off_shadow[slot] + off, len);
        if (crc != heap_tag(h, &h->cat[entry], u)->crc[slot])
            return hk_fail(EBADMSG, "%s: checkpoint copy of '%.63s' (unit %lu) is corrupt (checksum mismatch)",
                           h->path, h->cat[entry].name, (unsigned long)u);
    }
    o->n++;
    o->bytes += len;
    return 0;
}

/* delta_size -- units and bytes of the delta of the prepared epoch (all: of every unit). */
int delta_size(hk_heap *h, int all, uint64_t *units, uint64_t *bytes)
{
    if (!all && !h->closed && h->prepared && h->delta_epoch == h->prepared) {   /* packed: known */
        *units = h->work.n;
        *bytes = h->delta_len;
        return 0;
    }
    struct delta_out o = {0};
    int rc = delta_walk(h, all, delta_put, &o);
    *units = o.n;
    *bytes = o.bytes;
    return rc;
}

/* delta_read -- copy the delta out: per unit its entry and unit number, and the bytes packed in
 * that order (arrays sized by delta_size); every unit is checked against its slot's CRC; and
 * the CRC32C of the packed bytes (read back while they are in cache: folding the units' CRCs
 * with crc_append costs a microsecond per unit). */
int delta_read(hk_heap *h, int all, uint32_t *entries, uint64_t *units, uint64_t n, uint8_t *data, uint64_t bytes,
               uint32_t *crc)
{
    if (!all && !h->closed && h->prepared && h->delta_epoch == h->prepared && n == h->work.n &&
        bytes == h->delta_len) {   /* packed by the prepare, each unit checked against its copy's CRC */
        for (size_t i = 0; i < n; i++) {
            entries[i] = h->work.v[i].entry;
            units[i] = h->work.v[i].u;
        }
        memcpy(data, h->delta, bytes);
        *crc = crc_compute(0, data, bytes);
        return 0;
    }
    struct delta_out o = {.cap_n = n, .cap_bytes = bytes, .entries = entries, .units = units, .data = data};
    int rc = delta_walk(h, all, delta_put, &o);
    crc_fence();
    *crc = rc ? 0 : crc_compute(0, data, o.bytes);
    return rc;
}

/* The gaps are prefix varints (as SQLite4's): the first byte says the length.  0..240 take one
 * byte, up to 2287 two, up to 67823 three, anything else 1 + 3..8 bytes big endian.  One unit
 * in a hundred rewritten costs 1.1 bytes a unit (LEB128's split at 128: 1.3). */
#define VAR_ONE   240u
#define VAR_TWO   2287u
#define VAR_THREE 67823u

/* delta_var_put -- append v to out at *at. */
static void delta_var_put(uint8_t *out, size_t *at, uint64_t v)
{
    size_t a = *at;
    if (v <= VAR_ONE) {
        out[a++] = (uint8_t)v;
    } else if (v <= VAR_TWO) {
        out[a++] = (uint8_t)(241 + (v - 240) / 256);
        out[a++] = (uint8_t)((v - 240) % 256);
    } else if (v <= VAR_THREE) {
        out[a++] = 249;
        out[a++] = (uint8_t)((v - 2288) / 256);
        out[a++] = (uint8_t)((v - 2288) % 256);
    } else {
        unsigned n = 3;
        while (n < 8 && v >> (8 * n))
            n++;
        out[a++] = (uint8_t)(247 + n);
        while (n--)
            out[a++] = (uint8_t)(v >> (8 * n));
    }
    *at = a;
}

/* delta_var_get -- the number at *at of in[0, len), or -1 if it runs past the end or is not
 * written as delta_var_put writes it (in its shortest form). */
static int delta_var_get(const uint8_t *in, size_t len, size_t *at, uint64_t *v)
{
    size_t a = *at;
    if (a >= len)
        return -1;
    unsigned b = in[a++], n = b <= VAR_ONE ? 0 : b <= 248 ? 1 : b == 249 ? 2 : b - 247;
    if (n > len - a)
        return -1;
    if (b <= VAR_ONE)
        *v = b;
    else if (b <= 248)
        *v = 240 + (uint64_t)(b - 241) * 256 + in[a];
    else if (b == 249)
        *v = 2288 + (uint64_t)in[a] * 256 + in[a + 1];
    else {
        *v = 0;
        for (unsigned k = 0; k < n; k++)
            *v = *v << 8 | in[a + k];
        if (*v <= VAR_THREE || (n > 3 && in[a] == 0))
            return -1;
    }
    if (b > VAR_ONE && *v <= VAR_ONE)
        return -1;
    *at = a + n;
    return 0;
}

/* delta_pack -- a unit list, compact: runs of one entry with rising unit numbers as (entry,
 * count) pairs of u32, and the gaps between unit numbers as prefix varints (a run's first:
 * the unit itself), about a byte per scattered unit.  groups holds 2n, gaps at most 9n.  -EOVERFLOW
 * if a run is longer than a u32 counts. */
int delta_pack(const uint32_t *entries, const uint64_t *units, size_t n, uint32_t *groups, size_t *ngroups,
               uint8_t *gaps, size_t *gaps_len)
{
    size_t g = 0, at = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t v = units[i];
        if (i == 0 || entries[i] != entries[i - 1] || units[i] <= units[i - 1]) {
            groups[2 * g] = entries[i];
            groups[2 * g + 1] = 0;
            g++;
        } else {
            v -= units[i - 1];
        }
        if (groups[2 * g - 1] == UINT32_MAX)
            return hk_fail(EOVERFLOW, "a run of %u units of one object is too long to pack", UINT32_MAX);
        groups[2 * g - 1]++;
        delta_var_put(gaps, &at, v);
    }
    *ngroups = g;
    *gaps_len = at;
    return 0;
}

/* delta_unpack -- the unit list back from delta_pack's groups and gaps into entries and units
 * (n of each: the counts' sum, which the caller took from the groups); -EBADMSG if the gaps
 * are not exactly n numbers as delta_pack writes them (a run's units rise). */
int delta_unpack(const uint32_t *groups, size_t ngroups, const uint8_t *gaps, size_t gaps_len, uint32_t *entries,
                 uint64_t *units, size_t n)
{
    size_t at = 0, i = 0;
    for (size_t g = 0; g < ngroups; g++) {
        uint64_t prev = 0;
        for (uint32_t k = 0; k < groups[2 * g + 1]; k++, i++) {
            uint64_t v = 0;
            if (i >= n || delta_var_get(gaps, gaps_len, &at, &v) != 0 || (k && (v == 0 || prev + v < prev)))
                return hk_fail(EBADMSG, "a partner copy's list of units is damaged (at unit %zu of %zu)", i, n);
            prev = k ? prev + v : v;
            entries[i] = groups[2 * g];
            units[i] = prev;
        }
    }
    if (i != n || at != gaps_len)
        return hk_fail(EBADMSG, "a partner copy's list of units is damaged (%zu numbers, %zu expected)", i, n);
    return 0;
}

/* delta_target -- the mirror entry that sender entry `from` maps to, if it is a live object. */
static int delta_target(hk_heap *h, const uint32_t *map, size_t map_len, uint32_t from, struct hk_entry **e)
{
    uint32_t idx = from < map_len ? map[from] : UINT32_MAX;
    if (idx >= heap_hwm(h) || !state_alive_at(&h->cat[idx], h->committed + 1))
        return hk_fail(ENOENT, "%s: a partner copy names object %u, which this mirror does not hold", h->path, from);
    *e = &h->cat[idx];
    return (int)idx;
}

/* delta_units -- h->work from n units a partner sent (its entry numbers, mapped to this
 * heap's by map; unit numbers; the bytes packed, whose CRC32C is crc), each unit's source in
 * data: the bytes are checked against crc and every unit against this heap's geometry. */
static int delta_units(hk_heap *h, const uint32_t *map, size_t map_len, const uint32_t *entries,
                       const uint64_t *units, size_t n, const uint8_t *data, size_t len, uint32_t crc)
{
    if (crc_compute(0, data, len) != crc)
        return hk_fail(EBADMSG, "%s: a partner copy of %zu bytes arrived damaged (checksum mismatch)", h->path, len);
    h->work.n = 0;
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        struct hk_entry *e;
        int idx = delta_target(h, map, map_len, entries[i], &e);
        if (idx < 0)
            return idx;
        if (units[i] >= heap_units(e))
            return hk_fail(ERANGE, "%s: '%.63s' has %lu units; a partner copy names unit %lu", h->path, e->name,
                           (unsigned long)heap_units(e), (unsigned long)units[i]);
        struct unit x = {.entry = (uint32_t)idx, .u = units[i], .src = data + at};
        heap_unit_place(h, e, units[i], &x.off, &x.len);
        if (at + x.len > len)
            return hk_fail(EINVAL, "%s: a partner copy is shorter than the units it names", h->path);
        at += x.len;
        int rc = vec_push_unit(&h->work, &x);
        if (rc)
            return rc;
    }
    return at == len ? 0 : hk_fail(EINVAL, "%s: a partner copy is longer than the units it names", h->path);
}

/* delta_forget -- drop the work list's pointers into a partner's buffer (a withdraw re-marks it). */
static void delta_forget(hk_heap *h)
{
    for (size_t i = 0; i < h->work.n; i++)
        h->work.v[i].src = NULL;
}

/* delta_apply -- write a partner's units (as delta_units takes them) into the working data and
 * mark them dirty; nothing is written unless every unit checks. */
int delta_apply(hk_heap *h, const uint32_t *map, size_t map_len, const uint32_t *entries, const uint64_t *units,
                size_t n, const uint8_t *data, size_t len, uint32_t crc)
{
    if (h->closed || h->readonly)
        return hk_fail(h->readonly ? EROFS : EBADF, "%s: heap is %s", h->path, h->readonly ? "read-only" : "closed");
    h->delta_epoch = 0;   /* the work list is the partner's now */
    int rc = delta_units(h, map, map_len, entries, units, n, data, len, crc);
    for (size_t i = 0; !rc && i < h->work.n; i++) {
        const struct unit *x = &h->work.v[i];
        memcpy(h->data + x->off, x->src, x->len);
        rc = ckpt_mark_unit(h, x->entry, x->u);
    }
    delta_forget(h);
    h->work.n = 0;
    return rc;
}

/* delta_store -- prepare epoch committed+1 of a mirror straight from a partner's units (as
 * delta_units takes them): each goes into its free checkpoint slot and is tagged, the record
 * is written last, as a checkpoint does; the mirror's working data is not written (it is
 * brought back from the copies whenever the mirror is restored). */
int delta_store(hk_heap *h, const uint32_t *map, size_t map_len, const uint32_t *entries, const uint64_t *units,
                size_t n, const uint8_t *data, size_t len, uint32_t crc, const char *meta, uint32_t meta_len,
                uint64_t *epoch)
{
    int rc = ckpt_start(h, meta_len);
    if (rc)
        return rc;
    double t0 = persist_now();
    rc = delta_units(h, map, map_len, entries, units, n, data, len, crc);
    if (!rc)
        rc = ckpt_finish(h, h->committed + 1, meta, meta_len, t0, epoch);
    delta_forget(h);
    return rc;
}
