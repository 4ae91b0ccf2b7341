"""Writing a new generation of a volume: its live records, copied or re-encoded, into a new file.

Compaction (``dcbnode/archive/compaction.py``) decides *when* a volume is rewritten and moves the index
to the new file; this module is the part that writes DCBS bytes, so that only :mod:`dcbnode.dcbs` ever
does.  The new file is written durably under a hidden temporary name and linked into place under
``target`` once fsynced (``link`` fails rather than clobber an existing generation); it keeps the old
file's volume id, which is how recovery recognises two generations of one volume.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from .dictionary import SharedDictionary, read_dictionary, replacement_dictionary, unpack_dictionary
from .format import RECORD_HEADER_SIZE, MetaLayout, RecordHeader, RecordKind, crc32, pack_file_header
from .instance import EncodedInstance, reencoded
from .stored import StoredInstance
from .volume import RecordEntry, RecordLocation, Volume, fsync_directory

_COPY_CHUNK = 8 << 20
Pause = Callable[[str], None] | None


def write_generation(volume: Volume, target: Path, dictionaries: list[RecordEntry], live: list[StoredInstance],
                     pause: Pause = None) -> dict[str, RecordLocation]:
    """Write the dictionary, then the live records, into ``target`` (same volume id); returns the new
    locations by UID.

    Records are copied byte for byte, except when the instance the dictionary was made from is no longer
    live: then the dictionary is made anew from the first live record, and the metadata of the records
    that used the old one is recompressed with it (their frames are still copied as they are), so that
    a deleted instance's header does not survive in the dictionary.
    """
    live = sorted(live, key=lambda s: s.location.offset)
    replacement = _replacement_dictionary(volume, dictionaries, live)

    def write_dictionaries(fd: int) -> int:
        if replacement is not None:
            _, new, block = replacement
            return _write_record(fd, RecordHeader(RecordKind.DICTIONARY, len(block), len(block), new.id), block)
        for entry in dictionaries:
            read_dictionary(volume, entry.location.offset)  # checked like every record copied
            _copy(volume, fd, entry.location)
        return sum(entry.location.length for entry in dictionaries)

    def write_record(fd: int, stored: StoredInstance) -> int:
        for _ in stored.iter_frames():  # never copy a damaged record into the new generation
            pass
        record_header, block = volume.read_meta(stored.location.offset)
        if replacement is not None and record_header.layout == MetaLayout.COMPACT \
                and record_header.dictionary_id == replacement[0].id:
            old, new, _ = replacement
            return _recompressed(volume, fd, stored.location, record_header, old.decompress(block), new)
        _copy(volume, fd, stored.location)
        return stored.location.length

    return _write_file(volume, target, live, write_dictionaries, write_record, pause)


def write_reencoded_generation(volume: Volume, target: Path, live: list[StoredInstance],
                               pause: Pause = None) -> dict[str, RecordLocation]:
    """Write every live record of ``volume`` re-encoded (see :func:`~dcbnode.dcbs.instance.reencoded`) into
    ``target``, after a dictionary made from the first of them; returns the new locations by UID.

    At most two records are in memory at a time (the first, which the dictionary is made from, is kept
    until it is written).  Each is checked before it is written: its frames were verified lossless by
    the encoder, and its metadata must read back as it was (``EncodedInstance.record``).
    """
    live = sorted(live, key=lambda s: s.location.offset)
    first = [reencoded(live[0])]
    block = first[0].dictionary_candidate()
    dictionary = unpack_dictionary(block, crc32(block))

    def write_dictionary(fd: int) -> int:
        return _write_record(fd, RecordHeader(RecordKind.DICTIONARY, len(block), len(block), dictionary.id), block)

    def write_record(fd: int, stored: StoredInstance) -> int:
        encoded = first.pop() if first else reencoded(stored)
        return _write_encoded(fd, encoded, dictionary)

    return _write_file(volume, target, live, write_dictionary, write_record, pause)


def _write_file(volume: Volume, target: Path, live: list[StoredInstance], write_dictionaries: Callable[[int], int],
                write_record: Callable[[int, StoredInstance], int],
                pause: Pause) -> dict[str, RecordLocation]:
    """Create ``target`` (a new generation of ``volume``) durably: the file header, the dictionary records
    (``write_dictionaries(fd)`` returns the bytes it wrote), then each of ``live`` by
    ``write_record(fd, record)`` (likewise), into a hidden temporary file that is linked into place once
    fsynced.  Returns the new location of each record by UID; ``pause("copying")`` after each."""
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    locations: dict[str, RecordLocation] = {}
    try:
        header = pack_file_header(volume.volume_id)
        os.write(fd, header)
        position = len(header) + write_dictionaries(fd)
        for stored in live:
            length = write_record(fd, stored)
            locations[stored.meta.sop_instance_uid] = RecordLocation(position, length)
            position += length
            if pause:
                pause("copying")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if pause:
            pause("synced")
        os.link(temporary, target)  # fails rather than clobber an existing generation
        fsync_directory(target.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        temporary.unlink(missing_ok=True)
    return locations


def _replacement_dictionary(
    volume: Volume, dictionaries: list[RecordEntry], live: list[StoredInstance]
) -> tuple[SharedDictionary, SharedDictionary, bytes] | None:
    """``(old, new, new's metadata block)`` when the volume's dictionary must be made anew from the first
    live record (the one it was made from is gone); None to keep it."""
    if len(dictionaries) != 1 or not live:
        return None
    old = read_dictionary(volume, dictionaries[0].location.offset)
    record_header, block = volume.read_meta(live[0].location.offset)
    if record_header.layout != MetaLayout.COMPACT or record_header.dictionary_id != old.id:
        return None
    content = old.decompress(block)
    if content == old.content:  # the dictionary's own instance is still the first live one
        return None
    return (old, *replacement_dictionary(old, content))


def _recompressed(volume: Volume, fd: int, location: RecordLocation, header: RecordHeader, content: bytes,
                  dictionary: SharedDictionary) -> int:
    """Write a COMPACT record with its metadata ``content`` compressed against ``dictionary`` and its frame
    data copied from ``location``; returns the bytes written."""
    block = dictionary.compress(content)  # checked to read back
    frames = header.payload_length - header.meta_length
    written = _write_record(fd, RecordHeader(RecordKind.INSTANCE, len(block) + frames, len(block), crc32(block),
                                             MetaLayout.COMPACT, dictionary.id), block)
    _copy(volume, fd, RecordLocation(location.offset + RECORD_HEADER_SIZE + header.meta_length, frames))
    return written + frames


def _write_encoded(fd: int, encoded: EncodedInstance, dictionary: SharedDictionary) -> int:
    """Write a COMPACT instance record of ``encoded`` using ``dictionary``; returns the bytes written."""
    block, frames = encoded.record(dictionary)  # checked to read back
    data_length = sum(len(frame) for frame in frames)
    written = _write_record(fd, RecordHeader(RecordKind.INSTANCE, len(block) + data_length, len(block),
                                             crc32(block), MetaLayout.COMPACT, dictionary.id), block)
    for frame in frames:
        _write_all(fd, frame)
    return written + data_length


def _write_record(fd: int, header: RecordHeader, meta: bytes) -> int:
    """Write a record header and its metadata block; returns the bytes written."""
    _write_all(fd, header.pack() + meta)
    return RECORD_HEADER_SIZE + len(meta)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy(volume: Volume, fd: int, location: RecordLocation) -> None:
    """Append one record of ``volume`` to the file ``fd``, byte for byte."""
    start, length = location.offset, location.length
    for chunk_start in range(0, length, _COPY_CHUNK):
        _write_all(fd, volume.read_exact(start + chunk_start, min(_COPY_CHUNK, length - chunk_start)))
