"""hpcckpt: fine-grained checkpoints of MPI programs in a node-local persistent heap.

>>> import hpcckpt
>>> sorted(hpcckpt.TRACKERS)
['full', 'hash', 'mprotect', 'page', 'uffd']
"""
from .errors import (CheckpointError, CorruptHeapError, FormatVersionError, HeapBusyError, HeapError,
                     HeapFullError, OwnerMismatchError, RepairWarning)
from .heap import TRACKERS, Heap, Pool, resolve_tracker
from .job import JobHeap, open
from .manifest import ExportError
from .mpi import default_root

__all__ = ["Heap", "Pool", "JobHeap", "open", "default_root", "TRACKERS", "resolve_tracker", "HeapError",
           "CorruptHeapError", "FormatVersionError", "HeapBusyError", "HeapFullError", "OwnerMismatchError",
           "CheckpointError", "ExportError", "RepairWarning"]
__version__ = "0.1.0"
