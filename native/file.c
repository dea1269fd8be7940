/* file.c -- the heap file: create it, open it (check, lock, map, rebuild the allocator,
 * arm the tracker), close it cleanly, drop it as a crash would, describe it. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "internal.h"

#define FILE_MAX_OPEN 256
static hk_heap *file_open_heaps[FILE_MAX_OPEN];   /* for the fork handler; changed with the GIL held */
static pthread_once_t file_atfork_once = PTHREAD_ONCE_INIT;

/* file_after_fork -- in a forked child every open heap becomes a detached copy-on-write view:
 * the child's writes never reach the parent's heap, and nothing the child does (exit, close,
 * a `with` block) unlocks, marks clean or writes the parent's file. */
static void file_after_fork(void)
{
    for (int i = 0; i < FILE_MAX_OPEN; i++) {
        hk_heap *h = file_open_heaps[i];
        if (!h || h->closed)
            continue;
        if (!h->peek)
            alias_map_views(h, 1);
        h->closed = 1;   /* every core entry point refuses a closed heap */
        h->forked = 1;
        close(h->fd);    /* the parent's descriptor keeps the lock: only an explicit unlock would drop it */
        h->fd = -1;
        file_open_heaps[i] = NULL;
    }
}

static void file_install_atfork(void)
{
    pthread_atfork(NULL, NULL, file_after_fork);
}

/* file_register -- remember an open heap (or forget it), for the fork handler. */
static void file_register(hk_heap *h, int on)
{
    pthread_once(&file_atfork_once, file_install_atfork);
    for (int i = 0; i < FILE_MAX_OPEN; i++)
        if (on ? file_open_heaps[i] == NULL : file_open_heaps[i] == h) {
            file_open_heaps[i] = on ? h : NULL;
            return;
        }
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
    sb.off_catalog = (HK_SUPER_TWIN + 1) * HK_PAGE;
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
    static struct hk_state st[HK_NSTATE];
    state_init(st);
    int rc = 0;
    if (o->preallocate && (rc = posix_fallocate(fd, 0, (off_t)sb.file_size)) != 0)
        rc = hk_fail(rc, "%s: cannot reserve %lu bytes for the heap: %s", path, (unsigned long)sb.file_size,
                     strerror(rc));
    else if (ftruncate(fd, (off_t)sb.file_size) != 0 || pwrite(fd, &sb, sizeof sb, 0) != (ssize_t)sizeof sb ||
             pwrite(fd, st, sizeof st, HK_PAGE) != (ssize_t)sizeof st ||
             pwrite(fd, &sb, sizeof sb, HK_SUPER_TWIN * HK_PAGE) != (ssize_t)sizeof sb || fsync(fd) != 0)
        rc = hk_fail(errno ? errno : EIO, "%s: cannot write the new heap: %s", path, strerror(errno ? errno : EIO));
    close(fd);
    if (rc)
        unlink(path);
    return rc;
}

/* file_super_ok -- is this superblock copy intact and of a geometry this build can map? */
static int file_super_ok(const struct hk_super *sb)
{
    if (sb->magic != HK_MAGIC || sb->major != HK_MAJOR || sb->crc != crc_compute(0, sb, offsetof(struct hk_super, crc)))
        return 0;
    uint64_t cat = (sb->max_entries * sizeof(struct hk_entry) + HK_PAGE - 1) / HK_PAGE * HK_PAGE;
    return sb->page_size == HK_PAGE && sb->entry_size == sizeof(struct hk_entry) && sb->npages &&
           sb->npages <= 0xfffffff0ull && sb->capacity == sb->npages * HK_PAGE && sb->max_entries &&
           sb->max_entries <= 0xfffffff0ull && sb->off_catalog == (HK_SUPER_TWIN + 1) * HK_PAGE &&
           sb->off_data == sb->off_catalog + cat && sb->off_shadow[0] == sb->off_data + sb->capacity &&
           sb->off_shadow[1] == sb->off_shadow[0] + sb->capacity && sb->file_size == sb->off_shadow[1] + sb->capacity;
}

/* file_check_super -- read the superblock from its intact copy (page 0, else its twin);
 * refuse files that are not heaps of this format.  *twin says the twin stood in. */
static int file_check_super(const char *path, int fd, struct hk_super *sb, int *twin)
{
    struct stat stt;
    struct hk_super alt;
    if (fstat(fd, &stt) != 0)
        return hk_fail(errno, "%s: stat failed: %s", path, strerror(errno));
    ssize_t n = pread(fd, sb, sizeof *sb, 0), m = pread(fd, &alt, sizeof alt, HK_SUPER_TWIN * HK_PAGE);
    if (n < 0 || m < 0)
        return hk_fail(errno, "%s: read failed: %s", path, strerror(errno));
    if (n < 8 || sb->magic != HK_MAGIC)
        if (m < 8 || alt.magic != HK_MAGIC)
            return hk_fail(EBADMSG, "%s: not an hpcckpt heap (bad magic)", path);
    if (n >= 16 && sb->magic == HK_MAGIC && sb->major != HK_MAJOR)
        return hk_fail(EPROTO, "%s: heap format version %u.%u was written by another hpcckpt; this one reads "
                       "format %d: restore it from an export, or remove it and start afresh", path, sb->major,
                       sb->minor, HK_MAJOR);
    *twin = !(n == (ssize_t)sizeof *sb && file_super_ok(sb));
    if (*twin && m == (ssize_t)sizeof alt && file_super_ok(&alt))
        *sb = alt;
    else if (*twin)
        return hk_fail(EBADMSG, "%s: %s (both copies, pages 0 and %d)", path,
                       n < (ssize_t)sizeof *sb ? "truncated heap: no whole superblock" : "superblock is corrupt",
                       HK_SUPER_TWIN);
    if ((uint64_t)stt.st_size < sb->file_size)
        return hk_fail(EBADMSG, "%s: truncated heap (%ld of %lu bytes)", path, (long)stt.st_size,
                       (unsigned long)sb->file_size);
    return 0;
}

/* file_set_tracker -- choose the tracker (before the views are mapped). */
static int file_set_tracker(hk_heap *h, int tracker)
{
    h->tracker = tracker;
    h->viewed = tracker == HK_TRACK_MPROTECT ? ALIAS_ALL_CLASSES : tracker == HK_TRACK_UFFD ? ALIAS_UFFD_CLASSES : 0;
    h->ops = NULL;
    if (tracker == HK_TRACK_UFFD || (tracker == HK_TRACK_PAGE && track_uffd_supported()))
        h->ops = &track_uffd_ops;
    else if (tracker == HK_TRACK_MPROTECT || tracker == HK_TRACK_PAGE)
        h->ops = &track_mprotect_ops;
    return 0;
}

/* heap_reassert_handler -- keep the mprotect tracker's SIGSEGV handler in front of handlers
 * installed after it (undo: after such a handler was removed again). */
int heap_reassert_handler(int undo)
{
    int rc = track_mprotect_reassert(undo);
    return rc ? hk_fail(-rc, "re-installing the SIGSEGV handler failed: %s", strerror(-rc)) : 0;
}

/* heap_uffd_supported -- can tracker='uffd' work on this kernel? */
int heap_uffd_supported(void) { return track_uffd_supported(); }

/* file_check_epochs -- before anything is changed, find the newest epoch whose record
 * matches the catalog and the tags (the last one, else the one before); none: refuse,
 * except read-only, where info and verify report the damage. */
static int file_check_epochs(hk_heap *h)
{
    h->good_epoch = -1;
    int rc = state_check(h, h->prepared);
    if (!rc)
        h->good_epoch = (int64_t)h->prepared;
    else {
        char why[512];
        snprintf(why, sizeof why, "%s", hk_errmsg());
        if (h->prepared > 0 && state_record(h, h->prepared - 1) && state_check(h, h->prepared - 1) == 0) {
            h->good_epoch = (int64_t)h->prepared - 1;
            state_note(h, "epoch %lu does not match its record, epoch %lu does: restore to %lu",
                       (unsigned long)h->prepared, (unsigned long)h->good_epoch, (unsigned long)h->good_epoch);
        } else if (!h->readonly) {
            return hk_fail(EBADMSG, "%s", why);
        } else {
            snprintf(h->damage, sizeof h->damage, "%s", why);
        }
    }
    const struct hk_record *r = h->good_epoch > 0 ? state_record(h, (uint64_t)h->good_epoch) : NULL;
    h->digest = r ? r->digest : 0;
    h->units = r ? r->units : 0;
    return 0;
}

/* heap_open -- map an existing heap and rebuild the allocator; no recovery here
 * (ckpt_recover restores a committed epoch; the caller decides which). */
int heap_open(const char *path, int tracker, const char *job, int32_t rank, int32_t world, hk_heap **out)
{
    hk_heap *h = calloc(1, sizeof *h);
    if (!h)
        return hk_fail(ENOMEM, "out of memory");
    snprintf(h->path, sizeof h->path, "%s", path);
    h->peek = tracker == HK_TRACK_PEEK;
    h->readonly = tracker == HK_TRACK_NONE || h->peek;
    if (h->peek)
        tracker = HK_TRACK_NONE;
    h->fd = open(path, (h->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (h->fd < 0) {
        int rc = hk_fail(errno, "%s: cannot open: %s", path, strerror(errno));
        free(h);
        return rc;
    }
    struct hk_super sb;
    int twin = 0, rc = file_check_super(path, h->fd, &sb, &twin);
    if (!rc && ((job && strncmp(job, sb.job, HK_JOB_MAX) != 0) || (rank >= 0 && rank != sb.rank) ||
                (world >= 0 && world != sb.world_size)))
        rc = hk_fail(ENOTUNIQ, "%s: heap belongs to job '%.63s', rank %d of %d, not job '%s', rank %d of %d; use "
                     "another root or name, or remove it", path, sb.job, sb.rank, sb.world_size,
                     job ? job : sb.job, rank >= 0 ? rank : sb.rank, world >= 0 ? world : sb.world_size);
    if (!rc && !h->peek && flock(h->fd, (h->readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0)
        rc = errno == EWOULDBLOCK ? hk_fail(EBUSY, "%s: heap is open in another process", path)
                                  : hk_fail(errno, "%s: flock failed: %s", path, strerror(errno));
    h->data_len = sb.capacity;
    file_set_tracker(h, tracker);
    if (!rc)
        rc = alias_reserve(h, sb.file_size);
    if (rc)
        goto fail;
    h->sb = (struct hk_super *)h->raw;
    if (twin) {   /* the superblock's twin stood in: the mapping shows its content */
        state_note(h, "superblock (page 0) was damaged; its twin (page %d) was used", HK_SUPER_TWIN);
        h->sb = (struct hk_super *)(h->raw + HK_SUPER_TWIN * HK_PAGE);
        if (!h->readonly && (pwrite(h->fd, &sb, sizeof sb, 0) != (ssize_t)sizeof sb || fdatasync(h->fd) != 0)) {
            rc = hk_fail(errno ? errno : EIO, "%s: cannot repair the superblock: %s", path, strerror(errno ? errno : EIO));
            goto fail;
        }
    }
    h->st = (struct hk_state *)(h->raw + HK_PAGE);
    h->cat = (struct hk_entry *)(h->raw + h->sb->off_catalog);
    h->data = h->raw + h->sb->off_data;
    if ((rc = state_load(h)))
        goto fail;
    h->committed = h->prepared;
    h->was_clean = h->hdr.clean == 1;
    if (h->peek) {   /* beside a live owner: the catalog is read as it is, nothing rebuilt */
        *out = h;
        return 0;
    }
    if ((rc = file_check_epochs(h)) || (rc = alloc_dram(h)) || (rc = alloc_rebuild(h)) ||
        (rc = alias_map_views(h, 0)))
        goto fail;
    if (h->was_clean && h->good_epoch == (int64_t)h->prepared && !h->readonly) {
        uint64_t n = 0;   /* a clean heap's working data is its last epoch: check it, repair from the copies */
        if ((rc = ckpt_scan(h, h->prepared, CKPT_WORKING | CKPT_REPAIR, &n)))
            goto fail;
    }
    if ((h->sb->flags & HK_FLAG_PREALLOCATED) && !h->readonly)   /* and both copies: no fault in a checkpoint */
        persist_populate_now(h, h->raw + h->sb->off_catalog, h->sb->file_size - h->sb->off_catalog);
    if (h->ops && ((rc = h->ops->attach(h)) || (rc = h->ops->arm(h))))
        goto fail;
    h->all_dirty = 0;   /* working data is the last epoch (checked above) or gets restored */
    if (h->readonly) {
        file_register(h, 1);
        *out = h;
        return 0;
    }
    h->hdr.clean = 0;
    h->hdr.open_pid = (uint64_t)getpid();
    if ((rc = state_write_header(h)))
        goto fail;
    file_register(h, 1);
    *out = h;
    return 0;
fail:
    if (h->ops && h->track)
        h->ops->detach(h);
    if (h->ops && h->ops->release)
        h->ops->release(h);
    alias_release(h);
    alloc_free_dram(h);
    close(h->fd);
    free(h);
    return rc;
}

/* file_detach -- stop tracking, detach the views from the file, drop the file. */
static void file_detach(hk_heap *h)
{
    file_register(h, 0);
    if (h->ops && h->track)
        h->ops->detach(h);
    if (!h->peek)
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
    int sealable = h->prepared == h->committed;   /* else not clean: the next open decides the epoch */
    int rc = sealable ? ckpt_seal(h) : 0;        /* fails: not clean, the next open restores the last epoch */
    if (!rc && msync(h->raw, (size_t)(h->views - h->raw), MS_SYNC) != 0)   /* on DAX: cache flush */
        rc = hk_fail(errno, "%s: msync failed: %s", h->path, strerror(errno));
    if (!rc && !(rc = persist_drain(h)) && sealable) {
        h->hdr.clean = 1;
        h->hdr.open_pid = 0;
        rc = state_write_header(h);
    }
    file_detach(h);
    return rc;
}

/* heap_abandon -- drop the heap as a crash would: nothing more is written. */
int heap_abandon(hk_heap *h)
{
    if (!h->closed)
        file_detach(h);
    return 0;
}

/* heap_release -- unmap the reservation and free the DRAM state. */
void heap_release(hk_heap *h)
{
    if (!h)
        return;
    heap_abandon(h);
    if (h->ops && h->ops->release)
        h->ops->release(h);
    alias_release(h);
    alloc_free_dram(h);
    free(h);
}

/* heap_progress -- how far the long call running now is. */
void heap_progress(hk_heap *h, uint64_t *done, uint64_t *total)
{
    *done = atomic_load(&h->prog_done);
    *total = atomic_load(&h->prog_total);
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
    o->entries_hwm = heap_hwm(h);
    o->entries_pending = h->pending.n;
    o->good_epoch = h->good_epoch;
    o->repairs = h->repairs;
    snprintf(o->note, sizeof o->note, "%s", h->repairs ? h->note : "");
    snprintf(o->damage, sizeof o->damage, "%s", h->damage);
    o->nviews = h->nviews;
    o->va_bytes = h->va_len;
    o->va_base = h->va;
    o->off_data = h->sb->off_data;
    o->views_offset = (uint64_t)(h->views - h->va);
    return 0;
}
