"""dcbnode.net.wire lays out DIMSE messages itself: the bytes must be exactly pynetdicom's.

The network behaviour (fragmentation at the receiver's maximum PDU, a receiver aborting mid-message) is
tested end to end in test_retrieve.py; here the encoders are compared with pynetdicom's own.  The
association reactor's wait for a received message (instead of pynetdicom's 1 ms sleep), and reading a PDU
in large pieces (instead of 4 KiB ones), are tested here.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import socketserver
import sys
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom.dimse
import pytest
from pynetdicom.association import Association
from pynetdicom.dimse_messages import _DATASET_KEYWORDS, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import wait_until

from dcbnode.config import Config
from dcbnode.net.provider import (
    NodeAE,
    NodeAssociation,
    NodeRequestHandler,
    NodeSocket,
    await_message,
    copied_contexts,
)
from dcbnode.net.server import build_ae
from dcbnode.net.wire import command_elements, dimse_message, encode_command, pdata_pdus, store_response


def _message_class(primitive: Any) -> type:
    table = (
        pynetdicom.dimse._RQ_TO_MESSAGE
        if primitive.MessageIDBeingRespondedTo is None
        else pynetdicom.dimse._RSP_TO_MESSAGE
    )
    return table[type(primitive)]


def _pynetdicom_command(primitive: Any) -> bytes:
    message = _message_class(primitive)()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def _store_request(size: int) -> C_STORE:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.3.45"
    request.Priority = 2
    request.DataSet = BytesIO(os.urandom(size))
    return request


@pytest.mark.parametrize("max_pdu", [0, 8, 4096, 16382, 16384, 1 << 20])
@pytest.mark.parametrize("size", [0, 1, 4089, 4090, 4091, 16376, 100_001])
def test_pdata_pdus_are_pynetdicoms(max_pdu: int, size: int) -> None:
    request = _store_request(size)
    message = _message_class(request)()
    message.primitive_to_message(request)
    expected = b"".join(P_DATA_TF(pdata).encode() for pdata in message.encode_msg(1, max_pdu))
    command = encode(message.command_set, True, True)
    assert pdata_pdus(1, command, request.DataSet.getvalue(), max_pdu) == expected


def _random_primitive(seed: int) -> Any:
    """A C-STORE/GET/MOVE/FIND/ECHO request or response with a random choice of optional parameters."""
    rng = random.Random(seed)
    kind = rng.choice([C_STORE, C_GET, C_MOVE, C_FIND, C_ECHO])
    primitive = kind()
    response = rng.random() < 0.5
    if response:
        primitive.MessageIDBeingRespondedTo = rng.randrange(65536)
        primitive.Status = rng.choice([0x0000, 0xFF00, 0xA700, 0xB000, 0xC000, 0xFE00])
        if rng.random() < 0.3:
            primitive.ErrorComment = rng.choice(["bad", "odd!", "Ünïcode"])
        if kind in (C_GET, C_MOVE):
            for keyword in (
                "NumberOfRemainingSuboperations",
                "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations",
                "NumberOfWarningSuboperations",
            ):
                if rng.random() < 0.7:
                    setattr(primitive, keyword, rng.randrange(1000))
        if kind in (C_GET, C_MOVE, C_FIND) and rng.random() < 0.3:
            primitive.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00STUDY ")
        if kind is C_STORE:
            primitive.AffectedSOPInstanceUID = "1.2.3.4"
        if kind is not C_ECHO and rng.random() < 0.1:
            primitive.OffendingElement = [0x00100010]
    else:
        primitive.MessageID = rng.randrange(65536)
        if kind is C_STORE:
            primitive.AffectedSOPInstanceUID = rng.choice(["1.2.3.4", "1.2.3.45"])
            primitive.Priority = rng.choice([0, 1, 2])
            primitive.DataSet = BytesIO(b"x" * rng.randrange(5))
            if rng.random() < 0.5:
                primitive.MoveOriginatorApplicationEntityTitle = rng.choice(["MOVER", "ABCDEF", "A B "])
                primitive.MoveOriginatorMessageID = rng.randrange(65536)
        elif kind is not C_ECHO:
            primitive.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00STUDY ")
            primitive.Priority = 2
        if kind is C_MOVE:
            primitive.MoveDestination = "DEST"
    if rng.random() < 0.9:
        primitive.AffectedSOPClassUID = rng.choice(["1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.1"])
    return primitive


def test_command_sets_are_pynetdicoms() -> None:
    encoded = 0
    for seed in range(300):
        primitive = _random_primitive(seed)
        message_class = _message_class(primitive)
        keyword = _DATASET_KEYWORDS.get(message_class.__name__)
        dataset = getattr(primitive, keyword) if keyword else None
        elements = command_elements(primitive, message_class, dataset is not None)
        expected = _pynetdicom_command(primitive)
        if elements is None:  # left to pynetdicom: AT values, non-ASCII text
            comment = getattr(primitive, "ErrorComment", None) or ""
            assert getattr(primitive, "OffendingElement", None) is not None or not comment.isascii()
            continue
        encoded += 1
        assert encode_command(elements) == expected, (message_class.__name__, seed)
        # what EVT_DIMSE_SENT handlers see re-encodes to the same bytes, and reads as pynetdicom's message
        sent = dimse_message(message_class, 1, elements, dataset).command_set
        assert encode(sent, True, True) == expected
        reference = _message_class(primitive)()
        reference.primitive_to_message(primitive)
        # (values read as a receiver decodes them: text without its trailing padding)
        assert [(e.tag, str(e.value).rstrip()) for e in sent] == [
            (e.tag, str(e.value).rstrip()) for e in reference.command_set
        ]
    assert encoded > 250


def _received(primitive: Any, max_pdu: int = 16382) -> list[Any]:
    """The P-DATA primitives a receiver gets for ``primitive`` sent by pynetdicom."""
    message = _message_class(primitive)()
    message.primitive_to_message(primitive)
    return list(message.encode_msg(1, max_pdu))


def _pynetdicom_decoded(pdata: list[Any]) -> Any:
    message = DIMSEMessage()
    for part in pdata:
        done = message.decode_msg(part)
    assert done
    return message, message.message_to_primitive()


_STORE_RESPONSE_FIELDS = ("MessageIDBeingRespondedTo", "Status", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                          "ErrorComment", "OffendingElement", "_context_id", "_dataset_path", "_dataset_file")


def test_store_responses_are_read_as_pynetdicom_reads_them() -> None:
    read = 0
    for seed in range(400):
        primitive = _random_primitive(seed)
        pdata = _received(primitive)
        decoded = store_response(pdata[0])
        if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
            assert decoded is None, seed  # left to pynetdicom
            continue
        message, expected = _pynetdicom_decoded(pdata)
        if decoded is None:  # a reply with the optional status elements is left to pynetdicom too
            assert any(getattr(primitive, keyword, None) is not None for keyword in ("ErrorComment",
                                                                                     "OffendingElement")), seed
            continue
        read += 1
        context_id, response, elements = decoded
        assert context_id == 1 and type(response) is C_STORE
        for name in _STORE_RESPONSE_FIELDS:
            assert getattr(response, name, None) == getattr(expected, name, None), (seed, name)
        # what EVT_DIMSE_RECV handlers see: pynetdicom's command set
        handed = dimse_message(type(message), context_id, elements, None).command_set
        assert [(e.tag, e.value) for e in handed] == [(e.tag, e.value) for e in message.command_set]
    assert read > 20


_UNUSUAL = {"two UIDs": (b"1.2.3.4\0", b"1.2.3.4\\5."), "long UID": (b"1.2.3.4\0", b"1." + b"2" * 64 + b"\0"),
            "data set": (b"\x01\x01", b"\x01\x00"), "no status": (b"\0\0\x00\x09\x02\0\0\0\0\0", b""),
            "empty UID": (b"1.2.3.4\0", b"\0" * 8)}


@pytest.mark.parametrize("change", [*_UNUSUAL, "command cut"])
def test_unusual_store_responses(change: str) -> None:
    """Replies read here only when pynetdicom would read them the same; the others are left to it."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 3
    response.Status = 0
    response.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    response.AffectedSOPInstanceUID = "1.2.3.4"
    (pdata,) = _received(response)
    context_id, data = pdata.presentation_data_value_list[0]
    assert store_response(pdata) is not None
    replaced = _UNUSUAL.get(change, (data[-4:], b""))
    assert replaced[0] in data
    pdata.presentation_data_value_list = [[context_id, data.replace(*replaced)]]
    decoded = store_response(pdata)
    if change != "empty UID":
        assert decoded is None
        return
    assert decoded is not None
    expected = _pynetdicom_decoded([pdata])[1]
    assert expected.AffectedSOPInstanceUID is None
    assert [getattr(decoded[1], name, None) for name in _STORE_RESPONSE_FIELDS] == [
        getattr(expected, name, None) for name in _STORE_RESPONSE_FIELDS]


def test_copied_contexts_are_a_deep_copy() -> None:
    """The node's contexts as each association gets them: equal to pynetdicom's deepcopy, sharing nothing
    that negotiation could change."""
    contexts = build_ae(Config()).supported_contexts
    copies = copied_contexts(contexts)
    assert [vars(c) for c in copies] == [vars(c) for c in copy.deepcopy(contexts)]
    for original, duplicate in zip(contexts, copies, strict=True):
        assert duplicate is not original and duplicate.transfer_syntax is not original.transfer_syntax
        duplicate.add_transfer_syntax("1.2.3.4")
        duplicate.context_id = 7
        assert "1.2.3.4" not in original.transfer_syntax and original.context_id is None


def test_a_paused_reactor_leaves_the_reply_to_the_waiting_sender(tmp_path: Path) -> None:
    """``send_c_store`` pauses the association's reactor and then waits for its reply; the reactor's own
    poll, which can still run once after the pause (pynetdicom sets ``_is_paused`` before it waits),
    must not take that reply.  Here the poll is made exactly while paused, with a reply queued."""
    from peers import pynetdicom_store_scp
    from pynetdicom.sop_class import CTImageStorage

    with pynetdicom_store_scp(tmp_path) as scp:
        ae = NodeAE(ae_title="WIRETEST")  # dcbnode's requestor, e.g. a C-MOVE sub-association
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet)
        assert assoc.is_established and isinstance(assoc, NodeAssociation)
        try:
            reply = (1, object())
            assoc._reactor_checkpoint.clear()  # what send_*() does before sending
            assoc.dimse.msg_queue.put(reply)
            assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's poll
            assert assoc.dimse.get_msg(block=True) is reply  # the waiting send_*()
        finally:
            assoc._reactor_checkpoint.set()
            assoc.release()


# -- the association reactor waits for a message instead of sleeping ----------------------------------------


def _waiters(assoc: Association) -> int:
    """How many threads wait on ``assoc``'s DIMSE queue for a message."""
    return len(assoc.dimse.msg_queue.not_empty._waiters)  # type: ignore[attr-defined]


def test_the_reactor_of_an_scp_waits_on_its_message_queue() -> None:
    """A dcbnode SCP association's reactor, between its polls, waits on the DIMSE queue that the DUL thread
    puts each received message on (pynetdicom's sleeps 1 ms, and nothing waits there); C-STOREs still
    work, sent by a stock pynetdicom SCU."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage
    from pynetdicom.transport import ThreadedAssociationServer

    received: list[bytes] = []
    scp = NodeAE(ae_title="NODESCP")
    scp.add_supported_context(CTImageStorage, ImplicitVRLittleEndian)
    server = scp.make_server(("127.0.0.1", 0), evt_handlers=[
        (evt.EVT_C_STORE, lambda event: received.append(event.encoded_dataset()) or 0x0000)],
        server_class=ThreadedAssociationServer, request_handler=NodeRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ae = AE(ae_title="WIRETEST")
        ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="NODESCP")
        assert assoc.is_established and type(assoc) is Association
        try:
            assert wait_until(lambda: len(server.active_associations) == 1, timeout=5)
            acceptor = server.active_associations[0]
            assert isinstance(acceptor, NodeAssociation)
            assert wait_until(lambda: _waiters(acceptor) == 1, timeout=5)
            for n in range(3):
                ds = Dataset()
                ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CTImageStorage, generate_uid(), f"P{n}"
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
                assert assoc.send_c_store(ds).Status == 0x0000
            assert len(received) == 3
            assert wait_until(lambda: _waiters(acceptor) == 1, timeout=5)
        finally:
            assoc.release()
    finally:
        socketserver.BaseServer.shutdown(server)
        server.server_close()


def _association() -> Association:
    """A real (unstarted) association: its DIMSE queue and reactor checkpoint as pynetdicom makes them."""
    return NodeAssociation(NodeAE(), "requestor")


def _sleeping(assoc: Association, seconds: float) -> threading.Thread:
    """A thread in the reactor's sleep, once it waits on the queue."""
    sleeper = threading.Thread(target=await_message, args=(assoc, seconds), daemon=True)
    waiting = _waiters(assoc)
    sleeper.start()
    assert wait_until(lambda: _waiters(assoc) == waiting + 1, timeout=5)
    return sleeper


def test_a_queued_message_ends_the_reactor_sleep() -> None:
    """A sleep of 10 s ends at once for a message already queued, and when one is put meanwhile.  (The
    5 s bound only tells "woke" from "slept its 10 s"; it is no performance bound.)"""
    assoc = _association()
    messages = assoc.dimse.msg_queue
    messages.put((None, None))
    start = time.monotonic()
    await_message(assoc, 10)
    assert time.monotonic() - start < 5
    assert messages.get_nowait() == (None, None)

    sleeper = _sleeping(assoc, 10)
    messages.put((None, None))
    sleeper.join(5)
    assert not sleeper.is_alive()


def test_a_paused_reactor_sleeps_in_full() -> None:
    """While a send_*() has paused the reactor, the reactor takes nothing from the queue: its sleep must
    not end early for the message left there, or the reactor loop would spin."""
    assoc = _association()
    assoc._reactor_checkpoint.clear()
    assoc.dimse.msg_queue.put((None, None))
    for _ in range(3):
        start = time.monotonic()
        await_message(assoc, 0.05)
        assert time.monotonic() - start >= 0.04


def test_the_sleep_passes_on_a_wakeup_meant_for_a_waiting_sender() -> None:
    """Queue.put wakes ONE waiter.  The reactor waits on the queue, a send_*() then pauses it and waits
    for its reply in get_msg(block=True): the reply's wakeup, which goes to the reactor (the first
    waiter), must reach the sender, or the sender waits out its DIMSE timeout (30 s here)."""
    assoc = _association()
    messages = assoc.dimse.msg_queue
    sleeper = _sleeping(assoc, 10)
    assoc._reactor_checkpoint.clear()  # what send_*() does
    replies: list[object] = []
    sender = threading.Thread(target=lambda: replies.append(messages.get(timeout=30)), daemon=True)
    sender.start()
    assert wait_until(lambda: _waiters(assoc) == 2, timeout=5)
    reply = (1, object())
    messages.put(reply)
    sender.join(5)
    assert replies == [reply]
    sleeper.join(5)
    assert not sleeper.is_alive()


class _CountingSocket(socket.socket):
    """A real socket that counts its ``recv`` calls."""

    calls = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        type(self).calls += 1
        return super().recv(bufsize, flags)


def _socket_pair() -> tuple[socket.socket, _CountingSocket]:
    left, right = socket.socketpair()
    counted = _CountingSocket(right.family, right.type, fileno=right.detach())
    _CountingSocket.calls = 0
    return left, counted


def _reader(connection: socket.socket) -> NodeSocket:
    reader = NodeSocket.__new__(NodeSocket)  # only .socket and the association's timeouts are used by recv
    reader.socket = connection
    reader._assoc = None  # no association: no deadline
    return reader


def test_a_pdu_is_read_in_large_pieces_byte_for_byte() -> None:
    sender, receiver = _socket_pair()
    payload = random.Random(3).randbytes(1_200_000)
    writer = threading.Thread(target=sender.sendall, args=(payload,))
    writer.start()
    try:
        data = _reader(receiver).recv(len(payload))
    finally:
        writer.join()
        sender.close()
        receiver.close()
    assert data == payload and isinstance(data, bytearray)
    # pynetdicom's own recv takes 4 KiB per call: 293 calls for this PDU.
    assert _CountingSocket.calls <= 40


def test_a_pdu_cut_short_by_the_peer_returns_what_arrived() -> None:
    sender, receiver = _socket_pair()
    sender.sendall(b"x" * 5000)
    sender.close()
    try:
        assert _reader(receiver).recv(1 << 31) == bytearray(b"x" * 5000)  # never allocated 2 GiB up front
    finally:
        receiver.close()
