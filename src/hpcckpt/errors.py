"""Errors raised by hpcckpt; every one says which file and what to do."""
from __future__ import annotations

import errno


class HeapError(Exception):
    """Base class of every hpcckpt error."""


class CorruptHeapError(HeapError):
    """The file is not a heap, is truncated, or a checksum does not match."""


class FormatVersionError(HeapError):
    """The heap was written by an incompatible version of hpcckpt."""


class OwnerMismatchError(HeapError):
    """The heap belongs to another job, rank or world size."""


class HeapBusyError(HeapError):
    """Another process has the heap open."""


class HeapFullError(HeapError, MemoryError):
    """Capacity or catalog exhausted; the heap stays usable."""


class CheckpointError(HeapError):
    """A checkpoint failed (on this rank or another); the epoch was withdrawn."""


class RepairWarning(UserWarning):
    """Damage was found and repaired (from a twin copy or a checkpoint copy), or the heap
    was rolled back to the newest epoch that its checks confirm; the message says which."""


_BY_ERRNO = {
    errno.EBADMSG: CorruptHeapError,
    errno.ENOTUNIQ: OwnerMismatchError,
    errno.EPROTO: FormatVersionError,
    errno.EBUSY: HeapBusyError,
    errno.ENOSPC: HeapFullError,
}


def translate(exc: OSError) -> HeapError | OSError:
    """Turn an OSError of the C core into the matching hpcckpt error.

    >>> translate(OSError(errno.EBADMSG, "x.heap: bad magic")).__class__.__name__
    'CorruptHeapError'
    """
    if exc.errno == errno.ENOENT and "cannot open" in str(exc.strerror):
        return FileNotFoundError(exc.errno, exc.strerror)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionError(exc.errno, f"{exc.strerror}; check the file's owner and mode, or set HPCCKPT_ROOT")
    cls = _BY_ERRNO.get(exc.errno or 0)
    if cls is None:
        return HeapError(exc.strerror or str(exc))
    return cls(exc.strerror)
