"""DIMSE messages laid out by dcbnode: the bytes pynetdicom 3.0 would send, built faster.

Used only by dcbnode's own associations (:mod:`.provider`); pynetdicom itself is not changed.

1. **Pre-encoded data sets** (:class:`EncodedDataset`).  A C-GET / C-MOVE handler must yield a pydicom
   ``Dataset`` per sub-operation (pynetdicom's QR service class counts anything else as failed), and
   pynetdicom's ``Association.send_c_store`` encodes it with pydicom.  Re-parsing the rebuilt bytes into
   a pydicom Dataset costs 5.5–7 ms per 512² CT instance, more than the whole send; so an
   :class:`EncodedDataset` carries the bytes, and dcbnode's associations send them unchanged.

2. **One socket write per DIMSE message** (:func:`pdata_pdus`, :class:`EncodedMessage`).  pynetdicom's
   ``DIMSEServiceProvider.send_msg`` queues one P-DATA primitive per PDU, and its DUL thread handles one
   queued primitive per loop iteration (state machine, PDU object, encode, ``socket.send``, events):
   ≈ 140 µs of Python per PDU, 33 PDUs for a 512 KB instance at a 16 KiB maximum PDU, whatever the data.
   Here the command set is laid out with ``struct`` (:func:`command_elements`: the same bytes as
   pynetdicom's, which builds a pydicom Dataset and encodes it twice, ≈ 1.4 ms per message; values it
   does not handle, e.g. an AT Offending Element, still go through pynetdicom), then every P-DATA-TF
   PDU of the message — one PDV per PDU, fragmented exactly as pynetdicom does (PS3.8 9.3.5, E.2), so
   the bytes on the wire are unchanged — and they are queued as ONE primitive, sent with one
   ``socket.send`` through the same queue and state machine transition (Evt9 → DT-1, or AR-7 during a
   release collision) as pynetdicom's own P-DATA.  ``EVT_DIMSE_SENT`` handlers get the message
   pynetdicom would have built (:func:`dimse_message`).

3. **The C-STORE replies read with ``struct``** (:func:`store_response`).  Each sub-operation of a
   retrieve waits for a C-STORE-RSP, which pynetdicom decodes into a pydicom Dataset and then a primitive
   with every UID validated by regular expression (≈ 100 µs of the association's GIL per reply).  A reply
   of the usual form (one PDV, no data set, only the elements every Storage SCP sends) is read here into
   the same primitive; any other goes through pynetdicom.
"""

from __future__ import annotations

import functools
import struct
from io import BytesIO
from typing import Any

import pynetdicom.dimse_messages
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

__all__ = [
    "CommandElements",
    "EncodedBytesIO",
    "EncodedDataset",
    "EncodedMessage",
    "EncodedPDUs",
    "command_elements",
    "dimse_message",
    "encode_command",
    "encoded_pdus",
    "pdata_pdus",
    "store_response",
]

_PDU_HEADER = struct.Struct(">BBL")  # PDU type 0x04 (P-DATA-TF), reserved, PDU length
_PDV_HEADER = struct.Struct(">LBB")  # PDV item length, presentation context ID, message control header
_P_DATA_TF = 0x04
_COMMAND, _LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)


# -- 1. pre-encoded data sets --------------------------------------------------------------------------------


_SOP_CLASS_UID, _SOP_INSTANCE_UID = 0x00080016, 0x00080018


@functools.cache
def _file_meta(transfer_syntax: str) -> FileMetaDataset:
    file_meta = FileMetaDataset()
    file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return file_meta


class EncodedDataset(Dataset):
    """An instance already encoded in ``transfer_syntax``, for ``send_c_store`` to send unchanged.

    It holds only SOP Class/Instance UID and the file meta Transfer Syntax UID that pynetdicom reads to
    pick the presentation context; ``encoded`` is ``None`` for an instance that must fail.
    """

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                 encoded: bytes | bytearray | None, reason: str = "") -> None:
        super().__init__()
        # Built once per instance sent, so without pydicom's per-value validation (the UIDs come from
        # the index) and with one shared, never modified, file meta per transfer syntax.
        self[_SOP_CLASS_UID] = DataElement(_SOP_CLASS_UID, "UI", sop_class_uid, validation_mode=config.IGNORE)
        self[_SOP_INSTANCE_UID] = DataElement(_SOP_INSTANCE_UID, "UI", sop_instance_uid, validation_mode=config.IGNORE)
        self.file_meta = _file_meta(transfer_syntax)
        syntax = self.file_meta.TransferSyntaxUID
        self.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian)
        self._encoded = encoded
        self._reason = reason

    @property
    def encoded(self) -> bytes | bytearray | None:
        """The dataset bytes, or ``None`` when this instance is a failure placeholder."""
        return self._encoded

    @property
    def reason(self) -> str:
        """Why the instance cannot be sent (placeholders only)."""
        return self._reason


class EncodedBytesIO(BytesIO):
    """The ``BytesIO`` pynetdicom's primitives require for a data set, holding ``value`` without copying it
    (``BytesIO(bytearray)`` copies 0.5 MB per CT slice); :class:`~.provider.NodeDIMSE` sends ``value``."""

    def __init__(self, value: bytes | bytearray) -> None:
        super().__init__()
        self.value = value

    def getvalue(self) -> bytes:
        """The data set's bytes (a copy, for whoever else asks: e.g. ``EVT_DIMSE_SENT`` handlers)."""
        return bytes(self.value)


# -- 2. one socket write per DIMSE message -------------------------------------------------------------------


def pdata_pdus(context_id: int, command: bytes, dataset: bytes | bytearray, max_pdu: int) -> bytes:
    """Every P-DATA-TF PDU of one DIMSE message, encoded: the command set, then the data set (if any).

    One PDV per PDU, each PDU's PDV list at most ``max_pdu`` bytes (the peer's Maximum Length; 0 = no
    limit, one PDU each for command and data set), as pynetdicom's ``DIMSEMessage.encode_msg`` does.
    """
    if 0 < max_pdu < 8:
        raise ValueError(f"maximum PDU length {max_pdu} leaves no room for a PDV")
    parts: list[bytes | memoryview] = []
    for data, control in ((command, _COMMAND), (dataset, 0)):
        size = max_pdu - 6 if max_pdu else len(data)
        view = memoryview(data)
        for offset in range(0, len(data), size or 1):
            fragment = view[offset : offset + size]
            last = _LAST if offset + size >= len(data) else 0
            parts.append(_PDU_HEADER.pack(_P_DATA_TF, 0, len(fragment) + 6))
            parts.append(_PDV_HEADER.pack(len(fragment) + 2, context_id, control | last))
            parts.append(fragment)
    return b"".join(parts)


class EncodedPDUs(bytes):
    """Encoded P-DATA-TF PDUs, carried as the one presentation data value of an :class:`EncodedMessage`."""


class EncodedMessage(P_DATA):
    """A P-DATA request carrying all the encoded P-DATA-TF PDUs of one DIMSE message.

    A ``P_DATA`` so that pynetdicom's DUL routes it like its own (Evt9, then DT-1 or AR-7, which wrap it
    in a ``P_DATA_TF`` and hand that to ``DULServiceProvider._send``); its one presentation data value
    is an :class:`EncodedPDUs`, which dcbnode's DUL sends as it is.
    """

    def __init__(self, context_id: int, pdus: bytes) -> None:
        super().__init__()
        self.presentation_data_value_list = [[context_id, EncodedPDUs(pdus)]]


def encoded_pdus(pdu: object) -> EncodedPDUs | None:
    """The bytes of a ``P_DATA_TF`` made from an :class:`EncodedMessage`; ``None`` for any other PDU."""
    items = getattr(pdu, "presentation_data_value_items", None)
    if isinstance(pdu, P_DATA_TF) and items is not None and len(items) == 1:
        value = items[0].presentation_data_value
        if isinstance(value, EncodedPDUs):
            return value
    return None


_COMMAND_FIELDS = {kind: value for value, (_, kind) in pynetdicom.dimse_messages._MESSAGE_TYPES.items()}
_TEXT_PADDING = {"UI": b"\0", "AE": b" ", "LO": b" "}


@functools.cache
def _command_elements(message_class: type) -> tuple[tuple[str, int, str], ...]:
    """(keyword, tag, VR) of the command elements of ``message_class`` but Command Group Length, by tag."""
    keywords = pynetdicom.dimse_messages._COMMAND_SET_KEYWORDS[message_class.__name__.replace("_", "-")]
    elements = [(k, tag_for_keyword(k), dictionary_VR(k)) for k in keywords if k != "CommandGroupLength"]
    return tuple(sorted(elements, key=lambda element: element[1]))


#: A command set as laid out here: (tag, VR, encoded value) per element, Command Group Length first.
CommandElements = list[tuple[int, str, bytes]]


def command_elements(primitive: Any, message_class: type, has_dataset: bool) -> CommandElements | None:
    """The command set pynetdicom would send for ``primitive`` as ``message_class``, element by element.

    The same elements and values as pynetdicom's ``primitive_to_message`` (which builds a pydicom
    Dataset, and encodes it twice with ``encode``: ≈ 1.4 ms per message), laid out with ``struct``.
    ``None`` when a value is not one handled here (e.g. an AT Offending Element, non-ASCII text):
    pynetdicom encodes those.
    """
    elements: CommandElements = []
    for keyword, tag, vr in _command_elements(message_class):
        if keyword == "CommandField":
            value: Any = _COMMAND_FIELDS[message_class]
        elif keyword == "CommandDataSetType":
            value = 0x0001 if has_dataset else 0x0101
        elif not hasattr(primitive, keyword):
            value = b""  # pynetdicom keeps the element, empty
        else:
            value = getattr(primitive, keyword)
            if value is None:
                continue  # pynetdicom deletes the element
        if isinstance(value, bytes):
            encoded = value
        elif vr == "US" and type(value) is int and 0 <= value <= 0xFFFF:
            encoded = struct.pack("<H", value)
        elif vr in _TEXT_PADDING and isinstance(value, str) and value.isascii():
            encoded = value.encode("ascii")
            encoded += _TEXT_PADDING[vr] * (len(encoded) % 2)
        else:
            return None
        elements.append((tag, vr, encoded))
    group_length = sum(8 + len(value) for _, _, value in elements)
    return [(0x00000000, "UL", struct.pack("<I", group_length)), *elements]


def encode_command(elements: CommandElements) -> bytes:
    """The command set's bytes: Implicit VR Little Endian (PS3.7 6.3.1)."""
    return b"".join(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value for tag, _, value in elements)


def dimse_message(message_class: type, context_id: int, elements: CommandElements, dataset: BytesIO | None) -> Any:
    """The DIMSE message ``EVT_DIMSE_SENT`` (``EVT_DIMSE_RECV``) handlers get: what ``primitive_to_message``
    (``decode_msg``) would have built.

    Its command set holds the elements sent as raw elements (pydicom converts a value when it is read);
    ``__init__`` is skipped: it only builds an empty pydicom command set, to be replaced at once.
    """
    message = message_class.__new__(message_class)
    message.context_id = context_id
    message.encoded_command_set = BytesIO()
    message.command_set = Dataset(
        {
            BaseTag(tag): RawDataElement(BaseTag(tag), vr, len(value), value, 0, True, True, True, False)
            for tag, vr, value in elements
        }
    )
    message.data_set = dataset if message_class.__name__ in pynetdicom.dimse_messages._DATASET_KEYWORDS else BytesIO()
    message._data_set_path = None
    message._data_set_file = None
    return message


# -- 3. the C-STORE replies read with struct -----------------------------------------------------------------

_ELEMENT = struct.Struct("<HHI")  # Implicit VR Little Endian element header: group, element, value length
_US = struct.Struct("<H")
#: The command elements of a C-STORE-RSP read here (any other element: pynetdicom reads the reply).
_STORE_RESPONSE_VRS = {0x00000000: "UL", 0x00000002: "UI", 0x00000100: "US", 0x00000120: "US", 0x00000800: "US",
                       0x00000900: "US", 0x00001000: "UI"}
_C_STORE_RSP, _NO_DATA_SET = 0x8001, 0x0101


def store_response(primitive: Any) -> tuple[int, C_STORE, CommandElements] | None:
    """A received P-DATA holding a whole C-STORE-RSP command set without a data set, as pynetdicom's
    ``decode_msg`` and ``message_to_primitive`` would make it: (context ID, primitive, elements); ``None``
    for any other P-DATA (pynetdicom decodes those)."""
    values = getattr(primitive, "presentation_data_value_list", None)
    if not isinstance(primitive, P_DATA) or not values or len(values) != 1:
        return None
    context_id, data = values[0]
    if len(data) < 1 or data[0] & 0x03 != 0x03:  # not a command set's last (and only) fragment
        return None
    elements: CommandElements = []
    fields: dict[int, bytes] = {}
    position, end = 1, len(data)
    while position < end:
        if position + _ELEMENT.size > end:
            return None
        group, element, length = _ELEMENT.unpack_from(data, position)
        tag = group << 16 | element
        value = bytes(data[position + _ELEMENT.size : position + _ELEMENT.size + length])
        vr = _STORE_RESPONSE_VRS.get(tag)
        if (vr is None or tag in fields or len(value) != length or (vr == "US" and length != 2)
                or (vr == "UI" and b"\\" in value)):  # several values: pynetdicom takes the first, and warns
            return None
        elements.append((tag, vr, value))
        fields[tag] = value
        position += _ELEMENT.size + length
    numbers = {tag: _US.unpack(value)[0] for tag, value in fields.items() if _STORE_RESPONSE_VRS[tag] == "US"}
    if (numbers.get(0x00000100) != _C_STORE_RSP or numbers.get(0x00000800) != _NO_DATA_SET
            or 0x00000120 not in numbers or 0x00000900 not in numbers):
        return None
    response = C_STORE()
    try:
        response.MessageIDBeingRespondedTo = numbers[0x00000120]
        response.Status = numbers[0x00000900]
        for tag, keyword in ((0x00000002, "AffectedSOPClassUID"), (0x00001000, "AffectedSOPInstanceUID")):
            if tag in fields:  # pynetdicom's setter validates it, as when pynetdicom decodes the reply
                setattr(response, keyword, fields[tag].rstrip(b"\0 ").decode("ascii"))
    except (ValueError, TypeError, UnicodeDecodeError):  # pynetdicom reports it (Evt19)
        return None
    response._context_id = context_id
    return context_id, response, elements
