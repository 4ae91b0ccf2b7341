"""Bad bytes: hypothesis mutates valid PDUs, C-STORE data sets and the P-DATA-TF framing of a C-STORE
on an established association, and sends them to a real node.

Whatever arrives, the node keeps running and answering; every C-STORE with a well-framed data set gets a
DICOM status (no abort, no hang), a badly framed one a status or an A-ABORT; what is acknowledged with
Success reads back as a well-formed data set (as the one sent, when only the framing was mutated); a length field
claiming 4 GiB never makes the node allocate it.  Bounded for CI (a few hundred cases, well under a
minute); ``bench/fuzz.py`` runs the same properties for longer.
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from io import BytesIO

import pydicom
import pytest
from conftest import NODE_AET, RunningNode, read_back, rebuilt_part10, start_node, stop_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import associate_rq_bytes, send_raw_request
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification

#: Cases per property; ``DCBNODE_FUZZ_EXAMPLES`` raises it (bench/fuzz.py).
EXAMPLES = int(os.environ.get("DCBNODE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("DCBNODE_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_VALID_STATUS = range(0x0000, 0x10000)


def fuzzed_node(tmp_path_factory, name: str) -> Iterator[RunningNode]:
    """A node with short timeouts for fuzzing, which must still be alive, and stop cleanly, at the end."""
    started = start_node(tmp_path_factory.mktemp(name), association_request_timeout=1, network_timeout=2,
                         dimse_timeout=5, max_associations=20)
    yield started
    assert started.process.poll() is None, f"the node died\n{started.log()[-3000:]}"
    assert stop_node(started) == 0


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[RunningNode]:
    yield from fuzzed_node(tmp_path_factory, "fuzz")


def _alive(node: RunningNode) -> None:
    """The node still runs and associates."""
    assert node.process.poll() is None, node.log()[-3000:]
    ae = AE(ae_title="FUZZCHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=NODE_AET)
    assert assoc.is_established, node.log()[-3000:]
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def _mutated(data: bytes, draw) -> bytes:
    """``data`` with a few byte flips, 32-bit length fields overwritten, a cut or appended garbage."""
    buffer = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "length", "cut", "append"]))
        if not buffer:
            break
        at = draw(st.integers(0, len(buffer) - 1))
        if kind == "flip":
            buffer[at] = draw(st.integers(0, 255))
        elif kind == "length" and at + 4 <= len(buffer):
            buffer[at:at + 4] = struct.pack("<L" if draw(st.booleans()) else ">L",
                                            draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF])))
        elif kind == "cut":
            del buffer[max(at, 1):]  # an empty data set is the sender's mistake, never sent
        else:
            buffer[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(buffer)


@FUZZ
@given(data=st.data())
def test_mutated_pdus_never_take_the_node_down(node: RunningNode, data) -> None:
    request = associate_rq_bytes()
    payload = _mutated(request, data.draw)
    pieces = data.draw(st.integers(1, 4))
    with socket.create_connection((node.host, node.port), timeout=3) as sock:
        step = max(1, len(payload) // pieces)
        try:
            for start in range(0, len(payload), step):
                sock.sendall(payload[start:start + step])
            sock.recv(65536)  # A-ASSOCIATE-AC/RJ, A-ABORT, or the close
        except OSError:  # reset, or nothing within 3 s
            pass


def store_raw(node: RunningNode, uid: str, payload: bytes) -> list | None:
    """Send ``payload`` as it is as a CT C-STORE data set (Explicit VR Little Endian) from a stock pynetdicom
    SCU; its response primitives, or ``None`` when the node aborted."""
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(node.host, node.port, ae_title=NODE_AET)
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = uid
    request.Priority = 2
    request.DataSet = BytesIO(payload)
    try:
        return send_raw_request(assoc, request)
    finally:
        if assoc.is_established:
            assoc.release()


def _ct_bytes() -> tuple[bytes, pydicom.Dataset]:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    return encode(dataset, False, True), dataset


@FUZZ
@given(data=st.data())
def test_mutated_data_sets_get_a_status_and_only_well_formed_ones_are_stored(node: RunningNode, data) -> None:
    encoded, dataset = _ct_bytes()
    uid = generate_uid()
    # The same data set with a fresh SOP Instance UID (same length: the mutation offsets stay meaningful).
    encoded = encoded.replace(dataset.SOPInstanceUID.encode(), uid[:len(dataset.SOPInstanceUID)].encode().ljust(
        len(dataset.SOPInstanceUID), b"1"))
    uid = uid[:len(dataset.SOPInstanceUID)].ljust(len(dataset.SOPInstanceUID), "1")
    payload = _mutated(encoded, data.draw)
    responses = store_raw(node, uid, payload)
    assert responses is not None, f"no C-STORE response\n{node.log()[-2000:]}"
    status = int(responses[-1].Status)
    assert status in _VALID_STATUS
    if status == 0x0000:
        _STORED.append(uid)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _read_exactly(sock, 6)
    return header[0], _read_exactly(sock, struct.unpack(">L", header[2:])[0])


def _store_command(uid: str) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, led by its group length)."""
    command = pydicom.Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 2
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = uid
    body = encode(command, True, True)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _pdvs(data: bytes, is_command: bool, draw) -> list[list[int | bytes]]:
    """``data`` as PDVs [context ID, message control header, fragment], cut at 0-3 random places."""
    cuts = sorted(draw(st.lists(st.integers(1, len(data) - 1), max_size=3, unique=True)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [[1, (0x01 if is_command else 0) | (0x02 if n == len(pieces) - 1 else 0), piece]
            for n, piece in enumerate(pieces)]


def _p_data_tf(pdvs: list[list[int | bytes]], draw) -> bytes:
    """One P-DATA-TF PDU per PDV, with a few context IDs, control headers, PDV item lengths or PDU
    lengths (up to 4 GiB) mutated."""
    pdus = []
    for context_id, control, fragment in pdvs:
        item_length = 2 + len(fragment)
        mutation = draw(st.sampled_from(["none"] * 4 + ["context", "control", "item", "pdu"]))
        if mutation == "context":
            context_id = draw(st.sampled_from([0, 3, 255]))
        elif mutation == "control":
            control = draw(st.integers(0, 255))
        elif mutation == "item":
            item_length = draw(st.sampled_from([0, 1, 2, item_length - 1, item_length + 1, 0xFFFFFFFF]))
        item = struct.pack(">LBB", item_length & 0xFFFFFFFF, context_id, control) + fragment
        pdu_length = 4 + 2 + len(fragment)
        if mutation == "pdu":
            pdu_length = draw(st.sampled_from([0, 5, pdu_length - 1, 0xFFFFFFFF]))
        pdus.append(struct.pack(">BBL", 0x04, 0, pdu_length) + item)
    return b"".join(pdus)


def _command_status(pdvs: bytes) -> int:
    """The Status of a C-STORE-RSP in one P-DATA-TF's PDVs (a response fits one PDV)."""
    command = b""
    while pdvs:
        length = struct.unpack(">L", pdvs[:4])[0]
        command += pdvs[6:4 + length]
        pdvs = pdvs[4 + length:]
    return int(pydicom.dcmread(BytesIO(command), force=True).Status)


@FUZZ
@given(data=st.data())
def test_mutated_p_data_on_an_association_aborts_or_gets_a_status(node: RunningNode, data) -> None:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    uid = f"2.25.{uuid.uuid4().int:039d}".replace(".0", ".1")  # one length: the same draws every run
    dataset.SOPInstanceUID = uid
    pdvs = _pdvs(_store_command(uid), True, data.draw) + _pdvs(encode(dataset, False, True), False, data.draw)
    payload = _p_data_tf(pdvs, data.draw)
    with socket.create_connection((node.host, node.port), timeout=3) as sock:
        sock.sendall(associate_rq_bytes((CTImageStorage, ExplicitVRLittleEndian)))
        assert _read_pdu(sock)[0] == 0x02, "association not accepted"
        try:
            sock.sendall(payload)
            pdu_type, body = _read_pdu(sock)
        except OSError:  # closed, or waiting for the rest (its DIMSE/network timeouts end that association)
            _P_DATA_OUTCOMES.append("closed or silent")
            return
    assert pdu_type in (0x04, 0x07), f"unexpected PDU type {pdu_type:#x}"  # C-STORE-RSP or A-ABORT
    if pdu_type == 0x07:
        _P_DATA_OUTCOMES.append("A-ABORT")
        return
    status = _command_status(body)
    assert status in _VALID_STATUS
    _P_DATA_OUTCOMES.append(f"{status:04X}")
    if status == 0x0000:  # only the framing was mutated: what is stored must be the data set sent
        _P_DATA_STORED.append(uid)


_STORED: list[str] = []
_P_DATA_OUTCOMES: list[str] = []
_P_DATA_STORED: list[str] = []


def test_what_was_stored_reads_back_and_the_node_is_alive(node: RunningNode) -> None:
    """Runs after the properties (file order): every Success reads back as a complete data set."""
    _alive(node)
    archive = read_back(node.data_dir)
    try:
        for uid in _STORED:
            pydicom.dcmread(BytesIO(rebuilt_part10(archive, uid))).walk(lambda *_: None)
        sent = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
        for uid in _P_DATA_STORED:
            sent.SOPInstanceUID = uid
            assert pydicom.dcmread(BytesIO(rebuilt_part10(archive, uid))) == sent, uid
    finally:
        archive.close()
    print(f"fuzz: {EXAMPLES} PDU, {EXAMPLES} data set and {EXAMPLES} P-DATA cases, "
          f"{len(_STORED) + len(_P_DATA_STORED)} stored; P-DATA outcomes: {dict(Counter(_P_DATA_OUTCOMES))}")
