"""dcbnode.net.wire lays out DIMSE messages itself: the bytes must be exactly pynetdicom's.

The network behaviour (fragmentation at the receiver's maximum PDU, a receiver aborting mid-message) is
tested end to end in test_retrieve.py; here the encoders are compared with pynetdicom's own.
"""

from __future__ import annotations

import os
import random
import sys
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom.dimse
import pytest
from pynetdicom.dimse_messages import _DATASET_KEYWORDS
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dcbnode.net.wire import _sent_message, command_elements, encode_command, pdata_pdus


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
        sent = _sent_message(message_class, 1, elements, dataset).command_set
        assert encode(sent, True, True) == expected
        reference = _message_class(primitive)()
        reference.primitive_to_message(primitive)
        # (values read as a receiver decodes them: text without its trailing padding)
        assert [(e.tag, str(e.value).rstrip()) for e in sent] == [
            (e.tag, str(e.value).rstrip()) for e in reference.command_set
        ]
    assert encoded > 250


def test_a_paused_reactor_leaves_the_reply_to_the_waiting_sender(tmp_path: Path) -> None:
    """``send_c_store`` pauses the association's reactor and then waits for its reply; the reactor's own
    poll, which can still run once after the pause (pynetdicom sets ``_is_paused`` before it waits),
    must not take that reply.  Here the poll is made exactly while paused, with a reply queued."""
    from peers import pynetdicom_store_scp
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    with pynetdicom_store_scp(tmp_path) as scp:
        ae = AE(ae_title="WIRETEST")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(scp.host, scp.port, ae_title=scp.aet)
        assert assoc.is_established
        try:
            reply = (1, object())
            assoc._reactor_checkpoint.clear()  # what send_*() does before sending
            assoc.dimse.msg_queue.put(reply)
            assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's poll
            assert assoc.dimse.get_msg(block=True) is reply  # the waiting send_*()
        finally:
            assoc._reactor_checkpoint.set()
            assoc.release()
