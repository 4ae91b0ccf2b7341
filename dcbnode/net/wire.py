"""The pynetdicom 3.0 internals dcbnode replaces, all in this module: how messages reach the socket, and
how a reply reaches the call that waits for it, and how a received message reaches its handler.

Six replacements, all installed process-wide at import (:func:`install`), all checked against
pynetdicom 3.0.4 so that an incompatible pynetdicom fails the import (``ImportError``) instead of
silently sending something else:

1. **Pre-encoded data sets** (:class:`EncodedDataset`).  A C-GET / C-MOVE handler must yield a pydicom
   ``Dataset`` per sub-operation (pynetdicom's QR service class counts anything else as failed), and
   ``Association.send_c_store`` encodes it with ``pynetdicom.association.encode`` (pydicom's
   ``write_dataset``).  pynetdicom's supported way to send pre-encoded bytes,
   ``_config.STORE_SEND_CHUNKED_DATASET`` with ``send_c_store(path)``, applies only when the application
   calls ``send_c_store`` itself with a file path, never to handler yields; the supported alternative,
   re-parsing the rebuilt bytes into a pydicom Dataset, costs 5.5–7 ms per 512² CT instance, more than
   the whole send.  So the ``encode`` that ``send_c_store`` looks up returns an :class:`EncodedDataset`'s
   bytes and delegates everything else to pynetdicom's own ``encode``.

2. **One socket write per DIMSE message** (:func:`pdata_pdus`, :class:`EncodedMessage`).  pynetdicom's
   ``DIMSEServiceProvider.send_msg`` queues one P-DATA primitive per PDU, and its DUL thread handles one
   queued primitive per loop iteration (state machine, PDU object, encode, ``socket.send``, events):
   ≈ 140 µs of Python per PDU, 33 PDUs for a 512 KB instance at a 16 KiB maximum PDU, whatever the data.
   Here ``send_msg`` lays out the command set itself (:func:`command_elements`: the same bytes as
   pynetdicom's, which builds a pydicom Dataset and encodes it twice, ≈ 1.4 ms per message; values it
   does not handle, e.g. an AT Offending Element, still go through pynetdicom), then every P-DATA-TF
   PDU of the message with ``struct`` — one PDV per PDU, fragmented exactly as pynetdicom does (PS3.8
   9.3.5, E.2), so the bytes on the wire are unchanged — and queues them as ONE primitive.  The DUL
   thread sends it with one ``socket.send`` through the same queue and state machine transition (Evt9
   → DT-1, or AR-7 during a release collision) as pynetdicom's own P-DATA, so ordering with every
   other PDU and the state machine are untouched.  ``EVT_DIMSE_SENT`` handlers (e.g.
   :mod:`.associations`) get the message pynetdicom would have built, its command set made of the
   elements sent (converted by pydicom when read); it is built only when such a handler is bound.
   Not fired for these PDUs: ``EVT_PDU_SENT`` (no handler of dcbnode's uses it; pynetdicom's own only
   log at DEBUG).  A message pynetdicom streams from a file (``STORE_SEND_CHUNKED_DATASET``) keeps
   pynetdicom's path.

3. **The DUL thread's idle wait** (:class:`_DulTime`).  With nothing to do, pynetdicom's DUL loop
   sleeps ``_run_loop_delay`` (1 ms) before it looks at the socket and its queue again: up to 1 ms
   before a queued message is sent and another before the peer's reply is read, for every C-STORE of
   a retrieve.  In a DUL thread the ``sleep`` pynetdicom.dul calls waits instead, at most as long, for
   the peer's data or for :func:`_send_msg` to queue a message (an eventfd), so the loop runs again at
   once.  Anywhere else (and where eventfd or the socket is unavailable) it is ``time.sleep``.

4. **A paused reactor takes no message** (:func:`_get_msg`).  ``send_c_store`` and the other
   ``send_*()`` methods pause the association's reactor (clear ``_reactor_checkpoint``, wait for
   ``_is_paused``) before sending, so that the reply reaches their own blocking ``get_msg``.  But the
   reactor sets ``_is_paused`` at the top of every loop, *before* it waits on the checkpoint, so a
   ``send_*()`` can see it still true from the previous loop while the reactor is already past the
   wait and about to poll the queue: a fast reply is then taken by the reactor ("Received unexpected
   C-STORE service message") and the ``send_*()`` waits out the DIMSE timeout — seen on C-MOVE
   sub-associations to DCMTK's storescp once replies came back quickly.  The reactor's non-blocking poll
   now takes nothing while the checkpoint is cleared, which is what the pause means.

5. **The association reactor's idle wait** (:class:`_AssociationTime`).  Between two polls of its DIMSE
   queue an association's reactor (acceptor and requestor alike) sleeps 1 ms, so a message the DUL
   thread has decoded — every C-STORE request an SCP receives — waits up to 1 ms before its handler
   runs.  In the reactor's loop the ``sleep`` pynetdicom.association calls waits instead, at most as
   long, on the queue's ``not_empty`` condition (``put`` notifies it), and returns at once if a message
   is already queued.  While a ``send_*()`` has paused the reactor it sleeps in full: the paused reactor
   takes nothing (4.), so returning early for the message left queued would spin.  Anywhere else —
   the same thread also sleeps in ``send_*()`` / ``release()`` of a C-MOVE's sub-association — it is
   ``time.sleep``.

6. **Reading a PDU from the socket** (:func:`_recv`).  pynetdicom's ``AssociationSocket.recv`` reads
   4 KiB per ``socket.recv`` call: 130 calls, each with its Python loop step and ``bytearray`` growth,
   for one 512² CT slice.  The replacement asks for up to 256 KiB per call (the kernel hands over what
   it has) and is otherwise the same: it blocks until ``nr_bytes`` are read, returns what it has when
   the peer closes, and never allocates more than 256 KiB ahead of the data actually received (a
   PDU length is the peer's claim, up to 4 GiB).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

import pynetdicom
import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dsutils
import pynetdicom.dul
import pynetdicom.fsm
import pynetdicom.transport
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.pdu_primitives import P_DATA

if TYPE_CHECKING:
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import AssociationSocket

__all__ = [
    "CommandElements",
    "EncodedDataset",
    "EncodedMessage",
    "command_elements",
    "encode_command",
    "install",
    "pdata_pdus",
]

log = logging.getLogger("dcbnode.wire")

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

    def __init__(
        self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, encoded: bytes | None, reason: str = ""
    ) -> None:
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
    def encoded(self) -> bytes | None:
        """The dataset bytes, or ``None`` when this instance is a failure placeholder."""
        return self._encoded

    @property
    def reason(self) -> str:
        """Why the instance cannot be sent (placeholders only)."""
        return self._reason

    def encoded_as(self, is_implicit_vr: bool, is_little_endian: bool, deflated: bool) -> bytes | None:
        """The bytes if they are in the requested encoding, else ``None`` (pynetdicom: encode failed)."""
        syntax = UID(self.file_meta.TransferSyntaxUID)
        if (is_implicit_vr, is_little_endian, deflated) != (
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        ):
            return None
        return self._encoded


_original_encode = pynetdicom.dsutils.encode


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    if isinstance(ds, EncodedDataset):
        return ds.encoded_as(is_implicit_vr, is_little_endian, deflated)
    return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)


# -- 2. one socket write per DIMSE message -------------------------------------------------------------------


def pdata_pdus(context_id: int, command: bytes, dataset: bytes, max_pdu: int) -> bytes:
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


class EncodedMessage(P_DATA):
    """A P-DATA request carrying all the encoded P-DATA-TF PDUs of one DIMSE message.

    A ``P_DATA`` so that pynetdicom's DUL routes it like its own (Evt9); its PDV list stays empty, the
    bytes are in ``pdus``.
    """

    def __init__(self, pdus: bytes) -> None:
        super().__init__()
        self.pdus = pdus


_original_send_msg = pynetdicom.dimse.DIMSEServiceProvider.send_msg
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


def _sent_message(message_class: type, context_id: int, elements: CommandElements, dataset: BytesIO | None) -> Any:
    """The DIMSE message ``EVT_DIMSE_SENT`` handlers get: what ``primitive_to_message`` would have built.

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


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``, queueing the whole message as one :class:`EncodedMessage`."""
    if getattr(primitive, "_dataset_path", None) is not None:  # streamed from a file by pynetdicom
        _original_send_msg(self, primitive, context_id)
        return
    if primitive.MessageIDBeingRespondedTo is None:
        message_class = pynetdicom.dimse._RQ_TO_MESSAGE[primitive.__class__]
    else:
        message_class = pynetdicom.dimse._RSP_TO_MESSAGE[primitive.__class__]
    keyword = pynetdicom.dimse_messages._DATASET_KEYWORDS.get(message_class.__name__)
    dataset: BytesIO | None = getattr(primitive, keyword) if keyword else None
    elements = command_elements(primitive, message_class, dataset is not None)
    if elements is None:
        message = message_class()
        message.primitive_to_message(primitive)
        message.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        command = _original_encode(message.command_set, True, True)  # PS3.7 6.3.1: Implicit VR LE
    else:
        command = encode_command(elements)
        if self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            message = _sent_message(message_class, context_id, elements, dataset)
            evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
    data = dataset.getvalue() if dataset is not None else b""
    self.dul.send_pdu(EncodedMessage(pdata_pdus(context_id, command, data, self.maximum_pdu_size)))
    wakeup = getattr(self.dul, "dcbnode_wakeup", None)
    if wakeup is not None:
        os.eventfd_write(wakeup, 1)


def _sending_encoded(
    action: Callable[[DULServiceProvider], str], next_state: str
) -> Callable[[DULServiceProvider], str]:
    """A state machine action sending a queued P-DATA: :class:`EncodedMessage` bytes as they are, any
    other P-DATA through pynetdicom's ``action``."""

    def send(dul: DULServiceProvider) -> str:
        # Only this (the DUL) thread takes from the queue, so its head is the primitive the action is for.
        primitive = dul.to_provider_queue.queue[0]
        if not isinstance(primitive, EncodedMessage):
            return action(dul)
        dul.to_provider_queue.get(False)
        if dul.socket is not None:
            dul.socket.send(primitive.pdus)  # on failure it queues Evt17 (connection closed), like _send
        else:
            log.warning("attempted to send a DIMSE message over a closed connection")
        return next_state

    send.dcbnode_wrapped = action  # type: ignore[attr-defined]
    return send


# -- 3. the DUL thread's idle wait --------------------------------------------------------------------------


def _wakeup_fd(dul: DULServiceProvider) -> int:
    """The eventfd :func:`_send_msg` signals after queueing for ``dul``; closed with the DUL object."""
    fd = getattr(dul, "dcbnode_wakeup", None)
    if fd is None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(dul, os.close, fd)
        dul.dcbnode_wakeup = fd  # type: ignore[attr-defined]
    return fd


class _TimeModule:
    """The ``time`` module but for ``sleep``, which a subclass defines: what the name ``time`` means
    inside a pynetdicom module whose idle waits are replaced here."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _DulTime(_TimeModule):
    """``time`` inside ``pynetdicom.dul``."""

    @staticmethod
    def sleep(seconds: float) -> None:
        """In a DUL thread: wait up to ``seconds`` for the peer's data or a queued message; else sleep."""
        dul = threading.current_thread()
        connection = getattr(getattr(dul, "socket", None), "socket", None)
        if not isinstance(dul, pynetdicom.dul.DULServiceProvider) or connection is None or not _HAS_EVENTFD:
            time.sleep(seconds)
            return
        wakeup = _wakeup_fd(dul)
        try:
            readable, _, _ = select.select([connection, wakeup], [], [], seconds)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom notices on its next look
            time.sleep(seconds)
            return
        if wakeup in readable:
            os.eventfd_read(wakeup)


_HAS_EVENTFD = hasattr(os, "eventfd")
_DUL_TIME = _DulTime()

#: The pynetdicom 3.0.4 state machine actions that take a P-DATA off the queue and send it.
_PDATA_ACTIONS = ("DT-1", "AR-7")


_original_get_msg = pynetdicom.dimse.DIMSEServiceProvider.get_msg


def _get_msg(self: DIMSEServiceProvider, block: bool = False) -> Any:
    """pynetdicom's ``get_msg``, except that the reactor's poll (``block=False``) leaves the queue alone
    while a ``send_*()`` call has paused the reactor to wait for its reply (see the module docstring)."""
    if not block and not self._assoc._reactor_checkpoint.is_set():
        return None, None
    return _original_get_msg(self, block)


# -- 5. the association reactor's idle wait -----------------------------------------------------------------


#: The loop whose ``time.sleep`` :class:`_AssociationTime` turns into a wait.
_REACTOR_CODE = pynetdicom.association.Association._run_reactor.__code__


def _await_message(assoc: pynetdicom.association.Association, seconds: float) -> None:
    """Wait up to ``seconds`` for a DIMSE message on ``assoc``'s queue, for its reactor to take.

    Returns at once if one is already queued; sleeps ``seconds`` while the reactor is paused (see
    the module docstring) or if ``assoc`` is not as expected.
    """
    messages = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if not isinstance(messages, queue.Queue) or not isinstance(checkpoint, threading.Event) or not checkpoint.is_set():
        time.sleep(seconds)
        return
    with messages.not_empty:  # the queue's mutex; put() notifies not_empty under it
        if messages._qsize():
            return
        messages.not_empty.wait(seconds)
        if messages._qsize():
            # put() notifies ONE waiter.  If a send_*() paused the reactor meanwhile and waits in
            # get_msg(block=True), the notification may have been meant for it: pass it on, or its get()
            # would wait out the DIMSE timeout.  A spare one is harmless: get() re-checks the queue.
            messages.not_empty.notify()


class _AssociationTime(_TimeModule):
    """``time`` inside ``pynetdicom.association``."""

    @staticmethod
    def sleep(seconds: float) -> None:
        """In an association's reactor loop: :func:`_await_message`; anywhere else ``time.sleep``."""
        assoc = threading.current_thread()
        # Only the reactor loop's own sleep: in send_*() or release() of another association (a C-MOVE
        # handler's sub-association, in this thread) a message for this one is no reason to stop sleeping.
        if isinstance(assoc, pynetdicom.association.Association) and sys._getframe(1).f_code is _REACTOR_CODE:
            _await_message(assoc, seconds)
        else:
            time.sleep(seconds)


_ASSOCIATION_TIME = _AssociationTime()


# -- 6. reading a PDU from the socket ------------------------------------------------------------------------


#: The most one ``socket.recv`` call asks for (and so allocates ahead of the data).
_RECV_CHUNK = 256 * 1024
_original_recv = pynetdicom.transport.AssociationSocket.recv


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """pynetdicom's ``AssociationSocket.recv``, reading up to :data:`_RECV_CHUNK` per system call."""
    connection = cast(socket.socket, self.socket)
    bytestream = bytearray()
    while len(bytestream) < nr_bytes:
        bytes_read = connection.recv(min(nr_bytes - len(bytestream), _RECV_CHUNK))
        if not bytes_read:  # the peer closed the connection: return what there is, as pynetdicom does
            return bytestream
        bytestream += bytes_read
    return bytestream


def _check() -> None:
    """Raise ``ImportError`` unless pynetdicom works the way the replacements above assume."""
    problems = []
    send_c_store = pynetdicom.association.Association.send_c_store.__code__
    if pynetdicom.association.encode not in (_original_encode, _encode) or "encode" not in send_c_store.co_names:
        problems.append("Association.send_c_store does not encode through pynetdicom.association.encode")
    send_msg = _original_send_msg.__code__
    if not {"encode_msg", "send_pdu", "primitive_to_message"} <= set(send_msg.co_names) or not hasattr(
        pynetdicom.dimse, "_RQ_TO_MESSAGE"
    ):
        problems.append("DIMSEServiceProvider.send_msg does not queue encode_msg's P-DATA primitives")
    expected = {"context_id", "encoded_command_set", "command_set", "data_set", "_data_set_path", "_data_set_file"}
    if set(vars(pynetdicom.dimse_messages.C_STORE_RQ())) != expected or not all(
        hasattr(pynetdicom.dimse_messages, name) for name in ("_COMMAND_SET_KEYWORDS", "_DATASET_KEYWORDS")
    ):
        problems.append("DIMSEMessage is not built the way _sent_message builds one")
    if {action for (event, _), action in pynetdicom.fsm.TRANSITION_TABLE.items() if event == "Evt9"} != set(
        _PDATA_ACTIONS
    ):
        problems.append(f"a queued P-DATA (Evt9) is not always sent by one of {_PDATA_ACTIONS}")
    for name in _PDATA_ACTIONS:
        function = pynetdicom.fsm.ACTIONS.get(name, ("", None, ""))[1]
        function = getattr(function, "dcbnode_wrapped", function)
        names = getattr(getattr(function, "__code__", None), "co_names", ())
        if not {"to_provider_queue", "_send", "P_DATA_TF"} <= set(names):
            problems.append(f"state machine action {name} does not send a queued P-DATA as a P-DATA-TF")
    run_reactor = pynetdicom.dul.DULServiceProvider.run_reactor.__code__
    if pynetdicom.dul.time not in (time, _DUL_TIME) or not {"time", "sleep", "_run_loop_delay"} <= set(
        run_reactor.co_names
    ):
        problems.append("the DUL reactor does not idle with time.sleep(_run_loop_delay)")
    run_assoc = pynetdicom.association.Association._run_reactor.__code__
    get_msg = _original_get_msg.__code__
    if not {"_reactor_checkpoint", "get_msg", "_is_paused"} <= set(run_assoc.co_names) or get_msg.co_varnames[
        :2
    ] != ("self", "block") or "msg_queue" not in get_msg.co_names:
        problems.append("the association reactor does not poll dimse.get_msg(block=False) behind its checkpoint")
    if pynetdicom.association.time not in (time, _ASSOCIATION_TIME) or not {"time", "sleep", "dimse"} <= set(
        run_assoc.co_names
    ):
        problems.append("the association reactor does not idle with time.sleep")
    messages = getattr(pynetdicom.dimse.DIMSEServiceProvider(None), "msg_queue", None)  # type: ignore[arg-type]
    if not isinstance(messages, queue.Queue) or not {"not_empty", "notify"} <= set(queue.Queue.put.__code__.co_names):
        problems.append("DIMSEServiceProvider.msg_queue is not a queue.Queue whose put() notifies not_empty")
    recv = _original_recv.__code__
    if not {"socket", "recv", "extend"} <= set(recv.co_names) or recv.co_varnames[:2] != ("self", "nr_bytes"):
        problems.append("AssociationSocket.recv does not read nr_bytes with socket.recv")
    if problems:
        raise ImportError(
            f"pynetdicom {pynetdicom.__version__}: {'; '.join(problems)}. dcbnode.net.wire was "
            "checked against pynetdicom 3.0.4 and needs updating"
        )


def install() -> None:
    """Install the replacements (idempotent); ``ImportError`` if this pynetdicom is not like 3.0.4."""
    _check()
    pynetdicom.association.encode = _encode
    pynetdicom.dimse.DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    pynetdicom.dimse.DIMSEServiceProvider.get_msg = _get_msg  # type: ignore[method-assign]
    pynetdicom.dul.time = _DUL_TIME  # type: ignore[assignment]
    pynetdicom.association.time = _ASSOCIATION_TIME  # type: ignore[assignment]
    pynetdicom.transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
    for name in _PDATA_ACTIONS:
        description, function, next_state = pynetdicom.fsm.ACTIONS[name]
        if not hasattr(function, "dcbnode_wrapped"):
            pynetdicom.fsm.ACTIONS[name] = (description, _sending_encoded(function, next_state), next_state)


install()
