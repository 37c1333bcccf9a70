"""The on-disk spool every usage record passes through on its way to the database.

A record is appended to the active segment file with one write(2) as the request ends:
it then survives the gateway being killed (it is in the kernel), without an fsync on
the request path. The writer reads segments back in order, fsyncs once per batch,
writes the batch to the database, and only then moves a checkpoint past it. After a
crash or an outage everything past the checkpoint is simply written again; the
database skips request ids it already has. The fsync and the checkpoint's file work
run in a thread (`sync_copy`, `save_checkpoint`): on the event loop they stopped every
request for 1.5 ms per batch here, more on network disks.

The records this process appended are also kept in memory until committed (up to
MEMORY_RECORDS of them), so in the normal case the writer never reads back and
decodes what it has just written. The disk is read for what an earlier run left, and
whenever the memory copy does not start exactly at the cursor.
"""

from __future__ import annotations

import collections
import fcntl
import itertools
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from gateway import jsonlines
from gateway.ledger.records import UsageRecord

log = logging.getLogger("gateway.ledger.spool")

_SEGMENT = re.compile(r"^segment-(\d{12})\.jsonl$")
CHECKPOINT = "checkpoint.json"
REJECTED = "rejected.jsonl"
READ_CHUNK_BYTES = 1 << 20
# Records kept in memory for the writer; past this (a long database outage) it reads
# them back from disk, and starts keeping them again once it has caught up.
MEMORY_RECORDS = 20_000


@dataclass(frozen=True, order=True)
class Position:
    """A place in the spool: segment number and byte offset within it."""

    segment: int
    offset: int


_FIELDS = UsageRecord._fields
_KNOWN_FIELDS = frozenset(_FIELDS)


def encode(record: UsageRecord) -> bytes:
    # created_at as datetime.isoformat() writes it (orjson's form is the same).
    return jsonlines.dumps(dict(zip(_FIELDS, record, strict=True))) + b"\n"


def decode(line: bytes) -> UsageRecord:
    values = jsonlines.loads(line)
    values["created_at"] = datetime.fromisoformat(values["created_at"])
    return UsageRecord(**{name: value for name, value in values.items() if name in _KNOWN_FIELDS})


class _Kept(NamedTuple):
    """A record appended by this process, with where its line starts and ends.

    (segment, offset) pairs rather than Positions: one is made per request.
    """

    start: tuple[int, int]
    end: tuple[int, int]
    record: UsageRecord


class Spool:
    """One process's spool: the first free `slot-N` folder under the spool directory.

    Each gateway process locks its own slot (flock, released by the kernel even when the
    process is killed), so processes sharing a config never write the same files, and a
    restarted process takes the slot back and writes what its predecessor left.
    """

    def __init__(self, root: Path, segment_bytes: int = 16 << 20) -> None:
        self.root = root
        self.directory = root
        self._segment_bytes = segment_bytes
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._active = 0
        self._active_size = 0
        self.cursor = Position(0, 0)
        self.appended = 0
        self.committed = 0
        # Bytes past the checkpoint when this process started: records of an earlier run.
        self.replay_until = Position(0, 0)
        # This process's records past the cursor, in order (see the module's docstring).
        self._kept: collections.deque[_Kept] = collections.deque()
        self._keeping = True

    # Opening --------------------------------------------------------------------

    def open(self) -> None:
        self.directory = self._take_slot()
        segments = self.segments()
        self.cursor = self._read_checkpoint(segments)
        self._active = (segments[-1] if segments else 0) + 1
        self._open_active()
        if segments:
            self.replay_until = Position(segments[-1], self._size(segments[-1]))
        else:
            # Nothing to replay: the cursor starts where this run's records will.
            self.cursor = self.replay_until = Position(self._active, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the slot's lock
            self._lock_fd = None

    def _take_slot(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for number in range(1024):
            slot = self.root / f"slot-{number}"
            slot.mkdir(exist_ok=True)
            lock_fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                continue
            self._lock_fd = lock_fd
            return slot
        raise OSError(f"no free spool slot under {self.root}")

    def segments(self) -> list[int]:
        return sorted(int(m[1]) for name in os.listdir(self.directory) if (m := _SEGMENT.match(name)))

    def _path(self, segment: int) -> Path:
        return self.directory / f"segment-{segment:012d}.jsonl"

    def _size(self, segment: int) -> int:
        try:
            return self._path(segment).stat().st_size
        except FileNotFoundError:
            return 0

    def _open_active(self) -> None:
        self._fd = os.open(self._path(self._active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active_size = self._size(self._active)

    def _read_checkpoint(self, segments: list[int]) -> Position:
        try:
            saved = json.loads((self.directory / CHECKPOINT).read_text())
            position = Position(int(saved["segment"]), int(saved["offset"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            position = Position(segments[0] if segments else 0, 0)
        if segments and position.segment < segments[0]:
            position = Position(segments[0], 0)
        return position

    # Writing --------------------------------------------------------------------

    def append(self, record: UsageRecord) -> None:
        """Raises OSError (a full disk, say); the caller keeps the record and retries."""
        data = encode(record)
        assert self._fd is not None, "spool is not open"
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to the spool ({written} of {len(data)} bytes)")
        start = self._active_size
        self._active_size += written
        self.appended += 1
        if self._keeping:
            if len(self._kept) < MEMORY_RECORDS:
                self._kept.append(_Kept((self._active, start), (self._active, self._active_size), record))
            else:
                self._kept.clear()
                self._keeping = False
        if self._active_size >= self._segment_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._active += 1
        self._open_active()

    def sync_copy(self) -> Callable[[], None] | None:
        """The active segment's fsync, to run in a thread; None if the spool is closed.

        It syncs a duplicate of the file descriptor, which it closes: a rotation may
        close the original while the thread waits on the disk.
        """
        if self._fd is None:
            return None
        duplicate = os.dup(self._fd)

        def sync() -> None:
            try:
                os.fsync(duplicate)
            finally:
                os.close(duplicate)

        return sync

    def reject(self, record: UsageRecord, reason: str) -> None:
        """Keep a record the database refused, with the reason, for an operator to see."""
        line = json.dumps({"reason": reason, "record": json.loads(encode(record))}) + "\n"
        with open(self.directory / REJECTED, "a", encoding="utf-8") as rejected:
            rejected.write(line)
            rejected.flush()
            os.fsync(rejected.fileno())

    # Reading --------------------------------------------------------------------

    def read(self, max_records: int) -> tuple[list[UsageRecord], Position]:
        """Records after the cursor (at most max_records) and where they end."""
        if self._kept and self._kept[0].start == (self.cursor.segment, self.cursor.offset):
            taken = list(itertools.islice(self._kept, max_records))
            return [kept.record for kept in taken], Position(*taken[-1].end)
        return self._read_disk(max_records)

    def _read_disk(self, max_records: int) -> tuple[list[UsageRecord], Position]:
        records: list[UsageRecord] = []
        position = self.cursor
        while len(records) < max_records:
            if position.segment > self._active:
                break
            path = self._path(position.segment)
            if not path.exists():
                if position.segment >= self._active:
                    break
                position = Position(position.segment + 1, 0)
                continue
            with open(path, "rb") as segment:
                segment.seek(position.offset)
                data = segment.read(READ_CHUNK_BYTES)
            offset = position.offset
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # an append still in flight, or a torn tail (below)
                offset += len(line)
                try:
                    records.append(decode(line))
                except (ValueError, TypeError, KeyError):
                    log.error(
                        "skipping an unreadable spool line in %s at byte %d", path.name, offset - len(line)
                    )
                if len(records) >= max_records:
                    break
            position = Position(position.segment, offset)
            if len(records) >= max_records:
                break
            if position.segment < self._active and offset >= self._size(position.segment):
                # A finished segment read to its end (a torn last line is skipped).
                position = Position(position.segment + 1, 0)
                continue
            break
        return records, position

    def commit(self, position: Position, records: int) -> None:
        """The database has everything before `position`: save it, drop finished segments."""
        self.advance(position, records)
        self.save_checkpoint(position)

    def advance(self, position: Position, records: int) -> None:
        """The in-memory half of commit: the cursor moves past what the database has."""
        self.cursor = position
        self.committed += records
        while self._kept and self._kept[0].end <= (position.segment, position.offset):
            self._kept.popleft()
        if not self._keeping and self.caught_up:
            self._keeping = True

    def save_checkpoint(self, position: Position) -> None:
        """The on-disk half of commit; touches only the checkpoint and finished segments,
        so it may run in a thread while the event loop appends."""
        temporary = self.directory / (CHECKPOINT + ".tmp")
        with open(temporary, "w", encoding="utf-8") as checkpoint:
            json.dump({"segment": position.segment, "offset": position.offset}, checkpoint)
            checkpoint.flush()
            os.fsync(checkpoint.fileno())
        os.replace(temporary, self.directory / CHECKPOINT)
        for segment in self.segments():
            if segment < position.segment:
                self._path(segment).unlink(missing_ok=True)

    @property
    def backlog_bytes(self) -> int:
        """Bytes appended but not yet in the database."""
        total = 0
        for segment in self.segments():
            if segment >= self.cursor.segment:
                size = self._size(segment)
                total += size - (self.cursor.offset if segment == self.cursor.segment else 0)
        return max(total, 0)

    @property
    def caught_up(self) -> bool:
        return self.cursor.segment == self._active and self.cursor.offset >= self._active_size
