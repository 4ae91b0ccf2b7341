"""The volume dictionary: what the instance records of one volume share, stored once.

The instances of a series differ in a few values (UIDs, positions, instance numbers, frame checksums);
the rest of their metadata and the main header of every HTJ2K codestream are the same.  The first
instance appended to a volume writes a dictionary record (kind 3) holding

* ``content``: that instance's uncompressed metadata content, used as a zstd raw-content dictionary
  for the metadata of every instance record (``MetaLayout.COMPACT``), and
* ``codestream_header``: the main header (SOC up to the first SOT marker) of its first HTJ2K frame;
  a frame whose codestream is exactly that header, one tile-part header and the end marker is stored
  as its tile-part body alone (codec ``htj2k-shared``) and put back together on reading.

A dictionary never changes once written and is fsynced before any record uses it.  Instance records
name it by its id, the CRC-32 of its metadata block (their record header's ``dictionary_id``), so it
stays valid when compaction copies it into a new generation.  See ``docs/dcbs-format.md``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zstandard

from .errors import CorruptRecordError, DcbsError
from .format import RecordKind, crc32

if TYPE_CHECKING:
    from .volume import Volume

_LENGTH = struct.Struct("<I")
#: Metadata is compressed once at ingest and read often; level 19 costs ≈1 ms per instance and gave
#: 105.7 bytes per bench CT slice against 114.8 at level 9 (before the identity fields were left out).
_ZSTD_LEVEL = 19
#: For records whose compression the node deferred: compaction rewrites them (at ``_ZSTD_LEVEL``) anyway,
#: and level 19 would cost ingest ≈1 ms per instance.
FAST_ZSTD_LEVEL = 3
_SOC, _SOT, _SOD, _EOC = b"\xff\x4f", b"\xff\x90", b"\xff\x93", b"\xff\xd9"
#: SOT marker segment: marker, Lsot = 10, tile index 0, Psot (filled in), tile-part 0 of 1
_SOT_SEGMENT = struct.Struct(">2sHHIBB")


@dataclass(frozen=True, slots=True)
class SharedDictionary:
    """A dictionary record, decoded: compresses and decompresses metadata with its content.

    zstd contexts are made per call: python-zstandard's are not safe to share between threads (the
    archive stores from several), and a fresh one costs ≈20 µs, against ≈1 ms to compress.
    """

    id: int
    content: bytes
    codestream_header: bytes

    def compress(self, content: bytes, *, level: int = _ZSTD_LEVEL) -> bytes:
        """A COMPACT metadata block from the metadata content of an instance; raises :class:`DcbsError`
        if the block would not read back (never write metadata that would not)."""
        # No magic, content size or checksum in the frame: the record header says what the block is
        # and checks it, and they would add up to 10 bytes per instance.
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            source_size=len(content),
            dict_size=len(self.content),
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            write_content_size=False,
            write_checksum=False,
            write_dict_id=False,
        )
        block = zstandard.ZstdCompressor(dict_data=self._zstd(), compression_params=params).compress(content)
        if self.decompress(block) != content:
            raise DcbsError("compressed metadata does not read back")
        return block

    def decompress(self, block: bytes) -> bytes:
        """The metadata content of a COMPACT metadata block; raises ``zstandard.ZstdError`` if damaged."""
        decompressor = zstandard.ZstdDecompressor(
            dict_data=self._zstd(), format=zstandard.FORMAT_ZSTD1_MAGICLESS
        ).decompressobj()
        content = decompressor.decompress(block)
        if not decompressor.eof:
            raise zstandard.ZstdError("metadata block ends inside its zstd frame")
        return content

    def _zstd(self) -> zstandard.ZstdCompressionDict:
        return zstandard.ZstdCompressionDict(self.content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def strip_codestream(header: bytes, codestream: bytes) -> bytes | None:
    """The tile-part body of ``codestream`` when :func:`restore_codestream` gives it back exactly, else None."""
    if not header or not codestream.startswith(header) or not codestream.endswith(_EOC):
        return None
    start = len(header) + _SOT_SEGMENT.size + len(_SOD)
    body = codestream[start : len(codestream) - len(_EOC)]
    return body if restore_codestream(header, body) == codestream else None


def restore_codestream(header: bytes, body: bytes) -> bytes:
    """The whole codestream of a frame stored as ``htj2k-shared``: shared main header, SOT, SOD, body, EOC."""
    tile_part_length = _SOT_SEGMENT.size + len(_SOD) + len(body)
    sot = _SOT_SEGMENT.pack(_SOT, 10, 0, tile_part_length, 0, 1)
    return b"".join((header, sot, _SOD, body, _EOC))


def codestream_header(codestream: bytes) -> bytes:
    """The main header of a JPEG 2000 codestream (SOC up to the first SOT marker), or b"" if malformed."""
    if not codestream.startswith(_SOC):
        return b""
    position = len(_SOC)
    while position + 4 <= len(codestream):
        marker = codestream[position : position + 2]
        if marker == _SOT:
            return codestream[:position]
        if marker[0] != 0xFF:
            return b""
        position += 2 + int.from_bytes(codestream[position + 2 : position + 4], "big")
    return b""


def pack_dictionary(content: bytes, header: bytes) -> bytes:
    """Metadata block of a dictionary record: zstd of ``u32 len(content) | content | codestream header``."""
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(b"".join((_LENGTH.pack(len(content)), content, header)))


def replacement_dictionary(old: SharedDictionary, content: bytes) -> tuple[SharedDictionary, bytes]:
    """A dictionary made from ``content`` instead of ``old``'s, with the same codestream header (so that
    ``htj2k-shared`` frames stay valid as they are), and its metadata block.  Compaction uses it when the
    instance a dictionary was made from is gone: its header must not outlive its deletion."""
    block = pack_dictionary(content, old.codestream_header)
    return SharedDictionary(crc32(block), content, old.codestream_header), block


def unpack_dictionary(block: bytes, dictionary_id: int) -> SharedDictionary:
    """Decode a dictionary record's metadata block; raises ``ValueError`` or ``ZstdError`` if malformed."""
    data = zstandard.ZstdDecompressor().decompress(block)
    if len(data) < _LENGTH.size:
        raise ValueError("dictionary record too short")
    (length,) = _LENGTH.unpack_from(data)
    end = _LENGTH.size + length
    if end > len(data):
        raise ValueError("dictionary content longer than its record")
    return SharedDictionary(dictionary_id, data[_LENGTH.size : end], data[end:])


def read_dictionary(volume: Volume, offset: int) -> SharedDictionary:
    """Read and check the dictionary record at ``offset`` (cached per open volume by id)."""
    header, block = volume.read_meta(offset)
    if header.kind != RecordKind.DICTIONARY:
        raise CorruptRecordError(volume.path, offset, f"expected a dictionary record, found {header.kind.name}")
    cached = volume.dictionaries.get(header.meta_crc)
    if cached is not None:
        return cached
    try:
        dictionary = unpack_dictionary(block, header.meta_crc)
    except (ValueError, zstandard.ZstdError) as exc:
        raise CorruptRecordError(volume.path, offset, f"unreadable dictionary record: {exc}") from exc
    volume.dictionaries[dictionary.id] = dictionary
    return dictionary


def find_dictionary(volume: Volume, dictionary_id: int, *, record_offset: int) -> SharedDictionary:
    """The dictionary a COMPACT record at ``record_offset`` names, read once per open volume.

    Writers put it before the first record that uses it (normally it is the volume's first record).
    """
    cached = volume.dictionaries.get(dictionary_id)
    if cached is not None:
        return cached
    for entry in volume.records():
        if entry.location.offset >= record_offset:
            break
        if entry.header.kind == RecordKind.DICTIONARY and entry.header.meta_crc == dictionary_id:
            return read_dictionary(volume, entry.location.offset)
    raise CorruptRecordError(volume.path, record_offset, f"dictionary {dictionary_id:08x} not found before the record")


def dictionary_for_append(volume: Volume, candidate: Callable[[], bytes]) -> SharedDictionary:
    """The volume's dictionary for new records; the first append to a volume writes ``candidate()``.

    The check and the write happen under the volume's append lock, so concurrent writers (threads or
    processes) agree on one dictionary; it is durable before this returns.
    """
    if volume.writer_dictionary is not None:
        return volume.writer_dictionary
    entry = volume.append_once(RecordKind.DICTIONARY, candidate)
    dictionary = read_dictionary(volume, entry.location.offset)
    volume.writer_dictionary = dictionary
    return dictionary
