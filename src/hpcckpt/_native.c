/* _native.c -- thin CPython binding of the C core: ints, tuples, bytes and one
 * buffer (the heap's address range); errors become OSError(errno, message).
 * Policy, names and error wording for users live in Python (hpcckpt/heap.py).
 * Each nh_* method wraps the core function of the same name; the method table
 * at the bottom documents its Python signature. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "hpcckpt.h"

typedef struct {
    PyObject_HEAD
    hk_heap *h;
    struct hk_info info;    /* geometry captured at open; stays valid after close */
    Py_ssize_t exports;
} NativeHeap;

/* raise_rc -- OSError from a negative errno and the core's message. */
static PyObject *raise_rc(int rc)
{
    PyObject *args = Py_BuildValue("(is)", -rc, hk_errmsg());
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* CALL -- run a core call, raising on failure, with the GIL held: the core is not thread-safe. */
#define CALL(expr)                      \
    do {                                \
        int rc_ = (expr);               \
        if (rc_ < 0)                    \
            return raise_rc(rc_);       \
    } while (0)

/* CALL_FREE -- CALL with the GIL released, for the long calls (prepare, recover, verify): the
 * Python layer's heap lock keeps close, allocation and bulk writes out meanwhile. */
#define CALL_FREE(expr)                 \
    do {                                \
        int rc_;                        \
        Py_BEGIN_ALLOW_THREADS          \
        rc_ = (expr);                   \
        Py_END_ALLOW_THREADS            \
        if (rc_ < 0)                    \
            return raise_rc(rc_);       \
    } while (0)

static int live(NativeHeap *self)
{
    if (!self->h) {
        PyErr_SetString(PyExc_ValueError, "native heap already released");
        return 0;
    }
    return 1;
}

/* nh_dealloc -- unmap only when no buffer (numpy array) still points in. */
static void nh_dealloc(NativeHeap *self)
{
    if (self->h) {
        heap_abandon(self->h);   /* never closed: like a crash, nothing written */
        heap_release(self->h);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int nh_getbuffer(NativeHeap *self, Py_buffer *view, int flags)
{
    if (!live(self))
        return -1;
    int rc = PyBuffer_FillInfo(view, (PyObject *)self, self->info.va_base, (Py_ssize_t)self->info.va_bytes,
                               self->info.tracker == HK_TRACK_NONE, flags);
    if (rc == 0)
        self->exports++;
    return rc;
}

static void nh_releasebuffer(NativeHeap *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

static PyBufferProcs nh_as_buffer = {(getbufferproc)nh_getbuffer, (releasebufferproc)nh_releasebuffer};

static PyObject *nh_close(NativeHeap *self, PyObject *unused)
{
    if (!live(self))
        return NULL;
    CALL(heap_close(self->h));
    Py_RETURN_NONE;
}

static PyObject *nh_abandon(NativeHeap *self, PyObject *unused)
{
    if (!live(self))
        return NULL;
    heap_abandon(self->h);
    Py_RETURN_NONE;
}

static PyObject *nh_info(NativeHeap *self, PyObject *unused)
{
    if (!live(self))
        return NULL;
    struct hk_info i;
    CALL(heap_info(self->h, &i));
    return Py_BuildValue(
        "{s:I,s:I,s:I,s:I,s:K,s:K,s:K,s:K,s:i,s:i,s:s,s:K,s:K,s:O,s:O,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:K,s:K,s:K,s:L,s:K,s:s,s:s}",
        "major", i.major, "minor", i.minor, "page_size", i.page_size, "tracker", i.tracker, "capacity",
        i.capacity, "npages", i.npages, "max_entries", i.max_entries, "file_size", i.file_size, "rank", i.rank,
        "world_size", i.world_size, "job", i.job, "prepared", i.prepared, "committed", i.committed, "was_clean",
        i.was_clean ? Py_True : Py_False, "dax", i.dax ? Py_True : Py_False, "pages_used", i.pages_used,
        "pages_free", i.pages_free, "entries_live", i.entries_live, "entries_hwm", i.entries_hwm, "nviews",
        i.nviews, "va_bytes", i.va_bytes, "va_base", (unsigned long long)(uintptr_t)i.va_base, "exports",
        self->exports, "off_data", i.off_data, "views_offset", i.views_offset, "entries_pending", i.entries_pending,
        "good_epoch", (long long)i.good_epoch, "repairs", i.repairs, "note", i.note, "damage", i.damage);
}

static PyObject *nh_alloc(NativeHeap *self, PyObject *args)
{
    const char *name, *dtype;
    Py_ssize_t dlen;
    PyObject *shape;
    unsigned long long obj_size, count;
    int kind;
    if (!live(self) || !PyArg_ParseTuple(args, "ss#O!KKi", &name, &dtype, &dlen, &PyTuple_Type, &shape, &obj_size,
                                         &count, &kind))
        return NULL;
    struct hk_desc d = {.name = name, .dtype = dtype, .dtype_len = (uint32_t)dlen, .obj_size = obj_size,
                        .count = count, .kind = kind};
    d.ndim = (uint32_t)PyTuple_GET_SIZE(shape);
    for (uint32_t i = 0; i < d.ndim && i < 8; i++) {
        d.shape[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(shape, i));
        if (PyErr_Occurred())
            return NULL;
    }
    uint64_t idx;
    int rc = heap_alloc(self->h, &d, &idx);
    if (rc < 0)
        return raise_rc(rc);
    return PyLong_FromUnsignedLongLong(idx);
}

/* by_index -- a core call on one catalog index (free, expose): None, or the error raised. */
static PyObject *by_index(NativeHeap *self, PyObject *arg, int (*fn)(hk_heap *, uint64_t))
{
    unsigned long long idx = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !live(self))
        return NULL;
    CALL(fn(self->h, idx));
    Py_RETURN_NONE;
}

static PyObject *nh_free(NativeHeap *self, PyObject *arg) { return by_index(self, arg, heap_free); }

static PyObject *nh_expose(NativeHeap *self, PyObject *arg) { return by_index(self, arg, ckpt_expose); }

static PyObject *nh_put_only(NativeHeap *self, PyObject *arg) { return by_index(self, arg, heap_put_only); }

static PyObject *nh_lookup(NativeHeap *self, PyObject *arg)
{
    unsigned long long idx = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !live(self))
        return NULL;
    char name[64], dtype[304];
    struct hk_desc d;
    int rc = heap_lookup(self->h, idx, &d, name, dtype);
    if (rc < 0)
        return raise_rc(rc);
    PyObject *shape = PyTuple_New(d.ndim);
    for (uint32_t i = 0; shape && i < d.ndim; i++)
        PyTuple_SET_ITEM(shape, i, PyLong_FromUnsignedLongLong(d.shape[i]));
    return shape ? Py_BuildValue("(ss#NKKi)", name, dtype, (Py_ssize_t)d.dtype_len, shape, d.obj_size, d.count,
                                 d.kind)
                 : NULL;
}

static PyObject *nh_next_live(NativeHeap *self, PyObject *arg)
{
    unsigned long long from = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !live(self))
        return NULL;
    return PyLong_FromLongLong(heap_next_live(self->h, from));
}

/* nh_offset -- byte offset, inside the exported buffer, of object `obj` of an entry. */
static PyObject *nh_offset(NativeHeap *self, PyObject *args)
{
    unsigned long long idx, obj;
    if (!live(self) || !PyArg_ParseTuple(args, "KK", &idx, &obj))
        return NULL;
    uint8_t *p = heap_addr(self->h, idx, obj);
    if (!p) {
        PyErr_Format(PyExc_IndexError, "no object %llu of catalog entry %llu (heap closed, or out of range)", obj, idx);
        return NULL;
    }
    return PyLong_FromSsize_t((Py_ssize_t)(p - (uint8_t *)self->info.va_base));
}

/* nh_copy -- read (to=1) or write objects: (index, objs: uint64 buffer, data: buffer). */
static PyObject *nh_copy(NativeHeap *self, PyObject *args, int reading)
{
    unsigned long long idx;
    Py_buffer objs, data;
    if (!live(self) || !PyArg_ParseTuple(args, reading ? "Ky*w*" : "Ky*y*", &idx, &objs, &data))
        return NULL;
    size_t n = (size_t)objs.len / sizeof(uint64_t);
    size_t len = (size_t)data.len;
    int rc = reading ? heap_read(self->h, idx, objs.buf, n, data.buf, len)
                     : ckpt_write(self->h, idx, objs.buf, n, data.buf, len);
    PyBuffer_Release(&objs);
    PyBuffer_Release(&data);
    if (rc < 0)
        return raise_rc(rc);
    Py_RETURN_NONE;
}

static PyObject *nh_read(NativeHeap *self, PyObject *args) { return nh_copy(self, args, 1); }
static PyObject *nh_write(NativeHeap *self, PyObject *args) { return nh_copy(self, args, 0); }

static PyObject *nh_prepare(NativeHeap *self, PyObject *arg)
{
    char *meta;
    Py_ssize_t len;
    if (!live(self) || PyBytes_AsStringAndSize(arg, &meta, &len) < 0)
        return NULL;
    uint64_t epoch;
    CALL_FREE(ckpt_prepare(self->h, meta, (uint32_t)len, &epoch));
    return PyLong_FromUnsignedLongLong(epoch);
}

static PyObject *nh_commit(NativeHeap *self, PyObject *unused)
{
    if (!live(self))
        return NULL;
    CALL(ckpt_commit(self->h));
    Py_RETURN_NONE;
}

static PyObject *nh_withdraw(NativeHeap *self, PyObject *unused)
{
    if (!live(self))
        return NULL;
    CALL(ckpt_withdraw(self->h));
    Py_RETURN_NONE;
}

static PyObject *nh_recover(NativeHeap *self, PyObject *arg)
{
    unsigned long long e = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !live(self))
        return NULL;
    CALL_FREE(ckpt_recover(self->h, e));
    Py_RETURN_NONE;
}

/* nh_read_epoch -- (index, epoch, u0, u1, out: writable buffer) -> CRC: committed copies of units [u0, u1). */
static PyObject *nh_read_epoch(NativeHeap *self, PyObject *args)
{
    unsigned long long idx, epoch, u0, u1;
    Py_buffer out;
    if (!live(self) || !PyArg_ParseTuple(args, "KKKKw*", &idx, &epoch, &u0, &u1, &out))
        return NULL;
    uint32_t crc = 0;
    int rc;
    if (self->info.tracker == HK_TRACK_NONE) {   /* read-only or peek: nothing in this process changes it */
        Py_BEGIN_ALLOW_THREADS
        rc = ckpt_read_epoch(self->h, idx, epoch, u0, u1, out.buf, (size_t)out.len, &crc);
        Py_END_ALLOW_THREADS
    } else {
        rc = ckpt_read_epoch(self->h, idx, epoch, u0, u1, out.buf, (size_t)out.len, &crc);
    }
    PyBuffer_Release(&out);
    if (rc < 0)
        return raise_rc(rc);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *nh_rebase(NativeHeap *self, PyObject *arg)
{
    unsigned long long e = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !live(self))
        return NULL;
    CALL(ckpt_rebase(self->h, e));
    Py_RETURN_NONE;
}

/* nh_delta -- delta(all) -> (groups, gaps, data, crc): what the prepared epoch copied (all:
 * every unit of it), each unit checked against its slot's CRC, for a partner: the unit list
 * packed (delta_pack), the bytes, and their CRC32C. */
static PyObject *nh_delta(NativeHeap *self, PyObject *arg)
{
    int all = PyObject_IsTrue(arg);
    uint64_t n = 0, bytes = 0;
    if (all < 0 || !live(self))
        return NULL;
    CALL(delta_size(self->h, all, &n, &bytes));
    uint32_t *e = malloc(n * 4 + 1), crc = 0;
    uint64_t *u = malloc(n * 8 + 1);
    PyObject *g = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 8));
    PyObject *v = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 10));
    PyObject *d = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bytes);
    int rc = 0;
    size_t ng = 0, nv = 0;
    if (e && u && g && v && d) {
        Py_BEGIN_ALLOW_THREADS
        rc = delta_read(self->h, all, e, u, n, (uint8_t *)PyBytes_AS_STRING(d), bytes, &crc);
        if (rc >= 0)
            rc = delta_pack(e, u, n, (uint32_t *)PyBytes_AS_STRING(g), &ng, (uint8_t *)PyBytes_AS_STRING(v), &nv);
        Py_END_ALLOW_THREADS
    }
    free(e);
    free(u);
    if (!e || !u || !g || !v || !d || rc < 0 || _PyBytes_Resize(&g, (Py_ssize_t)(ng * 8)) ||
        _PyBytes_Resize(&v, (Py_ssize_t)nv)) {
        Py_XDECREF(g);
        Py_XDECREF(v);
        Py_XDECREF(d);
        return rc < 0 ? raise_rc(rc) : (PyErr_Occurred() ? NULL : PyErr_NoMemory());
    }
    return Py_BuildValue("NNNk", g, v, d, (unsigned long)crc);
}

/* nh_apply -- apply(map u32, entries u32, units u64, data, crc): a partner's units into this
 * mirror (map: the partner's entry number -> this heap's), checked, marked dirty. */
static PyObject *nh_apply(NativeHeap *self, PyObject *args)
{
    Py_buffer b[4];
    unsigned int crc;
    if (!live(self) || !PyArg_ParseTuple(args, "y*y*y*y*I", &b[0], &b[1], &b[2], &b[3], &crc))
        return NULL;
    size_t n = (size_t)b[1].len / 4;
    int matched = (size_t)b[2].len / 8 == n, rc = 0;
    if (matched) {
        Py_BEGIN_ALLOW_THREADS
        rc = delta_apply(self->h, b[0].buf, (size_t)b[0].len / 4, b[1].buf, b[2].buf, n, b[3].buf, (size_t)b[3].len,
                         crc);
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < 4; i++)
        PyBuffer_Release(&b[i]);
    if (!matched) {
        PyErr_SetString(PyExc_ValueError, "apply: one unit number per entry number");
        return NULL;
    }
    if (rc < 0)
        return raise_rc(rc);
    Py_RETURN_NONE;
}

/* nh_store -- store(map, entries, units, data, crc, meta) -> epoch: a mirror prepares the next
 * epoch straight from a partner's units (delta_store). */
static PyObject *nh_store(NativeHeap *self, PyObject *args)
{
    Py_buffer b[5];
    unsigned int crc;
    uint64_t epoch = 0;
    if (!live(self) || !PyArg_ParseTuple(args, "y*y*y*y*Iy*", &b[0], &b[1], &b[2], &b[3], &crc, &b[4]))
        return NULL;
    size_t n = (size_t)b[1].len / 4;
    int matched = (size_t)b[2].len / 8 == n, rc = 0;
    if (matched) {
        Py_BEGIN_ALLOW_THREADS
        rc = delta_store(self->h, b[0].buf, (size_t)b[0].len / 4, b[1].buf, b[2].buf, n, b[3].buf, (size_t)b[3].len,
                         crc, b[4].buf, (uint32_t)b[4].len, &epoch);
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < 5; i++)
        PyBuffer_Release(&b[i]);
    if (!matched) {
        PyErr_SetString(PyExc_ValueError, "store: one unit number per entry number");
        return NULL;
    }
    if (rc < 0)
        return raise_rc(rc);
    return PyLong_FromUnsignedLongLong(epoch);
}

static PyObject *nh_meta(NativeHeap *self, PyObject *unused)
{
    char buf[2048];
    uint32_t len;
    if (!live(self))
        return NULL;
    CALL(ckpt_meta(self->h, buf, sizeof buf, &len));
    return PyBytes_FromStringAndSize(buf, len);
}

static PyObject *nh_stats(NativeHeap *self, PyObject *unused)
{
    struct hk_stats s;
    if (!live(self))
        return NULL;
    ckpt_stats(self->h, &s);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:d,s:d,s:d,s:d,s:d}", "epoch", s.epoch,
                         "objects_dirty", s.objects_dirty, "units_dirty", s.units_dirty, "bytes_dirty",
                         s.bytes_dirty, "bytes_copied", s.bytes_copied, "bytes_meta", s.bytes_meta,
                         "bytes_page_baseline", s.bytes_page_baseline, "pages_dirty", s.pages_dirty,
                         "views_degraded", s.views_degraded, "faults", s.faults,
                         "copy_threads", s.copy_threads, "t_scan", s.t_scan, "t_copy",
                         s.t_copy, "t_flush", s.t_flush, "t_commit", s.t_commit, "t_nvm_delay", s.t_nvm_delay);
}

/* nh_fill -- (index, byte_off, row, stride, fd, at, len): a file's bytes into a new entry, rows
 * of `row` bytes every `stride`; their CRC32C. */
static PyObject *nh_fill(NativeHeap *self, PyObject *args)
{
    unsigned long long idx, byte_off, row, stride, at, len;
    int fd;
    uint32_t crc = 0;
    if (!live(self) || !PyArg_ParseTuple(args, "KKKKiKK", &idx, &byte_off, &row, &stride, &fd, &at, &len))
        return NULL;
    CALL_FREE(heap_fill(self->h, idx, byte_off, row, stride, fd, at, len, &crc));
    return PyLong_FromUnsignedLong(crc);
}

/* nh_fill_bytes -- (index, byte_off, row, stride, data: buffer): checked bytes into a new entry. */
static PyObject *nh_fill_bytes(NativeHeap *self, PyObject *args)
{
    unsigned long long idx, byte_off, row, stride;
    Py_buffer data;
    if (!live(self) || !PyArg_ParseTuple(args, "KKKKy*", &idx, &byte_off, &row, &stride, &data))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = heap_fill_bytes(self->h, idx, byte_off, row, stride, data.buf, (uint64_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (rc < 0)
        return raise_rc(rc);
    Py_RETURN_NONE;
}

/* nh_keep_delta -- keep_delta(on): pack the units each prepare copies, for delta(False). */
static PyObject *nh_keep_delta(NativeHeap *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0 || !live(self))
        return NULL;
    delta_keep(self->h, on);
    Py_RETURN_NONE;
}

static PyObject *nh_verify(NativeHeap *self, PyObject *unused)
{
    uint64_t n;
    if (!live(self))
        return NULL;
    CALL_FREE(ckpt_verify(self->h, &n));
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *nh_progress(NativeHeap *self, PyObject *unused)
{
    uint64_t done = 0, total = 0;
    if (self->h)
        heap_progress(self->h, &done, &total);
    return Py_BuildValue("KK", (unsigned long long)done, (unsigned long long)total);
}

static PyObject *nh_set_crash(NativeHeap *self, PyObject *args)
{
    int point;
    unsigned long long epoch;
    if (!live(self) || !PyArg_ParseTuple(args, "iK", &point, &epoch))
        return NULL;
    ckpt_set_crash(self->h, point, epoch);
    Py_RETURN_NONE;
}

static PyObject *nh_set_threads(NativeHeap *self, PyObject *args)
{
    int n;
    if (!live(self) || !PyArg_ParseTuple(args, "i", &n))
        return NULL;
    ckpt_set_threads(self->h, n);
    Py_RETURN_NONE;
}

static PyObject *nh_set_nvm(NativeHeap *self, PyObject *args)
{
    double gbps, lat;
    if (!live(self) || !PyArg_ParseTuple(args, "dd", &gbps, &lat))
        return NULL;
    ckpt_set_nvm(self->h, gbps, lat);
    Py_RETURN_NONE;
}

static PyObject *mod_reassert_handler(PyObject *m, PyObject *args)
{
    int undo;
    if (!PyArg_ParseTuple(args, "p", &undo))
        return NULL;
    CALL(heap_reassert_handler(undo));
    Py_RETURN_NONE;
}

static PyMethodDef nh_methods[] = {
    {"close", (PyCFunction)nh_close, METH_NOARGS, "Make durable, mark clean, detach the views."},
    {"abandon", (PyCFunction)nh_abandon, METH_NOARGS, "Detach without writing anything (as a crash would)."},
    {"info", (PyCFunction)nh_info, METH_NOARGS, "Geometry and state as a dict."},
    {"alloc", (PyCFunction)nh_alloc, METH_VARARGS, "alloc(name, dtype, shape, obj_size, count, kind) -> index"},
    {"free", (PyCFunction)nh_free, METH_O, "free(index)"},
    {"expose", (PyCFunction)nh_expose, METH_O, "expose(index): system calls may write into the object"},
    {"put_only", (PyCFunction)nh_put_only, METH_O, "put_only(index): written only through write(): not watched"},
    {"lookup", (PyCFunction)nh_lookup, METH_O, "lookup(index) -> (name, dtype, shape, obj_size, count, kind)"},
    {"next_live", (PyCFunction)nh_next_live, METH_O, "next_live(from) -> index or -1"},
    {"offset", (PyCFunction)nh_offset, METH_VARARGS, "offset(index, obj) -> byte offset in the buffer"},
    {"read", (PyCFunction)nh_read, METH_VARARGS, "read(index, objs: uint64 buffer, out: buffer)"},
    {"fill", (PyCFunction)nh_fill, METH_VARARGS, "fill(index, byte_off, row, stride, fd, at, len) -> crc32c: a file's rows into a new entry"},
    {"fill_bytes", (PyCFunction)nh_fill_bytes, METH_VARARGS, "fill_bytes(index, byte_off, row, stride, data): rows into a new entry"},
    {"write", (PyCFunction)nh_write, METH_VARARGS, "write(index, objs: uint64 buffer, data: buffer), marked dirty"},
    {"prepare", (PyCFunction)nh_prepare, METH_O, "prepare(meta: bytes) -> epoch"},
    {"commit", (PyCFunction)nh_commit, METH_NOARGS, "commit the prepared epoch"},
    {"withdraw", (PyCFunction)nh_withdraw, METH_NOARGS, "withdraw the prepared epoch"},
    {"recover", (PyCFunction)nh_recover, METH_O, "recover(epoch): restore the working area"},
    {"read_epoch", (PyCFunction)nh_read_epoch, METH_VARARGS, "read_epoch(index, epoch, u0, u1, out) -> CRC32C of the bytes: committed copies of units, checked"},
    {"rebase", (PyCFunction)nh_rebase, METH_O, "rebase(epoch): a fresh heap's next checkpoint is epoch+1"},
    {"keep_delta", (PyCFunction)nh_keep_delta, METH_O, "keep_delta(on): pack what each prepare copies, for delta(False)"},
    {"delta", (PyCFunction)nh_delta, METH_O, "delta(all) -> (groups, gaps, data, crc): units of the prepared epoch, checked, packed"},
    {"apply", (PyCFunction)nh_apply, METH_VARARGS, "apply(map, entries, units, data, crc): a partner's units, checked, marked dirty"},
    {"store", (PyCFunction)nh_store, METH_VARARGS, "store(map, entries, units, data, crc, meta) -> epoch: a mirror's next epoch from a partner's units"},
    {"meta", (PyCFunction)nh_meta, METH_NOARGS, "metadata of the newest epoch (bytes)"},
    {"stats", (PyCFunction)nh_stats, METH_NOARGS, "figures of the last prepare"},
    {"progress", (PyCFunction)nh_progress, METH_NOARGS, "(done, total) of the long call running now"},
    {"verify", (PyCFunction)nh_verify, METH_NOARGS, "check every committed copy -> units checked"},
    {"set_crash", (PyCFunction)nh_set_crash, METH_VARARGS, "set_crash(point, epoch): test hook"},
    {"set_nvm", (PyCFunction)nh_set_nvm, METH_VARARGS, "set_nvm(write_gbps, flush_latency_ns)"},
    {"set_threads", (PyCFunction)nh_set_threads, METH_VARARGS, "set_threads(n)"},
    {NULL}};

static PyTypeObject NativeHeapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hpcckpt._native.NativeHeap",
    .tp_basicsize = sizeof(NativeHeap),
    .tp_dealloc = (destructor)nh_dealloc,
    .tp_as_buffer = &nh_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An open heap of the C core; exports its address range as one buffer.",
    .tp_methods = nh_methods,
};

static PyObject *mod_create(PyObject *m, PyObject *args)
{
    const char *path, *job;
    unsigned long long cap, maxe;
    int rank, world, prealloc;
    if (!PyArg_ParseTuple(args, "sKKsiip", &path, &cap, &maxe, &job, &rank, &world, &prealloc))
        return NULL;
    struct hk_create_opts o = {.capacity = cap, .max_entries = maxe, .job = job, .rank = rank, .world_size = world,
                               .preallocate = prealloc};
    CALL(heap_create(path, &o));
    Py_RETURN_NONE;
}

static PyObject *mod_open(PyObject *m, PyObject *args)
{
    const char *path, *job;
    int tracker, rank, world;
    if (!PyArg_ParseTuple(args, "sizii", &path, &tracker, &job, &rank, &world))
        return NULL;
    hk_heap *h;
    CALL(heap_open(path, tracker, job, rank, world, &h));
    NativeHeap *self = PyObject_New(NativeHeap, &NativeHeapType);
    if (!self) {
        heap_abandon(h);
        heap_release(h);
        return NULL;
    }
    self->h = h;
    self->exports = 0;
    heap_info(h, &self->info);
    return (PyObject *)self;
}

/* mod_crc32c -- CRC32C of a buffer, continuing from `crc` (default 0). */
static PyObject *mod_crc32c(PyObject *m, PyObject *args)
{
    Py_buffer b;
    unsigned int crc = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &b, &crc))
        return NULL;
    uint32_t c;
    Py_BEGIN_ALLOW_THREADS
    c = crc_compute(crc, b.buf, (size_t)b.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(c);
}

/* mod_crc32c_combine -- (crc_a, crc_b, len_b) -> CRC32C of A||B. */
static PyObject *mod_crc32c_combine(PyObject *m, PyObject *args)
{
    unsigned int a, b;
    unsigned long long len;
    if (!PyArg_ParseTuple(args, "IIK", &a, &b, &len))
        return NULL;
    return PyLong_FromUnsignedLong(crc_combine(a, b, len));
}

/* mod_crc32c_chunks -- CRC32C of each `chunk`-byte piece of a buffer (the last may be short), as uint32 bytes. */
static PyObject *mod_crc32c_chunks(PyObject *m, PyObject *args)
{
    Py_buffer b;
    Py_ssize_t chunk;
    if (!PyArg_ParseTuple(args, "y*n", &b, &chunk))
        return NULL;
    if (chunk <= 0) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "chunk must be positive");
        return NULL;
    }
    Py_ssize_t n = (b.len + chunk - 1) / chunk;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 4);
    if (out) {
        uint32_t *c = (uint32_t *)PyBytes_AS_STRING(out);
        const uint8_t *p = b.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            c[i] = crc_compute(0, p + i * chunk, (size_t)(i + 1 < n ? chunk : b.len - i * chunk));
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    return out;
}

/* mod_pack_units -- pack_units(entries u32, units u64) -> (groups, gaps): delta_pack. */
static PyObject *mod_pack_units(PyObject *m, PyObject *args)
{
    Py_buffer b[2];
    if (!PyArg_ParseTuple(args, "y*y*", &b[0], &b[1]))
        return NULL;
    size_t n = (size_t)b[0].len / 4, ng = 0, nv = 0;
    int rc = (size_t)b[1].len / 8 == n ? 0 : -EINVAL;
    PyObject *g = rc ? NULL : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 8));
    PyObject *v = rc ? NULL : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 10));
    if (g && v)
        rc = delta_pack(b[0].buf, b[1].buf, n, (uint32_t *)PyBytes_AS_STRING(g), &ng, (uint8_t *)PyBytes_AS_STRING(v),
                        &nv);
    PyBuffer_Release(&b[0]);
    PyBuffer_Release(&b[1]);
    if (rc == -EINVAL && !g)
        PyErr_SetString(PyExc_ValueError, "pack_units: one unit number per entry number");
    if (rc || !g || !v || _PyBytes_Resize(&g, (Py_ssize_t)(ng * 8)) || _PyBytes_Resize(&v, (Py_ssize_t)nv)) {
        Py_XDECREF(g);
        Py_XDECREF(v);
        return rc && rc != -EINVAL ? raise_rc(rc) : NULL;
    }
    return Py_BuildValue("NN", g, v);
}

/* mod_unpack_units -- unpack_units(groups, gaps) -> (entries u32, units u64): delta_unpack;
 * a damaged list raises ValueError. */
static PyObject *mod_unpack_units(PyObject *m, PyObject *args)
{
    Py_buffer b[2];
    if (!PyArg_ParseTuple(args, "y*y*", &b[0], &b[1]))
        return NULL;
    size_t ng = (size_t)b[0].len / 8, n = 0;
    const uint32_t *gr = b[0].buf;
    for (size_t i = 0; i < ng; i++)
        n += gr[2 * i + 1];
    int rc = b[0].len % 8 || n > (size_t)b[1].len ? -EBADMSG : 0;
    PyObject *e = rc ? NULL : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 4));
    PyObject *u = rc ? NULL : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 8));
    if (e && u)
        rc = delta_unpack(gr, ng, b[1].buf, (size_t)b[1].len, (uint32_t *)PyBytes_AS_STRING(e),
                          (uint64_t *)PyBytes_AS_STRING(u), n);
    PyBuffer_Release(&b[0]);
    PyBuffer_Release(&b[1]);
    if (rc || !e || !u) {
        Py_XDECREF(e);
        Py_XDECREF(u);
        if (rc)
            PyErr_Format(PyExc_ValueError, "a partner copy's list of units is damaged (%zu units in %zu runs)", n, ng);
        return NULL;
    }
    return Py_BuildValue("NN", e, u);
}

static PyMethodDef mod_methods[] = {
    {"crc32c", mod_crc32c, METH_VARARGS, "crc32c(buffer, crc=0) -> CRC32C"},
    {"reassert_handler", mod_reassert_handler, METH_VARARGS, "reassert_handler(undo): SIGSEGV handler back in front"},
    {"crc32c_combine", mod_crc32c_combine, METH_VARARGS, "crc32c_combine(crc_a, crc_b, len_b) -> CRC32C of A||B"},
    {"crc32c_chunks", mod_crc32c_chunks, METH_VARARGS, "crc32c_chunks(buffer, chunk) -> bytes of uint32 CRCs"},
    {"pack_units", mod_pack_units, METH_VARARGS, "pack_units(entries u32, units u64) -> (groups u32 pairs, varint gaps)"},
    {"unpack_units", mod_unpack_units, METH_VARARGS, "unpack_units(groups, gaps) -> (entries u32, units u64)"},
    {"create", mod_create, METH_VARARGS, "create(path, capacity, max_entries, job, rank, world_size, preallocate)"},
    {"open", mod_open, METH_VARARGS, "open(path, tracker, job|None, rank|-1, world|-1) -> NativeHeap (no recovery)"},
    {NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "hpcckpt._native", "C core binding", -1, mod_methods};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&NativeHeapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
    Py_INCREF(&NativeHeapType);
    PyModule_AddObject(m, "NativeHeap", (PyObject *)&NativeHeapType);
    PyModule_AddIntConstant(m, "TRACK_UFFD", HK_TRACK_UFFD);
    PyModule_AddIntConstant(m, "TRACK_MPROTECT", HK_TRACK_MPROTECT);
    PyModule_AddIntConstant(m, "TRACK_PAGE", HK_TRACK_PAGE);
    PyModule_AddIntConstant(m, "TRACK_HASH", HK_TRACK_HASH);
    PyModule_AddIntConstant(m, "TRACK_FULL", HK_TRACK_FULL);
    PyModule_AddIntConstant(m, "TRACK_NONE", HK_TRACK_NONE);
    PyModule_AddIntConstant(m, "TRACK_PEEK", HK_TRACK_PEEK);
    PyModule_AddIntConstant(m, "CRASH_BEFORE_COPY", HK_CRASH_BEFORE_COPY);
    PyModule_AddIntConstant(m, "CRASH_MID_COPY", HK_CRASH_MID_COPY);
    PyModule_AddIntConstant(m, "CRASH_AFTER_COPY", HK_CRASH_AFTER_COPY);
    PyModule_AddIntConstant(m, "CRASH_AFTER_PREPARE", HK_CRASH_AFTER_PREPARE);
    PyModule_AddIntConstant(m, "CRASH_MID_RESTORE", HK_CRASH_MID_RESTORE);
    PyModule_AddIntConstant(m, "UFFD_SUPPORTED", heap_uffd_supported());
    return m;
}
