"""Read access to one instance record in a volume, every byte checked."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .dictionary import find_dictionary, restore_codestream
from .errors import CorruptRecordError, DcbsFormatError
from .format import RECORD_HEADER_SIZE, MetaLayout, RecordKind
from .record import Codec, InstanceBlobs, InstanceMeta, NewerRecordError, unpack_content, unpack_meta
from .volume import RecordLocation, Volume


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """An instance record: its metadata, and its frames read on demand with one ``pread`` each."""

    volume: Volume
    location: RecordLocation
    meta: InstanceMeta
    blobs: InstanceBlobs
    frames_start: int  #: absolute file offset of the first frame
    #: the volume dictionary's HTJ2K main header, for frames stored as ``htj2k-shared`` (else b"")
    codestream_header: bytes = b""

    @classmethod
    def read(cls, volume: Volume, offset: int) -> StoredInstance:
        """Read and check the instance record at ``offset``."""
        header, block = volume.read_meta(offset)
        if header.kind != RecordKind.INSTANCE:
            raise CorruptRecordError(volume.path, offset, f"expected an instance record, found {header.kind.name}")
        codestream_header = b""
        try:
            if header.layout == MetaLayout.COMPACT:
                dictionary = find_dictionary(volume, header.dictionary_id, record_offset=offset)
                codestream_header = dictionary.codestream_header
                meta, blobs = unpack_content(dictionary.decompress(block))
            else:
                meta, blobs = unpack_meta(block)
        except CorruptRecordError:
            raise
        except NewerRecordError as exc:
            raise DcbsFormatError(f"{volume.path}: record at offset {offset}: {exc}") from None
        except Exception as exc:  # json, zstd and dataclass errors: the block is damaged
            raise CorruptRecordError(volume.path, offset, f"unreadable record metadata: {exc}") from exc
        frames_start = offset + RECORD_HEADER_SIZE + header.meta_length
        data_length = header.payload_length - header.meta_length
        if any(entry.offset + entry.length > data_length for entry in meta.frames):
            raise CorruptRecordError(volume.path, offset, "frame table points outside the record")
        return cls(volume, RecordLocation(offset, header.total_length), meta, blobs, frames_start, codestream_header)

    @property
    def frame_count(self) -> int:
        """Number of stored frames (1 for packed 1-bit data, whatever NumberOfFrames says)."""
        return len(self.meta.frames)

    def frame(self, index: int) -> bytes:
        """Frame ``index`` as its codec's decoder takes it: the stored bytes, checked against their CRC
        (with the shared codestream header put back for ``htj2k-shared``)."""
        entry = self.meta.frames[index]
        data = self.volume.read_checked(self.frames_start + entry.offset, entry.length, entry.crc,
                                        record_offset=self.location.offset)
        return restore_codestream(self.codestream_header, data) if entry.codec == Codec.HTJ2K_SHARED else data

    def iter_frames(self) -> Iterator[bytes]:
        """Every stored frame in order, one read each."""
        for index in range(self.frame_count):
            yield self.frame(index)
