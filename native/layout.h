/* layout.h -- the on-media structures of a heap file, and nothing else.
 *
 * File layout (all offsets page aligned, fixed at create):
 *
 *   page 0            hk_super       immutable after create, CRC32C protected
 *   pages 1-4         hk_state       epoch record slots 0, 1, then their twins; the
 *                                    header and its twin in pages 1 and 3
 *   page 5            hk_super       the superblock's twin
 *   catalog           hk_entry[max_entries]
 *   data              npages working pages (what the program reads and writes)
 *   shadow A, B       npages each: the two checkpoint copies of every unit
 *
 * A "unit" is what is tracked and copied on its own: one object of a sub-page
 * size class, or one page of a whole-page object.  Unit (page p, slot j) of
 * class size s sits at data + p*4096 + j*s; its shadow copies sit at the same
 * offset inside shadow A and shadow B.  Every unit has an hk_tag.
 *
 * Integrity: what recovery cannot do without (superblock, header, epoch records) is
 * kept twice, pages apart, each copy with its CRC; the newest intact copy wins and
 * repairs the other.  Each epoch record carries a digest of the epoch's live units:
 * the XOR over them of a hash of (entry, unit, slot, CRC of that slot), so a damaged
 * tag, born/dead epoch or high-water mark is caught before anything is restored.
 */
#ifndef HPCCKPT_LAYOUT_H
#define HPCCKPT_LAYOUT_H

#include <stdint.h>

#define HK_MAGIC          0x54504b4343504848ull /* "HHPCCKPT" little endian */
#define HK_STATE_MAGIC    0x4554415453434b48ull /* "HKCSTATE" */
#define HK_HEADER_MAGIC   0x5244484b43504848ull /* "HHPCKHDR" */
#define HK_MAJOR          2
#define HK_MINOR          0
#define HK_PAGE           4096u
#define HK_NCLASSES       7      /* 64..2048 sub-page, then whole pages */
#define HK_PAGE_CLASS     6
#define HK_NAME_MAX       64     /* including the terminating NUL */
#define HK_DTYPE_MAX      304
#define HK_NDIM_MAX       8
#define HK_META_MAX       1536
#define HK_JOB_MAX        64
#define HK_FLAG_PREALLOCATED 1u  /* file space reserved at create; catalog and data populated at open */
#define HK_NSTATE         4      /* state pages */
#define HK_SUPER_TWIN     (1 + HK_NSTATE)   /* page of the superblock's twin */

/* hk_super -- identity and geometry; written once at create. */
struct hk_super {
    uint64_t magic;
    uint32_t major, minor;
    uint32_t page_size;
    uint32_t entry_size;
    uint64_t capacity;        /* data bytes = npages * page_size */
    uint64_t npages;
    uint64_t max_entries;
    uint64_t off_catalog, off_data, off_shadow[2];
    uint64_t file_size;
    uint64_t created_ns;
    int32_t  rank, world_size;
    char     job[HK_JOB_MAX];
    uint32_t flags;           /* HK_FLAG_* */
    uint8_t  pad[4096 - 172 - 4];
    uint32_t crc;             /* CRC32C of everything before it */
};

/* hk_record -- one epoch record; "prepared = n" is record slot (n & 1) valid with epoch n. */
struct hk_record {
    uint64_t magic;
    uint64_t epoch;
    uint64_t time_ns;
    uint64_t entries_hwm;     /* catalog high-water mark at this epoch */
    uint64_t digest;          /* XOR of the unit hashes of the epoch's live units */
    uint64_t units;           /* live units at this epoch */
    uint32_t meta_len;
    char     meta[HK_META_MAX];
    uint32_t crc;             /* CRC32C of everything before it */
};

/* hk_header -- the mutable header words; of two intact copies the higher seq wins. */
struct hk_header {
    uint64_t magic;
    uint64_t seq;
    uint64_t entries_hwm;     /* live high-water mark; durable at checkpoint/close */
    uint64_t clean;           /* 1 after a clean close, 0 while open */
    uint64_t open_pid;
    uint32_t reserved;
    uint32_t crc;             /* CRC32C of everything before it */
};

/* hk_state -- one state page: an epoch record copy, and (pages 1 and 3) a header copy. */
struct hk_state {
    struct hk_record rec;
    uint8_t  pad[2048 - sizeof(struct hk_record)];
    struct hk_header hdr;
    uint8_t  pad2[2048 - sizeof(struct hk_header)];
};

/* Entry kinds. */
/* A table (HK_KIND_TABLE) is laid out as a pool of 64-byte units on whole pages of its own,
 * so its bytes are contiguous in the data area: a 64-byte header (length, ...) then the rows.
 * Its units are compared with their committed copies (ckpt.c): only changed ones are copied. */
enum { HK_KIND_FREE = 0, HK_KIND_ARRAY = 1, HK_KIND_POOL = 2, HK_KIND_TABLE = 3, HK_KIND_MAX = 3 };

/* hk_tag -- where the newest copy of a unit is, and the checksums of both copies.
 * `latest` = epoch of the newest copy | slot << 31; 0 = never copied.  A copy is
 * written data first, then crc[slot], then `latest` (one aligned 4-byte store). */
struct hk_tag {
    uint32_t latest;
    uint32_t crc[2];
};

#define HK_TAG_EPOCH(l) ((l) & 0x7fffffffu)
#define HK_TAG_SLOT(l)  ((l) >> 31)

/* hk_entry -- one catalog entry (512 bytes).  `epochs` packs born (low 32) and
 * dead (high 32, 0 = alive) so that one aligned store changes both.  `crc`
 * covers bytes [12, 192) and the dtype_len bytes of `dtype`; it is written
 * once, at allocation.  The inline tag is not covered: it changes per copy. */
struct hk_entry {
    uint64_t epochs;
    uint32_t crc;
    uint16_t kind;
    uint8_t  cls;             /* 0..5 sub-page class, 6 whole pages */
    uint8_t  ndim;
    uint64_t first_page;      /* run start, or the page of a single small object */
    uint64_t npages;          /* pages of the run (single small object: 0) */
    uint64_t count;           /* objects: 1 for arrays */
    uint64_t obj_size;        /* bytes per object */
    uint64_t tag_page;        /* first page of the tag run (multi-unit objects) */
    uint32_t slot;            /* slot of a single small object */
    uint16_t dtype_len;
    uint16_t reserved;
    uint64_t shape[HK_NDIM_MAX];
    char     name[HK_NAME_MAX];
    struct hk_tag tag;        /* inline tag of a single-unit object */
    uint32_t tag_pad;
    char     dtype[HK_DTYPE_MAX];
};

#define HK_EPOCH_BORN(e) ((uint32_t)(e))
#define HK_EPOCH_DEAD(e) ((uint32_t)((e) >> 32))
#define HK_EPOCHS(b, d)  ((uint64_t)(b) | ((uint64_t)(d) << 32))

_Static_assert(sizeof(struct hk_super) == 4096, "hk_super is one page");
_Static_assert(sizeof(struct hk_state) == 4096, "hk_state is one page");
_Static_assert(sizeof(struct hk_entry) == 512, "hk_entry is 512 bytes");
_Static_assert(sizeof(struct hk_tag) == 12, "hk_tag is 12 bytes");

#endif
