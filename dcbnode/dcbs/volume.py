"""A DCBS volume file: an append-only sequence of checksummed records.

Writers take an exclusive ``flock`` for the duration of an append, so that several threads and
several processes (the node and ``dcbnode-admin import``) can append to one volume safely.  Readers
never lock: records never change once written, and every read is checked against its CRC.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .errors import CorruptRecordError, DcbsError, DcbsFormatError
from .format import (
    FILE_HEADER_SIZE,
    FORMAT_VERSION,
    RECORD_HEADER_SIZE,
    FileHeader,
    MetaLayout,
    RecordHeader,
    RecordKind,
    crc32,
    pack_file_header,
    unpack_file_header,
)

if TYPE_CHECKING:
    from .dictionary import SharedDictionary

T = TypeVar("T")
_ZERO_CHECK_CHUNK = 1 << 20
#: buffers per ``pwritev`` call (Linux's IOV_MAX)
_IOV_MAX = 1024


class VolumeFullError(DcbsError):
    """The file system refused the write (disk full, quota): nothing was appended."""


class VolumeReplacedError(DcbsError):
    """The file was unlinked (compaction replaced it) while this descriptor was open: reopen by path."""


class VolumeNotFoundError(DcbsFormatError):
    """No volume file at the path (and it was not to be created)."""


class KeepRecord(Exception):
    """Raised by an append's ``on_written`` callback, after its ``wait_durable()`` returned, to fail the
    append but leave the durable record in the volume: something may refer to it already (an index
    commit whose outcome is unknown).  The append raises ``error`` instead."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class RecordLocation:
    """Where a record lives in its volume: byte offset of its header and its total length."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A record to append: its kind, metadata block and data."""

    kind: RecordKind
    meta: bytes
    data_parts: Sequence[bytes | memoryview] = ()
    layout: MetaLayout = MetaLayout.JSON
    dictionary_id: int = 0

    def header(self) -> RecordHeader:
        """Its record header (lengths and the metadata's CRC)."""
        payload_length = len(self.meta) + sum(len(part) for part in self.data_parts)
        return RecordHeader(self.kind, payload_length, len(self.meta), crc32(self.meta), self.layout,
                            self.dictionary_id)


@dataclass(frozen=True, slots=True)
class RecordEntry:
    """A record found while walking a volume."""

    location: RecordLocation
    header: RecordHeader


class Volume:
    """An open DCBS volume.

    Use :meth:`open` to read or append, :meth:`create` to make a new one.  The object is safe to share
    between threads.
    """

    def __init__(self, path: Path, fd: int, writable: bool, header: FileHeader) -> None:
        self.path = path
        self.volume_id = header.volume_id
        self.format_version = header.version
        self.writable = writable
        self._fd = fd
        self._lock = threading.Lock()
        self._known_end = FILE_HEADER_SIZE
        #: dictionary records read so far, by id (they never change: see ``dictionary.py``)
        self.dictionaries: dict[int, SharedDictionary] = {}
        #: the dictionary new instance records of this volume are written with, once known
        self.writer_dictionary: SharedDictionary | None = None

    # -- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False, create: bool = False) -> Volume:
        """Open the volume at ``path``; with ``create`` make it first if it does not exist.

        A writable open repairs a torn tail (an append cut short by a crash) before returning.
        Raises :class:`DcbsFormatError` if the file is not a DCBS volume.
        """
        path = Path(path)
        if create and not path.exists():
            _create_file(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VolumeNotFoundError(f"{path}: no such volume") from None
        try:
            header = _read_file_header(path, fd)
        except BaseException:
            os.close(fd)
            raise
        volume = cls(path, fd, writable, header)
        if writable:
            with volume._locked():
                volume._refresh_end()
        return volume

    def close(self) -> None:
        """Close the file descriptor; the object must not be used afterwards."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------------

    def size(self) -> int:
        """Current size of the file in bytes."""
        return os.fstat(self._fd).st_size

    def read_exact(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; a short read means the file was cut and raises."""
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise CorruptRecordError(self.path, offset, f"file ends {length - len(data)} bytes early")
        return data

    def read_header(self, offset: int) -> RecordHeader:
        """Read and check the record header at ``offset``."""
        try:
            return RecordHeader.unpack(self.read_exact(offset, RECORD_HEADER_SIZE))
        except ValueError as exc:
            raise CorruptRecordError(self.path, offset, str(exc)) from None

    def read_meta(self, offset: int) -> tuple[RecordHeader, bytes]:
        """Read the header and the checked metadata block of the record at ``offset``."""
        header = self.read_header(offset)
        meta = self.read_exact(offset + RECORD_HEADER_SIZE, header.meta_length)
        if crc32(meta) != header.meta_crc:
            raise CorruptRecordError(self.path, offset, "record metadata checksum mismatch")
        return header, meta

    def read_checked(self, offset: int, length: int, crc: int, *, record_offset: int) -> bytes:
        """Read a checksummed piece of a record (a frame) and verify it."""
        data = self.read_exact(offset, length)
        if crc32(data) != crc:
            raise CorruptRecordError(self.path, record_offset, f"frame data at offset {offset} checksum mismatch")
        return data

    def records(self) -> Iterator[RecordEntry]:
        """Walk every complete record from the start, hopping from header to header.

        Stops silently at a torn tail; raises :class:`CorruptRecordError` on damage elsewhere.
        """
        yield from self._walk(FILE_HEADER_SIZE, self.size())

    def walk_from(self, offset: int) -> Iterator[RecordEntry]:
        """Walk the complete records that start at or after ``offset`` (a record boundary)."""
        yield from self._walk(max(offset, FILE_HEADER_SIZE), self.size())

    # -- appending -------------------------------------------------------------------------------------

    def append(
        self,
        kind: RecordKind,
        meta: bytes,
        data_parts: Sequence[bytes | memoryview] = (),
        *,
        layout: MetaLayout = MetaLayout.JSON,
        dictionary_id: int = 0,
        on_durable: Callable[[RecordLocation], T] | None = None,
        on_written: Callable[[RecordLocation, Callable[[], None]], T] | None = None,
    ) -> tuple[RecordLocation, T | None]:
        """Append one record, fsync it, and return its location.

        ``on_durable`` runs after the fsync while the volume is still locked (the archive commits its
        index there, so index order follows volume order).  If it raises, the record is cut off again
        and the exception propagates: a failed store leaves nothing behind.

        ``on_written``, instead, runs as soon as the record is written, while the fsync proceeds in another
        thread: it gets the location and a ``wait_durable()`` it must call before it makes the record
        known anywhere (``wait_durable`` raises the fsync's error).  The archive prepares its index
        transaction meanwhile and commits after the wait, which saves the fsync's time on every store.
        If it raises :class:`KeepRecord`, the record stays and the append raises the error it carries.
        """
        record = NewRecord(kind, meta, data_parts, layout, dictionary_id)
        if on_written is not None:
            locations, result = self.append_many(lambda: [record], lambda found, wait: on_written(found[0], wait))
            return locations[0], result
        callback = None if on_durable is None else lambda found, _wait: on_durable(found[0])
        with self._locked_for_append():
            self._upgrade_format()
            locations, result = self._append_locked([record], callback)
        return locations[0], result

    def append_many(
        self, records: Callable[[], Sequence[NewRecord]],
        on_written: Callable[[list[RecordLocation], Callable[[], None]], T],
    ) -> tuple[list[RecordLocation], T]:
        """Append records one after the other under one lock, with one fsync (a group commit).

        ``records()`` is called once the volume is locked (it must not lock it again) and gives them.
        ``on_written`` is called as for one record (see :meth:`append`) with all their locations.  All or
        nothing: if anything fails, every one of them is cut off again and the exception propagates.
        """
        with self._locked_for_append():
            self._upgrade_format()
            return self._append_locked(records(), on_written, concurrent=True)

    def append_once(self, kind: RecordKind, make_meta: Callable[[], bytes]) -> RecordEntry:
        """The volume's first record of ``kind``; if it has none, append one (metadata ``make_meta()``).

        Checked and written under the append lock, so concurrent writers never both append one.
        """
        with self._locked_for_append():
            self._refresh_end()
            for entry in self.records():
                if entry.header.kind == kind:
                    return entry
            meta = make_meta()
            self._upgrade_format()
            record = NewRecord(kind, meta)
            locations, _ = self._append_locked([record], None)
            return RecordEntry(locations[0], record.header())

    def _upgrade_format(self) -> None:
        """Make a version 1 volume version 2 before this code appends to it (under the append lock), so
        that version 1 code refuses it rather than misreads what is appended.  The 64-byte header lies in
        the file's first disk sector, which is written whole."""
        if self.format_version >= FORMAT_VERSION:
            return
        current = _read_file_header(self.path, self._fd)
        if current.version < FORMAT_VERSION:
            os.pwrite(self._fd, pack_file_header(current.volume_id, features=current.features), 0)
            os.fsync(self._fd)
        self.format_version = FORMAT_VERSION

    def cut_back(self, offset: int, expected_end: int) -> bool:
        """Cut the records from ``offset`` (a record boundary) to the end off the file, durably, but only
        if the volume still ends at ``expected_end`` (nobody appended since the caller looked)."""
        with self._locked_for_append():
            if self._refresh_end() != expected_end:
                return False
            self._cut(offset)
            return True

    # -- internals -------------------------------------------------------------------------------------

    def _locked(self) -> _VolumeLock:
        return _VolumeLock(self._lock, self._fd)

    def _locked_for_append(self) -> _VolumeLock:
        if not self.writable:
            raise DcbsError(f"{self.path}: volume is open read-only")
        return self._locked()

    def _append_locked(
        self,
        records: Sequence[NewRecord],
        callback: Callable[[list[RecordLocation], Callable[[], None]], T] | None,
        *,
        concurrent: bool = False,
    ) -> tuple[list[RecordLocation], T | None]:
        """Write records at the end and fsync them, running ``callback(locations, wait_durable)`` after the
        fsync, or with ``concurrent`` while another thread fsyncs; the caller holds the append lock."""
        if os.fstat(self._fd).st_nlink == 0:
            # Compaction copied this volume and unlinked it while we waited for the lock: an
            # append here would land in a file nobody will ever read.
            raise VolumeReplacedError(f"{self.path}: volume was replaced; reopen it")
        start = self._refresh_end()
        sync: _BackgroundSync | None = None
        locations: list[RecordLocation] = []
        try:
            position = start
            for record in records:
                end = self._write_all((record.header().pack(), record.meta, *record.data_parts), position)
                locations.append(RecordLocation(position, end - position))
                position = end
            if concurrent:
                sync = _BackgroundSync(self._fd)
            else:
                os.fdatasync(self._fd)
        except OSError as exc:
            self._cut(start)
            if (full := self._full_error(exc)) is not None:
                raise full from exc
            raise
        try:
            result = None if callback is None else callback(locations, self._waiter(sync))
            if sync is not None:
                self._waiter(sync)()
        except KeepRecord as keep:  # durable already: the callback waited for it
            self._known_end = position
            raise keep.error from None
        except BaseException:
            if sync is not None:
                sync.settle()  # before the cut: no fsync may still be running on the old length
            self._cut(start)
            raise
        self._known_end = position
        return locations, result

    def _waiter(self, sync: _BackgroundSync | None) -> Callable[[], None]:
        """``wait_durable`` for a callback: waits for ``sync`` and raises its error as an append error."""

        def wait_durable() -> None:
            if sync is not None:
                try:
                    sync.wait()
                except OSError as exc:
                    if (full := self._full_error(exc)) is not None:
                        raise full from exc
                    raise

        return wait_durable

    def _full_error(self, exc: OSError) -> VolumeFullError | None:
        """The VolumeFullError to raise for a write or fsync that failed because the disk is full, else None."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return VolumeFullError(f"{self.path}: cannot append: {exc.strerror}")
        return None

    def _write_all(self, parts: Sequence[bytes | memoryview], position: int) -> int:
        """Write ``parts`` one after the other from ``position`` (one system call when it can); returns the
        position after them."""
        views = [memoryview(part) for part in parts if len(part)]
        while views:
            written = os.pwritev(self._fd, views[:_IOV_MAX], position)
            position += written
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if written:
                views[0] = views[0][written:]
        return position

    def _cut(self, offset: int) -> None:
        """Truncate the file back to ``offset`` (a record boundary) and make that durable."""
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self._known_end = offset

    def _refresh_end(self) -> int:
        """Find the end of the last complete record (others may have appended); cut a torn tail.

        Must be called with the volume locked.
        """
        size = self.size()
        end = self._known_end
        if size == end:
            return end
        for entry in self._walk(end, size):
            end = entry.location.offset + entry.location.length
        if end != size:
            self._cut(end)
        self._known_end = end
        return end

    def _walk(self, start: int, size: int) -> Iterator[RecordEntry]:
        position = start
        while position < size:
            remaining = size - position
            if remaining < RECORD_HEADER_SIZE:
                return  # a header cut short by a crash
            raw = self.read_exact(position, RECORD_HEADER_SIZE)
            try:
                header = RecordHeader.unpack(raw)
            except ValueError as exc:
                if self._is_zero_filled(position, size):
                    return  # space allocated by a crashed write but never filled
                raise CorruptRecordError(self.path, position, str(exc)) from None
            if header.total_length > remaining:
                return  # payload cut short by a crash
            yield RecordEntry(RecordLocation(position, header.total_length), header)
            position += header.total_length

    def _is_zero_filled(self, start: int, end: int) -> bool:
        position = start
        while position < end:
            chunk = os.pread(self._fd, min(_ZERO_CHECK_CHUNK, end - position), position)
            if not chunk or chunk.count(0) != len(chunk):
                return False
            position += len(chunk)
        return True


#: Threads that run the fsyncs of appends made with ``on_written`` (one at a time per appending thread).
_SYNC_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dcbs-fsync")


class _BackgroundSync:
    """The ``fdatasync`` of one append, in :data:`_SYNC_THREADS`.

    The constructor returns once the worker is inside the system call: the appending thread blocks on
    that for a moment, which hands the worker the GIL at once.  Otherwise the worker could wait for
    the GIL until the appending thread's next blocking call, and the fsync would overlap nothing.
    """

    def __init__(self, fd: int) -> None:
        started = threading.Event()

        def sync() -> None:
            started.set()
            os.fdatasync(fd)

        self._future: Future[None] = _SYNC_THREADS.submit(sync)
        started.wait()

    def wait(self) -> None:
        """Return once the fsync has finished; raise its ``OSError`` if it failed."""
        self._future.result()

    def settle(self) -> None:
        """Wait for the fsync to end, whatever its outcome (the caller is failing already)."""
        with contextlib.suppress(Exception):
            self._future.result()


class _VolumeLock:
    """Thread lock plus an exclusive ``flock``: one appender at a time, across processes."""

    def __init__(self, lock: threading.Lock, fd: int) -> None:
        self._lock = lock
        self._fd = fd

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()


def _read_file_header(path: Path, fd: int) -> FileHeader:
    data = os.pread(fd, FILE_HEADER_SIZE, 0)
    try:
        return unpack_file_header(data)
    except ValueError as exc:
        raise DcbsFormatError(f"{path}: {exc}") from None


def _create_file(path: Path) -> None:
    """Create a volume atomically: a complete header appears under ``path`` or nothing does.

    The header is written to a temporary file, synced, then hard-linked into place; ``link`` fails if
    another process won the race, in which case its volume is used.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, pack_file_header(uuid.uuid4().bytes))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
