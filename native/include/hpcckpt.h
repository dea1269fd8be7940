/* hpcckpt.h -- the C core's whole API: persistent heap, allocator, trackers,
 * checkpoints.  No Python, no MPI.  Every function returning int gives 0 or a
 * negative errno; hk_errmsg() then says what went wrong in words. */
#ifndef HPCCKPT_H
#define HPCCKPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hk_heap hk_heap;

/* HK_TRACK_NONE opens read-only (shared lock); HK_TRACK_PEEK opens read-only without a lock and
 * without the allocator, beside a live owner: only lookups and ckpt_read_epoch of committed copies. */
enum hk_tracker { HK_TRACK_UFFD = 0, HK_TRACK_MPROTECT, HK_TRACK_PAGE, HK_TRACK_HASH, HK_TRACK_FULL,
                  HK_TRACK_NONE, HK_TRACK_PEEK };

/* Crash points for tests: the process SIGKILLs itself there. */
enum hk_crash { HK_CRASH_NONE = 0, HK_CRASH_BEFORE_COPY, HK_CRASH_MID_COPY, HK_CRASH_AFTER_COPY,
                HK_CRASH_AFTER_PREPARE, HK_CRASH_MID_RESTORE };

struct hk_create_opts {
    uint64_t capacity;      /* data bytes (rounded up to pages) */
    uint64_t max_entries;   /* catalog entries */
    const char *job;
    int32_t rank, world_size;
    int preallocate;        /* reserve all file space now: ENOSPC at create, never SIGBUS later */
};

/* hk_desc -- what an object is: filled by the caller at alloc, by the core at lookup. */
struct hk_desc {
    const char *name;
    const char *dtype;
    uint32_t dtype_len;
    uint32_t ndim;
    uint64_t shape[8];
    uint64_t obj_size;      /* bytes per object */
    uint64_t count;         /* 1 for an array, n for a pool */
    int kind;               /* 1 array, 2 pool, 3 table (count 64-byte units, a multiple of 64) */
};

struct hk_info {
    uint32_t major, minor, page_size, tracker;
    uint64_t capacity, npages, max_entries, file_size;
    int32_t rank, world_size;
    char job[64];
    uint64_t prepared;      /* newest valid epoch record (0: none) */
    uint64_t committed;
    int was_clean;          /* the previous process closed the heap */
    int dax;                /* MAP_SYNC works: flushes are clwb + sfence */
    uint64_t pages_used, pages_free, entries_live, entries_hwm, nviews, va_bytes;
    uint64_t entries_pending;          /* freed in the open epoch: released (wiped) at its commit */
    uint64_t off_data, views_offset;   /* data area in the file; views in the buffer */
    int64_t good_epoch;     /* newest epoch whose record matches catalog and tags (-1: none) */
    uint64_t repairs;       /* damaged copies replaced by their intact twins, data restored from copies */
    char note[256];         /* the latest repair, in words */
    char damage[512];       /* read-only open of a damaged heap: what is wrong */
    void *va_base;
};

struct hk_stats {
    uint64_t epoch, objects_dirty, units_dirty, bytes_dirty, bytes_copied, bytes_meta;
    uint64_t bytes_page_baseline, pages_dirty, views_degraded, faults;
    uint64_t copy_threads;              /* threads the copy ran on */
    double t_scan, t_copy, t_flush, t_commit, t_nvm_delay;
};

const char *hk_errmsg(void);

int heap_create(const char *path, const struct hk_create_opts *opts);
/* heap_open -- job NULL / rank or world_size < 0: not checked; a mismatch is refused before any write
 * with ENOTUNIQ (kept apart from EACCES, which is the file system's "permission denied"). */
int heap_open(const char *path, int tracker, const char *job, int32_t rank, int32_t world_size, hk_heap **out);
int heap_close(hk_heap *h);                 /* durable, marked clean, views detached */
int heap_abandon(hk_heap *h);               /* like a crash: nothing more written */
void heap_release(hk_heap *h);              /* unmap everything; after close/abandon */
int heap_info(hk_heap *h, struct hk_info *out);
/* heap_progress -- how far the long call running now in another thread is (prepare, recover,
 * verify): done of total steps; safe to call at any time. */
void heap_progress(hk_heap *h, uint64_t *done, uint64_t *total);
int heap_alloc(hk_heap *h, const struct hk_desc *d, uint64_t *index);
int heap_free(hk_heap *h, uint64_t index);
int heap_put_only(hk_heap *h, uint64_t index);    /* written only through ckpt_write: not watched */
int heap_lookup(hk_heap *h, uint64_t index, struct hk_desc *d, char *name, char *dtype);
int64_t heap_next_live(hk_heap *h, uint64_t from);
void *heap_addr(hk_heap *h, uint64_t index, uint64_t obj);
/* heap_read / ckpt_write -- copy objects objs[0..n) of an entry out to / in from a packed
 * buffer; ckpt_write goes around the tracker and marks the objects dirty itself. */
int heap_read(hk_heap *h, uint64_t index, const uint64_t *objs, size_t n, void *dst, size_t dst_len);
int ckpt_write(hk_heap *h, uint64_t index, const uint64_t *objs, size_t n, const void *src, size_t src_len);
/* heap_fill -- len bytes of file fd at `at` into a new entry's objects, rows of `row` bytes
 * at bytes byte_off, byte_off + stride, ... (restore from an export), by pread and pwrite;
 * *crc is their CRC32C; heap_fill_bytes does the same from memory. */
int heap_fill(hk_heap *h, uint64_t index, uint64_t byte_off, uint64_t row, uint64_t stride, int fd, uint64_t at,
              uint64_t len, uint32_t *crc);
int heap_fill_bytes(hk_heap *h, uint64_t index, uint64_t byte_off, uint64_t row, uint64_t stride, const void *src,
                    uint64_t len);
int heap_uffd_supported(void);
/* heap_reassert_handler -- the mprotect tracker's SIGSEGV handler back in front (after another was
 * installed); undo: after that one was removed again.  Called around faulthandler.enable/disable. */
int heap_reassert_handler(int undo);

int ckpt_prepare(hk_heap *h, const char *meta, uint32_t meta_len, uint64_t *epoch);
int ckpt_commit(hk_heap *h);
/* ckpt_expose -- system calls may write into this object (mprotect trackers: its pages stay
 * writable and it is copied whole at every checkpoint; other trackers: nothing to do). */
int ckpt_expose(hk_heap *h, uint64_t index);
int ckpt_withdraw(hk_heap *h);
int ckpt_recover(hk_heap *h, uint64_t epoch);
/* ckpt_read_epoch -- units [u0, u1) of an entry as committed at `epoch`, packed as in the object,
 * every unit checked against its CRC; *crc (may be NULL) is the CRC32C of the bytes copied.
 * Works on read-only and peek handles. */
int ckpt_read_epoch(hk_heap *h, uint64_t index, uint64_t epoch, uint64_t u0, uint64_t u1, void *dst,
                    size_t dst_len, uint32_t *crc);
/* ckpt_rebase -- a fresh heap (nothing ever prepared) continues a job at epoch E: its next
 * checkpoint is E+1 (used when a job restarts from an export of epoch E). */
int ckpt_rebase(hk_heap *h, uint64_t epoch);
/* the partner level: the units of the prepared epoch (all: every unit of it), and their application to a mirror */
int delta_size(hk_heap *h, int all, uint64_t *units, uint64_t *bytes);
int delta_read(hk_heap *h, int all, uint32_t *entries, uint64_t *units, uint64_t n, uint8_t *data, uint64_t bytes,
               uint32_t *crc);
int delta_pack(const uint32_t *entries, const uint64_t *units, size_t n, uint32_t *groups, size_t *ngroups,
               uint8_t *gaps, size_t *gaps_len);
int delta_unpack(const uint32_t *groups, size_t ngroups, const uint8_t *gaps, size_t gaps_len, uint32_t *entries,
                 uint64_t *units, size_t n);
int delta_apply(hk_heap *h, const uint32_t *map, size_t map_len, const uint32_t *entries, const uint64_t *units,
                size_t n, const uint8_t *data, size_t len, uint32_t crc);
int delta_store(hk_heap *h, const uint32_t *map, size_t map_len, const uint32_t *entries, const uint64_t *units,
                size_t n, const uint8_t *data, size_t len, uint32_t crc, const char *meta, uint32_t meta_len,
                uint64_t *epoch);
uint32_t crc_compute(uint32_t crc, const void *buf, size_t len);   /* CRC32C */
uint32_t crc_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);   /* CRC32C of A||B */
int ckpt_meta(hk_heap *h, char *buf, uint32_t cap, uint32_t *len);
int ckpt_stats(hk_heap *h, struct hk_stats *out);
int ckpt_verify(hk_heap *h, uint64_t *units_checked);
void ckpt_set_crash(hk_heap *h, int point, uint64_t epoch);
void ckpt_set_nvm(hk_heap *h, double write_gbps, double flush_latency_ns);
/* ckpt_set_threads -- threads that may copy one checkpoint (1: this one only). */
void ckpt_set_threads(hk_heap *h, int threads);
/* delta_keep -- pack the units each prepare copies, for the partner's delta (on/off). */
void delta_keep(hk_heap *h, int on);

#ifdef __cplusplus
}
#endif
#endif
