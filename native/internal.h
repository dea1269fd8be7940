/* internal.h -- the in-DRAM heap object and the prototypes shared by the
 * core's mechanisms.  Nothing here is on media; that is layout.h. */
#ifndef HPCCKPT_INTERNAL_H
#define HPCCKPT_INTERNAL_H

#include <errno.h>
#include <stdatomic.h>
#include "layout.h"
#include "hpcckpt.h"

#define HK_NVIEWS_MAX   (1 + 63 + 31 + 15 + 7 + 3 + 1)
#define HK_PAGE_FREE    0xffu
#define HK_PAGE_TAGS    0xfeu
#define HK_ROW_FLAG     0x80000000u   /* powner of a shared small page: index of its slot-owner row */

/* One dirty unit, ready to copy: its file offset inside the data area. */
struct unit {
    uint64_t off;
    uint32_t entry;
    uint32_t len;
    uint64_t u;             /* unit number inside its entry */
    const uint8_t *src;     /* where its bytes are: NULL for the working data (a mirror's: received) */
};

struct unitvec { struct unit *v; size_t n, cap; };
struct u32vec { uint32_t *v; size_t n, cap; };
struct span { uint64_t off, len; };
struct spanvec { struct span *v; size_t n, cap; };

struct track_ops;

struct hk_heap {
    int fd;
    char path[4096];
    int dax;
    int shmem;                      /* the file is on tmpfs (persist_map_in) */
    int readonly;                   /* tracker HK_TRACK_NONE or PEEK: inspect only, never write */
    int peek;                       /* HK_TRACK_PEEK: no lock, no allocator, no views */
    int tracker;
    uint32_t viewed;                /* bit c: class c has a view per slot (alias.c), else view 0 only */
    const struct track_ops *ops;
    void *track;                    /* tracker private state */

    /* address space: one reservation = raw file mapping, then the views */
    uint8_t *va;
    size_t va_len;
    uint8_t *raw;                   /* whole file, untracked */
    uint8_t *views;                 /* view g at views + g * data_len */
    size_t data_len;
    uint32_t nviews;
    uint32_t first_view[HK_NCLASSES];   /* view of slot 1 of each class (slot 0 is view 0) */

    struct hk_super *sb;
    struct hk_state *st;            /* the HK_NSTATE state pages (state.c) */
    struct hk_header hdr;           /* DRAM copy of the header; written by state_write_header */
    struct hk_record rec[2];        /* DRAM copies of the intact records (magic 0: none) */
    uint64_t repairs;               /* damaged copies replaced by their twins, or repaired data */
    char note[256];                 /* what the latest repair was */
    char damage[512];               /* read-only: why no epoch matches its record */
    struct hk_entry *cat;
    uint8_t *data;                  /* raw + off_data */

    /* allocator, all DRAM, rebuilt at open */
    uint8_t *pcls;                  /* class of each page, HK_PAGE_FREE, HK_PAGE_TAGS */
    uint64_t *pmask;                /* used slots of a small-class page */
    uint32_t *powner;               /* owning entry of a run page / slot-table row */
    uint32_t *slotowner;            /* rows of 64 entry indexes for shared small pages */
    size_t slot_rows, slot_rows_cap;
    struct u32vec free_rows;
    struct u32vec partial[HK_PAGE_CLASS];   /* shared pages with a free slot */
    uint64_t page_cursor, pages_used;
    uint64_t span_lo[HK_NCLASSES], span_hi[HK_NCLASSES];  /* pages ever given to each class */
    uint64_t layout_gen;            /* bumped whenever pages change hands or put-only flags change */
    uint8_t *putonly;               /* per catalog entry: written only through ckpt_write (or NULL) */
    struct u32vec free_entries;
    struct u32vec pending;          /* freed in the open epoch: released at commit */
    struct u32vec fresh;            /* born in the open epoch: dirty at next prepare */
    struct u32vec touched;          /* catalog entries changed since the last prepare */
    struct u32vec exposed;          /* objects system calls may write (ckpt_expose): always dirty */
    uint64_t entries_live;

    /* checkpoint state */
    uint64_t prepared, committed;
    uint64_t digest, units;         /* of the committed epoch (state_check) */
    uint64_t next_digest, next_units;   /* of the prepared one */
    int64_t good_epoch;             /* newest epoch whose record matches catalog and tags; -1 none */
    int was_clean, all_dirty, closed;
    int forked;                     /* this is a forked child's copy: detached, never written */
    uint64_t *dmask;                /* dirty units of each page, one bit per slot, since the last prepare */
    struct u32vec dpages;           /* pages whose dmask is not zero */
    struct u32vec sift;             /* written pages several objects share, to compare (ckpt.c) */
    struct unitvec work;
    int keep_delta;                 /* pack the units a prepare copies, for a partner (delta.c) */
    uint8_t *delta;                 /* ... their bytes in work-list order, if delta_epoch == prepared */
    uint64_t delta_cap, delta_len, delta_epoch;
    struct hk_stats stats;
    _Atomic uint64_t prog_done, prog_total;   /* of the long call running now (heap_progress) */
    int crash_point;
    uint64_t crash_epoch;
    double nvm_gbps, nvm_lat_ns;
    int threads;                    /* for the copy of one checkpoint (par.c) */
    struct spanvec cold[2];         /* data ranges whose copy in slot s is not mapped in yet (persist.c) */
};

/* tracker interface: attach after the views exist, arm to protect all,
 * collect appends dirty (view, page) pairs and re-protects, detach at close (writes
 * go on working), release (may be NULL) when the heap's memory is given back. */
struct track_ops {
    const char *name;
    int (*attach)(hk_heap *h);
    int (*arm)(hk_heap *h);
    int (*collect)(hk_heap *h, int (*emit)(hk_heap *, uint32_t view, uint64_t page));
    void (*detach)(hk_heap *h);
    void (*release)(hk_heap *h);
};

extern const struct track_ops track_uffd_ops, track_mprotect_ops;
int track_uffd_supported(void);
int track_mprotect_reassert(int undo);

/* tag_slot_at -- the slot holding a unit's newest copy of epoch E or older. */
static inline uint32_t tag_slot_at(uint32_t latest, uint64_t E)
{
    return HK_TAG_EPOCH(latest) <= E ? HK_TAG_SLOT(latest) : !HK_TAG_SLOT(latest);
}

uint64_t state_live_hwm(const hk_heap *h);

/* heap_hwm -- the catalog's high-water mark (a peek handle reads the owner's, as it is now). */
static inline uint64_t heap_hwm(const hk_heap *h)
{
    return h->peek ? state_live_hwm(h) : h->hdr.entries_hwm;
}

/* errors */
int hk_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* crc.c */
uint32_t crc_compute(uint32_t crc, const void *buf, size_t len);
int delta_room(hk_heap *h, uint64_t bytes);
uint32_t crc_copy(void *dst, const void *src, size_t len);
void crc_fence(void);
uint32_t crc_xpow(uint64_t len);
uint32_t crc_append(uint32_t crc_a, uint32_t crc_b, uint32_t xpow_b);

/* state.c */
int state_load(hk_heap *h);
void state_init(struct hk_state st[HK_NSTATE]);
const struct hk_record *state_record(hk_heap *h, uint64_t epoch);
int state_write_record(hk_heap *h, struct hk_record *r);
int state_kill_record(hk_heap *h, uint64_t epoch);
int state_write_header(hk_heap *h);
void state_note(hk_heap *h, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t state_unit_hash(uint64_t idx, uint64_t u, uint32_t slot, uint32_t crc);
int state_alive_at(const struct hk_entry *e, uint64_t epoch);
uint64_t state_entry_term(hk_heap *h, uint32_t idx, uint64_t epoch, uint64_t *newer);
int state_check(hk_heap *h, uint64_t epoch);

/* persist.c */
int persist_map_file(hk_heap *h, uint8_t *at, size_t len);
void persist_flush(hk_heap *h, const void *addr, size_t len);
int persist_drain(hk_heap *h);
void persist_populate(hk_heap *h, void *addr, size_t len);
void persist_populate_now(hk_heap *h, void *addr, size_t len);
void persist_map_in(hk_heap *h, void *addr, size_t len);
void persist_warm(hk_heap *h);
void persist_free_cold(hk_heap *h);
double persist_now(void);
void persist_delay(double seconds);

/* alias.c */
#define ALIAS_UFFD_CLASSES 0x3cu   /* uffd: views for 256..2048 B; 64 and 128 B are compared (ckpt.c) */
#define ALIAS_ALL_CLASSES  0x3fu   /* mprotect: a fault names one object in every sub-page class */

/* alias_viewed -- does class cls have a view per slot? */
static inline int alias_viewed(const hk_heap *h, unsigned cls)
{
    return cls < HK_PAGE_CLASS && ((h->viewed >> cls) & 1);
}

int alias_reserve(hk_heap *h, size_t file_len);
int alias_map_views(hk_heap *h, int private_copy);
void alias_release(hk_heap *h);
uint32_t alias_view_of(const hk_heap *h, unsigned cls, uint32_t slot);
void alias_unit_of(const hk_heap *h, uint32_t view, unsigned *cls, uint32_t *slot);
void alias_view_span(const hk_heap *h, uint32_t view, uint64_t *lo, uint64_t *hi);

/* heap.c */
extern const uint32_t heap_class_size[HK_NCLASSES];
uint64_t heap_units(const struct hk_entry *e);
void heap_unit_place(const hk_heap *h, const struct hk_entry *e, uint64_t u, uint64_t *off, uint32_t *len);
struct hk_tag *heap_tag(hk_heap *h, struct hk_entry *e, uint64_t u);
uint32_t heap_entry_crc(const struct hk_entry *e);
int heap_entry_sane(const hk_heap *h, const struct hk_entry *e);
int heap_object_span(hk_heap *h, uint64_t index, uint64_t obj, uint64_t *off, uint64_t *first_unit,
                     uint64_t *units);
void heap_release_entry(hk_heap *h, uint32_t idx);
int heap_page_put_only(const hk_heap *h, uint64_t page);
int vec_push32(struct u32vec *v, uint32_t x);
int vec_push_unit(struct unitvec *v, const struct unit *u);

/* alloc.c */
int alloc_space(hk_heap *h, uint32_t idx, unsigned cls, uint64_t count, uint64_t npages, uint64_t units,
                int64_t *first, uint32_t *slot, int64_t *tags);
void alloc_space_free(hk_heap *h, struct hk_entry *e);
int alloc_wipe(hk_heap *h, struct hk_entry *e);
int alloc_rebuild(hk_heap *h);
int alloc_dram(hk_heap *h);
void alloc_free_dram(hk_heap *h);
int alloc_check_zero(hk_heap *h, uint64_t off, uint64_t len);
int alloc_entry_is_zero(const struct hk_entry *e);

/* par.c */
#define PAR_MAX 8
int par_run(unsigned n, int (*fn)(void *ctx, unsigned part, unsigned nparts), void *ctx);
unsigned par_parts(const hk_heap *h, uint64_t work, uint64_t grain);

/* ckpt.c */
int ckpt_mark_unit(hk_heap *h, uint32_t idx, uint64_t u);
int ckpt_start(hk_heap *h, uint32_t meta_len);
int ckpt_finish(hk_heap *h, uint64_t n, const char *meta, uint32_t meta_len, double t0, uint64_t *epoch);
int ckpt_seal(hk_heap *h);
void ckpt_unexpose(hk_heap *h, uint32_t index);
int ckpt_scan(hk_heap *h, uint64_t epoch, int flags, uint64_t *checked);
enum { CKPT_SHADOW = 1, CKPT_WORKING = 2, CKPT_REPAIR = 4 };

#endif
