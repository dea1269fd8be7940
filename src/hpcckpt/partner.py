"""The partner level: each rank's checkpoints also live on a rank of another node, so that a
lost node's heaps can be rebuilt over MPI without the file system.

Ranks are grouped into nodes (``MPI.COMM_TYPE_SHARED``; ``HPCCKPT_NODE_OF_RANK="0,0,1,1"``
overrides it) and each rank's partner is the rank of the same local index on the next node
(a ring over nodes).  At a checkpoint every rank sends its partner what it copied in that
epoch (the delta: entry and unit numbers, CRCs, bytes); the partner writes it into a mirror
heap (``partner-rank<r>.heap`` in its own job directory, an ordinary heap file with the same
two checkpoint copies and checks) and prepares the same epoch there before the vote, so an
epoch commits only when every rank holds its own copy and its partner's.

>>> partners_of([0, 0, 1, 1])
[2, 3, 0, 1]
>>> partners_of([0, 0, 0])
[None, None, None]
"""
from __future__ import annotations

import os
import pickle
import time
from typing import Any

import numpy as np

from . import _native, deadline
from .errors import HeapError
from .heap import Heap
from .mpi import error_text

_HEADER, _META, _DATA = 7401, 7402, 7403   # message tags


def nodes_of_ranks(comm) -> list[int]:
    """The node number (0..N-1) of every rank: HPCCKPT_NODE_OF_RANK, else shared-memory groups."""
    env = os.environ.get("HPCCKPT_NODE_OF_RANK")
    if env:
        try:
            nodes = [int(x) for x in env.split(",")]
        except ValueError:
            raise HeapError(f"HPCCKPT_NODE_OF_RANK={env!r}: give one node number per rank, e.g. 0,0,1,1") from None
        if len(nodes) != comm.Get_size():
            raise HeapError(f"HPCCKPT_NODE_OF_RANK names {len(nodes)} ranks, the job has {comm.Get_size()}")
    else:
        from mpi4py import MPI
        deadline.arrive(comm, "the grouping of ranks by node at open")
        shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
        leader = shared.bcast(comm.Get_rank(), root=0)
        shared.Free()
        nodes = deadline.allgather(comm, leader, "the grouping of ranks by node at open")
    order = sorted(set(nodes))
    return [order.index(n) for n in nodes]


def partners_of(nodes: list[int]) -> list[int | None]:
    """Each rank's partner: the rank with its local index (modulo) on the next node; None with one node."""
    order = sorted(set(nodes))
    if len(order) < 2:
        return [None] * len(nodes)
    members = {n: [r for r, m in enumerate(nodes) if m == n] for n in order}
    out = []
    for r, n in enumerate(nodes):
        nxt = members[order[(order.index(n) + 1) % len(order)]]
        out.append(nxt[members[n].index(r) % len(nxt)])
    return out


def mirror_path(directory: str, ward: int) -> str:
    return os.path.join(directory, f"partner-rank{ward}.heap")


def catalog(heap: Heap) -> dict[int, tuple]:
    """Every live object of the heap (hidden ones too): index -> (name, dtype, shape, size, count, kind)."""
    out, native = {}, heap._native
    i = native.next_live(0)
    while i >= 0:
        name, dtype, shape, size, count, kind = native.lookup(i)
        out[i] = (name, dtype, tuple(shape), size, count, kind)
        i = native.next_live(i + 1)
    return out


class MirrorHeap(Heap):
    """A mirror heap: its working data is written only when it is restored, so nothing is read
    from it at open (the Python layer's names and layouts are the ward's business)."""

    def _load_names(self) -> None:
        self._names, self._layouts = {}, {}


def probe_mirror(path: str, job: str, ward: int, size: int) -> tuple[bool, int, int]:
    """(present, newest epoch its checks confirm, prepared) of a mirror, nothing written."""
    if not os.path.exists(path):
        return False, 0, 0
    try:
        h = MirrorHeap.open(path, job=job, rank=ward, world_size=size, readonly=True)
        info = h._info()
        h._native.abandon()
    except (OSError, HeapError, ValueError):
        return False, 0, 0
    return True, max(info["good_epoch"], 0), info["prepared"]


def restorable(probe: tuple[bool, int, int], epoch: int) -> bool:
    """Can a mirror so probed be brought back to `epoch`?"""
    present, good, prepared = probe
    return present and 0 < epoch <= good and epoch >= prepared - 1


def pack_units(entries: bytes, units: bytes) -> tuple[bytes, bytes]:
    """A delta's unit list, compact (in C): runs of one entry, (entry, count) as u32 pairs, and
    the gaps between unit numbers as prefix varints (a run's first: the unit itself), about a
    byte per scattered unit.

    >>> groups, gaps = pack_units(np.array([3, 3, 3, 5], np.uint32).tobytes(), np.array([0, 9, 200, 7], np.uint64).tobytes())
    >>> np.frombuffer(groups, np.uint32).tolist(), len(gaps), [a.tolist() for a in unpack_units(groups, gaps)]
    ([3, 3, 5, 1], 4, [[3, 3, 3, 5], [0, 9, 200, 7]])
    """
    return _native.pack_units(entries, units)


def unpack_units(groups: bytes, gaps: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(entries u32, units u64) back from pack_units; a damaged list raises HeapError."""
    try:
        e, u = _native.unpack_units(groups, gaps)
    except ValueError as exc:
        raise HeapError(str(exc)) from None
    return np.frombuffer(e, np.uint32), np.frombuffer(u, np.uint64)


def _message(header: dict, groups: bytes = b"", gaps: bytes = b"", data: bytes = b"", crc: int = 0) -> tuple[bytes, bytes]:
    """A delta as two messages' worth: the pickled header (with the runs of units and the data's
    CRC) and the packed gaps; the data travels as it is."""
    if header.get("ok"):
        header["groups"], header["crc"] = bytes(groups), crc
        return pickle.dumps(header), gaps
    return pickle.dumps(header), b""


def _recv_bytes(comm, source: int, tag: int, into: bytearray | None = None) -> bytearray:
    """One message from `source`, waited for under the deadline (matched probe, then receive)."""
    from mpi4py import MPI
    what = f"the partner copy from rank {source}"
    if deadline.timeout() > 0:
        deadline.wait(_Probe(comm, source, tag), what)
    st = MPI.Status()
    msg = comm.Mprobe(source=source, tag=tag, status=st)
    n = st.Get_count(MPI.BYTE)
    buf = into if into is not None and len(into) == n else bytearray(n)
    deadline.wait(msg.Irecv(buf), what)
    return buf


class _Probe:
    """A message that has arrived, as a request ``deadline.wait`` can test."""

    def __init__(self, comm, source: int, tag: int):
        self.comm, self.source, self.tag = comm, source, tag

    def Test(self) -> bool:
        return self.comm.Iprobe(source=self.source, tag=self.tag)

    def Wait(self) -> None:
        self.comm.Probe(source=self.source, tag=self.tag)


class Mirror:
    """The copy of one ward's heap that this rank keeps."""

    def __init__(self, path: str, job: str, ward: int, size: int, capacity: int | str):
        self.path, self.job, self.ward, self.size, self.capacity = path, job, ward, size, capacity
        self.heap: Heap | None = None
        self.map = np.zeros(0, np.uint32)   # the ward's entry number -> the mirror's
        self.prepared = False

    def open_at(self, epoch: int) -> None:
        """Open the mirror and bring it back to `epoch` (every unit checked against its CRC)."""
        self.heap = MirrorHeap._attach(self.path, "hash", self.job, self.ward, self.size)
        info = self.heap._info()
        if info["committed"] != epoch or not info["was_clean"] or info["prepared"] != epoch:
            self.heap._recover(epoch)
        self._remap(None)

    def fresh(self, epoch: int) -> None:
        """A new, empty mirror whose next epoch is epoch + 1."""
        self.drop()
        self.heap = MirrorHeap.create(self.path, self.capacity, tracker="hash", job=self.job, rank=self.ward,
                                      world_size=self.size)
        if epoch:
            self.heap._native.rebase(epoch)
        self.map = np.zeros(0, np.uint32)

    def committed(self) -> int:
        return self.heap._info()["committed"] if self.heap is not None else -1

    def _remap(self, theirs: dict[int, tuple] | None) -> None:
        """Make the mirror hold exactly the ward's objects (by name and geometry), all put-only;
        None: the mirror's own objects, as reopened."""
        native = self.heap._native
        mine = catalog(self.heap)
        theirs = mine if theirs is None else theirs
        wanted = {d[0]: d for d in theirs.values()}
        by_name = {}
        for i, d in mine.items():
            if wanted.get(d[0]) == d:
                by_name[d[0]] = i
            else:
                native.free(i)
        self.map = np.full(max(theirs, default=-1) + 1, 0xFFFFFFFF, np.uint32)
        for i, d in theirs.items():
            j = by_name.get(d[0])
            if j is None:
                name, dtype, shape, size, count, kind = d
                j = native.alloc(name, dtype, tuple(shape), size, count, kind)
            native.put_only(j)
            self.map[i] = j

    def prepare(self, header: dict, index: bytes, data) -> None:
        """Write a ward's delta in and prepare its epoch (the mirror must be one epoch behind)."""
        epoch = header["epoch"]
        if header["full"]:
            self.fresh(epoch - 1)
        elif self.heap is None or self.committed() != epoch - 1:
            raise HeapError(f"{self.path}: the mirror of rank {self.ward} is at epoch {self.committed()}, "
                            f"not {epoch - 1}")
        if header["catalog"] is not None:
            self._remap(header["catalog"])
        entries, units = unpack_units(header["groups"], index)
        self.heap._native.store(self.map.tobytes(), entries, units, data, header["crc"], header["meta"])
        self.prepared = True

    def finish(self, commit: bool) -> None:
        if self.prepared and self.heap is not None:
            (self.heap._native.commit if commit else self.heap._native.withdraw)()
        self.prepared = False

    def drop(self) -> None:
        """Forget the mirror: closed (if open) and its file removed."""
        if self.heap is not None:
            self.heap._native.abandon()
            self.heap = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        """Left as after a crash: a mirror's working data is never written (its epochs go straight
        into the checkpoint copies), so every open restores it from them (open_at)."""
        if self.heap is not None:
            self.heap._native.abandon()
            self.heap = None


class PartnerLevel:
    """This rank's part of the partner level: what it sends its partner, the mirrors it keeps."""

    def __init__(self, comm, nodes: list[int], directory: str, job: str, capacity: int | str):
        self.comm, self.nodes = comm, nodes
        rank, size = comm.Get_rank(), comm.Get_size()
        self.partners = partners_of(nodes)
        self.partner = self.partners[rank]
        self.wards = [w for w, p in enumerate(self.partners) if p == rank]
        self.mirrors = {w: Mirror(mirror_path(directory, w), job, w, size, capacity) for w in self.wards}
        self.synced = False      # does my partner's mirror of me hold my committed epoch?
        self._inbox: dict[int, bytearray] = {}   # a receive buffer per ward, reused while the size holds
        self.sent_catalog: dict | None = None
        self.figures: dict[str, Any] = {}

    def probes(self) -> dict[int, tuple]:
        return {w: probe_mirror(m.path, m.job, w, m.size) for w, m in self.mirrors.items()}

    def exchange(self, heap: Heap, epoch: int, prepared: bool, meta: bytes) -> str | None:
        """Send my delta to my partner, take my wards' into their mirrors (each prepared at
        `epoch`); every rank calls it, also when its own prepare failed.  Returns an error text."""
        t0 = time.perf_counter()
        err, header, groups, gaps, data, crc = None, {"ok": False}, b"", b"", b"", 0
        if prepared:
            try:
                cat = catalog(heap)
                groups, gaps, data, crc = heap._native.delta(not self.synced)
                header = {"ok": True, "epoch": epoch, "full": not self.synced, "meta": meta,
                          "catalog": cat if (not self.synced or cat != self.sent_catalog) else None}
                self.sent_catalog = cat
            except (OSError, HeapError, ValueError) as e:
                err = error_text(e)
        head, gaps = _message(header, groups, gaps, data, crc)
        sends = [self.comm.Isend(head, dest=self.partner, tag=_HEADER)]
        if header["ok"]:
            sends += [self.comm.Isend(gaps, dest=self.partner, tag=_META),
                      self.comm.Isend(data, dest=self.partner, tag=_DATA)]
        for w in self.wards:
            got = pickle.loads(_recv_bytes(self.comm, w, _HEADER))
            if not got["ok"]:
                continue
            index = _recv_bytes(self.comm, w, _META)
            self._inbox[w] = data_in = _recv_bytes(self.comm, w, _DATA, self._inbox.get(w))
            if err is None:
                try:
                    self.mirrors[w].prepare(got, bytes(index), data_in)
                except (OSError, HeapError, ValueError) as e:
                    err = f"keeping the partner copy of rank {w}: {error_text(e)}"
        for r in sends:
            deadline.wait(r, f"the partner copy's send to rank {self.partner}")
        self.figures = {"bytes_sent": len(head) + len(gaps) + len(data), "data_bytes_sent": len(data),
                        "full": bool(header.get("full")), "t_partner": time.perf_counter() - t0}
        return err

    def finish(self, commit: bool) -> None:
        """The vote's outcome, for the mirrors prepared by this epoch's exchange."""
        for m in self.mirrors.values():
            m.finish(commit)
        if commit:
            self.synced = True

    def settle(self, epoch: int) -> None:
        """Collective, once the job's epoch is known at open: bring every mirror this rank keeps
        back to `epoch` (or drop it), and learn whether my partner holds mine; a rank whose
        partner does not sends everything at its next checkpoint."""
        ok = {}
        for w, m in self.mirrors.items():
            ok[w] = m.heap is not None and m.committed() == epoch > 0   # it served a rebuild just now
            if not ok[w] and m.heap is not None:
                m.heap._native.abandon()
                m.heap = None
            if not ok[w] and restorable(probe_mirror(m.path, m.job, w, m.size), epoch):
                try:
                    m.open_at(epoch)
                    ok[w] = True
                except (OSError, HeapError, ValueError):
                    pass
            if not ok[w]:
                m.drop()
        held = deadline.allgather(self.comm, ok, "the partner level's agreement at open")
        self.synced = held[self.partner].get(self.comm.Get_rank(), False)
        self.sent_catalog = None

    def serve(self, ward: int, epoch: int) -> None:
        """Send a ward that lost its heap everything its mirror holds at `epoch` (or why not)."""
        m, data = self.mirrors[ward], None
        try:
            m.open_at(epoch)
            header = {"ok": True, "catalog": catalog(m.heap), "meta": m.heap._native.meta()}
            groups, gaps, data, crc = m.heap._native.delta(True)
            head, gaps = _message(header, groups, gaps, data, crc)
        except (OSError, HeapError, ValueError) as e:
            head, gaps = _message({"ok": False, "error": f"rank {self.comm.Get_rank()}: {error_text(e)}"})
            data = None
        sends = [self.comm.Isend(head, dest=ward, tag=_HEADER)]
        if data is not None:
            sends += [self.comm.Isend(gaps, dest=ward, tag=_META), self.comm.Isend(data, dest=ward, tag=_DATA)]
        for r in sends:
            deadline.wait(r, f"the rebuild of rank {ward} from its partner copy")

    def receive(self) -> tuple[dict, bytearray, bytearray]:
        """What my partner sends by ``serve``: (header, gaps, data); an error header raises."""
        got = pickle.loads(_recv_bytes(self.comm, self.partner, _HEADER))
        if not got["ok"]:
            raise HeapError(f"the partner copy is unusable: {got['error']}")
        return got, _recv_bytes(self.comm, self.partner, _META), _recv_bytes(self.comm, self.partner, _DATA)

    @staticmethod
    def fill(heap: Heap, got: dict, gaps: bytearray, data: bytearray, epoch: int) -> None:
        """Fill a fresh heap with a partner's copy of epoch `epoch` (every unit checked) and commit it."""
        native = heap._native
        where = np.full(max(got["catalog"], default=-1) + 1, 0xFFFFFFFF, np.uint32)
        for i, (name, dtype, shape, size, count, kind) in sorted(got["catalog"].items()):
            where[i] = native.alloc(name, dtype, tuple(shape), size, count, kind)
        entries, units = unpack_units(got["groups"], bytes(gaps))
        native.apply(where.tobytes(), entries, units, data, got["crc"])
        if epoch > 1:
            native.rebase(epoch - 1)
        native.prepare(got["meta"])
        native.commit()
        heap._load_names()

    def close(self) -> None:
        for m in self.mirrors.values():
            m.close()


__all__ = ["PartnerLevel", "MirrorHeap", "nodes_of_ranks", "partners_of", "mirror_path", "catalog", "restorable"]
