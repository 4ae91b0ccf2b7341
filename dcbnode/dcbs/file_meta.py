"""The File Meta Information group (PS3.10 7.1), encoded directly as Explicit VR Little Endian bytes.

Going through pydicom's ``write_file_meta_info`` cost more than a whole HTJ2K rebuild and a good part of
each received C-STORE; the group has a handful of short elements, so they are packed here.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from .syntaxes import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

#: (0002,0001) File Meta Information Version: 00 01.
_VERSION = b"\x00\x01"
#: VRs with a 4-byte length field in Explicit VR (PS3.5 Table 7.1-1) among those the group uses.
_LONG_VRS = frozenset({"OB", "UN", "UT", "UR", "UC", "OW", "SQ"})


def meta_element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002."""
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def even(data: bytes, pad: bytes = b"\0") -> bytes:
    """``data`` padded to an even length (PS3.5 7.1.1)."""
    return data + pad if len(data) % 2 else data


def uid_value(uid: str) -> bytes:
    """A UI value: ASCII, padded with NUL (PS3.5 9.1)."""
    return even(uid.encode("ascii"), b"\0")


def writer_elements(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> dict[int, bytes]:
    """The elements that describe the instance and its writer (dcbnode), encoded, by tag."""
    return {
        0x00020001: meta_element(0x00020001, "OB", _VERSION),
        0x00020002: meta_element(0x00020002, "UI", uid_value(sop_class_uid)),
        0x00020003: meta_element(0x00020003, "UI", uid_value(sop_instance_uid)),
        0x00020010: meta_element(0x00020010, "UI", uid_value(transfer_syntax)),
        0x00020012: meta_element(0x00020012, "UI", uid_value(IMPLEMENTATION_CLASS_UID)),
        0x00020013: meta_element(0x00020013, "SH", even(IMPLEMENTATION_VERSION_NAME.encode(), b" ")),
    }


def file_meta_group(elements: Mapping[int, bytes]) -> bytes:
    """The whole group, in tag order, led by its (0002,0000) group length."""
    body = b"".join(elements[tag] for tag in sorted(elements) if tag != 0x00020000)
    return meta_element(0x00020000, "UL", struct.pack("<I", len(body))) + body


def received_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae_title: str
) -> bytes:
    """The file meta of an instance received over the network: dcbnode wrote it, the sender's AE title
    goes in Source Application Entity Title (PS3.10 7.1)."""
    elements = writer_elements(sop_class_uid, sop_instance_uid, transfer_syntax)
    if source_ae_title:
        # AE is the default repertoire (PS3.5 6.2); whatever else a peer sent becomes "?".
        value = source_ae_title.encode("ascii", "replace")
        elements[0x00020016] = meta_element(0x00020016, "AE", even(value, b" "))
    return file_meta_group(elements)
