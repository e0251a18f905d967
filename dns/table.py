"""The prepared answers in one shared-memory table that the main process writes and every
UDP worker process reads.

A worker used to hold its own copy of the table as a dict of tuples (~33 MB each at 10k
Services); this table lives in one memfd mapped by all of them, so a worker adds only its
interpreter and a small cache of finished replies (``worker.py``), and the memory is counted
once. The layout is a flat open-addressing hash table, readable from any process without
Python objects and without locks:

```
header   magic(8) nslots(4) slots_at(4) data_at(4) data_end(4) data_cap(4)
slots    nslots x uint32: 0 empty, 1 deleted, else the offset of a record
data     records, append-only: nlen(1) key flags1(1) flags2(1) counts(8) counts_edns(8)
         core_len(4) stat(4) body_len(4) body
```

``key`` is the fast path's key (lower-case wire name + type + class; ``nlen`` is the name's
length, at most 255, so the key is ``nlen + 4`` bytes), hashed with CRC-32 and probed
linearly. Only the main process writes, and only in ways a concurrent reader tolerates:
a new record is appended in full before the 4-byte slot pointing at it is stored (one aligned
store; x86 keeps the order), an old record is never overwritten, a delete turns the slot into
a tombstone. When the slots get too full or the data area runs out the main process builds a
fresh table (dropping dead records) and hands its file descriptor to the workers, which switch
to it; the old mapping disappears with its last user.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from zlib import crc32

from svcnet.dns.wire import Prepared

MAGIC = b"SVDNSTB1"
HEADER = struct.Struct("<8sIIIII")
RECORD = struct.Struct("<BB8s8sIII")  # after nlen + key
EMPTY, DELETED = 0, 1
SLOTS_AT = 64
MAX_LOAD = 0.5  # slots used (live + tombstones) before rebuilding: short probe chains


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def encode_record(key: bytes, p: Prepared) -> bytes:
    return bytes((len(key) - 4,)) + key + RECORD.pack(
        p.flags1, p.flags2, p.counts, p.counts_edns, p.core_len, p.stat, len(p.body)) + p.body


def decode_record(buf: bytes | mmap.mmap, off: int) -> tuple[bytes, Prepared, int]:
    """(key, answer, offset after the record) of the record at ``off``."""
    klen = buf[off] + 4
    key = bytes(buf[off + 1:off + 1 + klen])
    at = off + 1 + klen
    flags1, flags2, counts, counts_edns, core_len, stat, blen = RECORD.unpack_from(buf, at)
    at += RECORD.size
    return key, Prepared(flags1, flags2, counts, bytes(buf[at:at + blen]), counts_edns,
                         core_len, stat), at + blen


class TableView:
    """Read-only lookups in a table mapped from its file descriptor (what a worker holds)."""

    def __init__(self, fd: int) -> None:
        self.mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        magic, nslots, slots_at, _, _, _ = HEADER.unpack_from(self.mm, 0)
        if magic != MAGIC:
            raise ValueError("not a svcnet DNS table")
        self.mask = nslots - 1
        self.slots = memoryview(self.mm)[slots_at:slots_at + 4 * nslots].cast("I")

    def find(self, key: bytes) -> int:
        """The offset of ``key``'s record, or 0."""
        return find(self.mm, self.slots, self.mask, key)


def find(mm: mmap.mmap, slots: memoryview, mask: int, key: bytes) -> int:
    """Probe for ``key``: the offset of its record, or 0. Records never move, and keys are
    wire names (self-delimiting) + 4 bytes, so comparing ``len(key)`` bytes suffices."""
    i = crc32(key) & mask
    n = len(key)
    nlen = n - 4
    while True:
        off: int = slots[i]
        if off == EMPTY:
            return 0
        if off != DELETED and mm[off] == nlen and mm[off + 1:off + 1 + n] == key:
            return off
        i = (i + 1) & mask


class SharedTable:
    """The writable table in the main process; a ``Mapping``-like view of Prepared answers.

    ``fd`` changes when the table is rebuilt; ``DNSServer`` passes the new one to workers.
    """

    def __init__(self, capacity: int = 1024, data_bytes: int = 1 << 16) -> None:
        self._live = 0
        self._used = 0  # live + tombstones
        self._garbage = 0  # bytes of records no slot points at
        self._build(capacity, data_bytes, [])

    # --- the storage ---------------------------------------------------------------------

    def _build(self, capacity: int, data_bytes: int, records: list[bytes]) -> None:
        nslots = 1024
        while nslots * MAX_LOAD < capacity:
            nslots *= 2
        data_at = _round_up(SLOTS_AT + 4 * nslots, 64)
        size = _round_up(data_at + max(data_bytes, 4096), mmap.PAGESIZE)
        fd = os.memfd_create("svcnet-dns-table", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        slots = memoryview(mm)[SLOTS_AT:SLOTS_AT + 4 * nslots].cast("I")
        old = getattr(self, "fd", -1)
        self.fd, self.mm, self.slots, self.mask = fd, mm, slots, nslots - 1
        self.builds = getattr(self, "builds", 0) + 1  # which table a worker has been given
        self._data_at, self._end, self._cap = data_at, data_at, size
        self._live = self._used = self._garbage = 0
        for rec in records:
            self._insert(rec[1:5 + rec[0]], rec)
        self._write_header()
        if old >= 0:
            os.close(old)  # the old mapping lives on in readers until they switch

    def _write_header(self) -> None:
        HEADER.pack_into(self.mm, 0, MAGIC, self.mask + 1, SLOTS_AT, self._data_at, self._end,
                         self._cap)

    def _append(self, rec: bytes) -> int:
        off = self._end
        self.mm[off:off + len(rec)] = rec
        self._end = off + len(rec)
        return off

    def _slot_of(self, key: bytes) -> tuple[int, int]:
        """(slot index, offset): the key's slot, or the first free slot on its chain."""
        i = crc32(key) & self.mask
        free = -1
        n = len(key)
        while True:
            off = self.slots[i]
            if off == EMPTY:
                return (free if free >= 0 else i), 0
            if off == DELETED:
                if free < 0:
                    free = i
            elif self.mm[off] == n - 4 and self.mm[off + 1:off + 1 + n] == key:
                return i, off
            i = (i + 1) & self.mask

    def _insert(self, key: bytes, rec: bytes) -> None:
        i, old = self._slot_of(key)
        off = self._append(rec)
        if old:
            self._garbage += self._record_size(old)
        else:
            if self.slots[i] == EMPTY:
                self._used += 1
            self._live += 1
        self.slots[i] = off  # last: a reader sees the old record or the complete new one

    def _record_size(self, off: int) -> int:
        return decode_record(self.mm, off)[2] - off

    # --- the interface ---------------------------------------------------------------------

    def set(self, key: bytes, value: Prepared | None) -> bool:
        """Store or delete one answer. True if the table was rebuilt (new ``fd``)."""
        if value is None:
            i, off = self._slot_of(key)
            if off:
                self.slots[i] = DELETED
                self._live -= 1
                self._garbage += self._record_size(off)
            return self.compact()
        rec = encode_record(key, value)
        i, old = self._slot_of(key)
        if old and self._record_size(old) == len(rec) and \
                self.mm[old:old + len(rec)] == rec:
            return False  # unchanged
        rebuilt = False
        if self._end + len(rec) > self._cap or (
                not old and self._used + 1 > (self.mask + 1) * MAX_LOAD):
            self._rebuild(extra=len(rec))
            rebuilt = True
        self._insert(key, rec)
        self._write_header()
        return self.compact() or rebuilt

    def _rebuild(self, extra: int) -> None:
        records = [bytes(self.mm[off:self._record_end(off)]) for off in self._offsets()]
        live_bytes = sum(map(len, records)) + extra
        self._build(max(1024, 2 * (len(records) + 1)), 2 * live_bytes + 4096, records)

    def _record_end(self, off: int) -> int:
        return decode_record(self.mm, off)[2]

    def _offsets(self) -> Iterator[int]:
        for off in self.slots:
            if off > DELETED:
                yield off

    def get(self, key: bytes) -> Prepared | None:
        off = find(self.mm, self.slots, self.mask, key)
        return decode_record(self.mm, off)[1] if off else None

    def __getitem__(self, key: bytes) -> Prepared:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and find(self.mm, self.slots, self.mask, key) != 0

    def __len__(self) -> int:
        return self._live

    def items(self) -> Iterator[tuple[bytes, Prepared]]:
        for off in list(self._offsets()):
            key, value, _ = decode_record(self.mm, off)
            yield key, value

    def keys(self) -> Iterator[bytes]:
        for key, _ in self.items():
            yield key

    @property
    def size_bytes(self) -> int:
        return self._cap

    @property
    def garbage_bytes(self) -> int:
        return self._garbage

    def compact(self) -> bool:
        """Rebuild if more than half the data area is dead records. True if rebuilt."""
        used = self._end - self._data_at
        if used > 1 << 20 and self._garbage * 2 > used:
            self._rebuild(extra=0)
            self._write_header()
            return True
        return False

    def close(self) -> None:
        self.slots.release()
        self.mm.close()
        os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)  # the mapping goes with the object; workers keep their own
