"""Always reachable: garbage, silent, oversized and slow connections do not keep real associations out.

Real sockets against a node subprocess; the real associations are DCMTK's echoscu and stock pynetdicom.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from conftest import NODE_AET, scu_store, wait_until
from peers import associate_rq_bytes, run_dcmtk
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_messages import C_GET_RQ
from pynetdicom.dimse_primitives import C_GET
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

_4_GIB_ASSOCIATE_RQ = struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF)
#: echoscu's own timeouts (connect, A-ASSOCIATE-AC, C-ECHO-RSP), in seconds.  On an idle 2-core machine
#: the C-ECHO amid the garbage takes well under a second (docs/reliability.md); the bound is looser so
#: that a loaded CI machine does not fail it, and still far below the 30 s the garbage used to hold.
TIMEOUT = "10"


def _echoscu(node, *extra: str) -> tuple[bool, str]:
    """One C-ECHO with DCMTK's echoscu, bounded by its own timeouts (:data:`TIMEOUT`)."""
    result = run_dcmtk("echoscu", ["-to", TIMEOUT, "-ta", TIMEOUT, "-td", TIMEOUT, "-aec", NODE_AET, *extra,
                                   node.host, str(node.port)], timeout=30)
    return result.returncode == 0, result.stdout + result.stderr


def _garbage(node, rng: random.Random, index: int) -> socket.socket:
    """A connection that sends a few hundred random bytes (every fifth claiming a 4 GiB A-ASSOCIATE-RQ)
    and stays open; or, every seventh, sends nothing at all."""
    sock = socket.create_connection((node.host, node.port), timeout=5)
    if index % 7 == 3:
        return sock
    data = rng.randbytes(rng.randrange(100, 600))
    if index % 5 == 0:
        data = _4_GIB_ASSOCIATE_RQ + data
    with contextlib.suppress(OSError):  # the node already closed it: that is what is wanted
        sock.sendall(data)
    return sock


def _closed_by_node(sock: socket.socket, within: float) -> bool:
    """Whether the node closes ``sock`` (EOF or reset) within ``within`` s; what it sent first is skipped."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionError, OSError) as exc:
        return not isinstance(exc, TimeoutError)
    return False


def test_garbage_connections_do_not_lock_out_a_real_association(running_node):
    node = running_node(max_associations=10, association_request_timeout=3)
    rng = random.Random(13)
    with ExitStack() as held:
        for index in range(50):
            held.enter_context(closing(_garbage(node, rng, index)))
        stop = threading.Event()

        def more() -> None:  # 50 more, in parallel with the C-ECHO
            for index in range(50):
                if stop.is_set():
                    return
                held.enter_context(closing(_garbage(node, rng, 50 + index)))

        flood = threading.Thread(target=more)
        flood.start()
        try:
            started = time.monotonic()
            ok, output = _echoscu(node)
            print(f"C-ECHO amid garbage connections: {time.monotonic() - started:.2f} s")  # for the docs
        finally:
            stop.set()
            flood.join(30)
        assert ok, output + node.log()[-3000:]
    log = node.log()
    assert "sent A-ASSOCIATE-RQ claiming 4294967295 bytes (more than 1048576): connection closed" in log, log[-3000:]
    assert "sent bytes that are not a DICOM PDU" in log


def test_silent_and_garbage_connections_are_closed(running_node):
    node = running_node(association_request_timeout=1)
    with closing(socket.create_connection((node.host, node.port))) as silent, \
            closing(socket.create_connection((node.host, node.port))) as huge, \
            closing(socket.create_connection((node.host, node.port))) as junk:
        huge.sendall(_4_GIB_ASSOCIATE_RQ + b"\0" * 100)
        junk.sendall(b"GET / HTTP/1.1\r\nHost: dcbnode\r\n\r\n")
        # The 4 GiB claim and the HTTP request are refused at once (A-ABORT, close); the silent one after
        # association_request_timeout (1 s): all well within the default acse_timeout of 30 s.
        assert _closed_by_node(huge, 10)
        assert _closed_by_node(junk, 10)
        assert _closed_by_node(silent, 10)
    # An A-ASSOCIATE-RQ of a plausible length whose content is garbage: aborted, and said so.
    with closing(socket.create_connection((node.host, node.port))) as bad:
        bad.sendall(struct.pack(">BBL", 0x01, 0, 100) + b"\xff" * 100)
        assert _closed_by_node(bad, 10)
    assert wait_until(lambda: "sent an A-ASSOCIATE-RQ that cannot be decoded: connection closed" in node.log())
    # The node answers the refused ones with an A-ABORT PDU before closing.
    with closing(socket.create_connection((node.host, node.port))) as junk:
        junk.sendall(b"\x99" * 10)
        junk.settimeout(10)
        assert junk.recv(10)[:1] == b"\x07"
    ok, output = _echoscu(node)
    assert ok, output


def _trickle(sock: socket.socket, data: bytes, per_byte: float, limit: float) -> bool:
    """Send ``data`` one byte every ``per_byte`` s; True when the node closed the connection within
    ``limit`` s (a send fails or EOF is readable)."""
    deadline = time.monotonic() + limit
    sock.settimeout(per_byte)
    for byte in data:
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_a_trickled_association_request_is_dropped(running_node):
    node = running_node(association_request_timeout=1)
    request = associate_rq_bytes()
    with closing(socket.create_connection((node.host, node.port))) as sock:
        # The whole request would take minutes at 0.2 s a byte; the node closes it after about 1 s.
        assert _trickle(sock, request, 0.2, 20)
    assert wait_until(lambda: "sent no complete PDU in time" in node.log())


def _established_socket(node, *contexts: tuple[str, str], roles: tuple[str, ...] = (),
                        receive_buffer: int = 0) -> socket.socket:
    """A raw connection on which the node accepted an association (see :func:`_associate_rq_bytes`)."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((node.host, node.port))
    sock.sendall(associate_rq_bytes(*contexts, roles=roles))
    header = _read_exactly(sock, 6)
    assert header[:1] == b"\x02", f"A-ASSOCIATE-AC expected, got {header!r}"
    _read_exactly(sock, struct.unpack(">L", header[2:])[0])
    return sock


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        piece = sock.recv(count - len(data))
        assert piece, "connection closed"
        data += piece
    return data


def test_a_trickled_pdu_is_dropped_while_others_go_on(running_node):
    node = running_node(network_timeout=2)
    with closing(_established_socket(node)) as sock:
        # A P-DATA-TF PDU that would take minutes at 0.2 s a byte; meanwhile a C-ECHO goes through.
        pdata = bytes(P_DATA_TF().encode())[:2] + struct.pack(">L", 200) + b"\0" * 200
        result: list[bool] = []
        trickler = threading.Thread(target=lambda: result.append(_trickle(sock, pdata, 0.2, 30)))
        trickler.start()
        ok, output = _echoscu(node)
        trickler.join(40)
        assert ok, output
        assert result == [True]
    assert wait_until(lambda: "sent no complete PDU in time" in node.log())


@contextmanager
def _idle_associations(node, count: int) -> Iterator[list]:
    """``count`` established pynetdicom associations that do nothing, aborted at the end."""
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = []
    try:
        for _ in range(count):
            assoc = ae.associate(node.host, node.port, ae_title=NODE_AET)
            held.append(assoc)
        yield held
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.abort()


def test_the_association_beyond_max_associations_is_rejected_transient(running_node):
    node = running_node(max_associations=32)
    with _idle_associations(node, 32) as held:
        assert all(assoc.is_established for assoc in held)
        ok, output = _echoscu(node)
    assert not ok
    # DCMTK: "Association Rejected: Result: Rejected Transient, Source: Service Provider (Presentation)
    # Reason: local-limit-exceeded"
    assert re.search(r"Rejected Transient", output), output
    assert "local-limit-exceeded" in output.lower() or "Local Limit Exceeded" in output, output
    ok, output = _echoscu(node)
    assert ok, output


def test_a_peer_that_stops_reading_during_c_get_is_dropped(running_node):
    """C-GET of a large instance by a peer that never reads: the node's send times out after
    network_timeout, the association is aborted and its threads end, while another association works."""
    # dimse_timeout is long: only the stalled send (network_timeout) can end the C-STORE sub-operation.
    node = running_node(network_timeout=2, dimse_timeout=60)
    source = _large_instance()  # 8 MiB: more than the socket buffers hold
    assert [status.Status for status in scu_store(node, [source])] == [0]
    threads_before = _threads(node)
    get_model = StudyRootQueryRetrieveInformationModelGet
    sock = _established_socket(node, (get_model, ImplicitVRLittleEndian),
                               (source.SOPClassUID, source.file_meta.TransferSyntaxUID),
                               roles=(source.SOPClassUID,), receive_buffer=4096)
    with closing(sock):
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = source.StudyInstanceUID
        request = C_GET()
        request.MessageID = 1
        request.AffectedSOPClassUID = get_model
        request.Identifier = BytesIO(encode(identifier, True, True))
        message = C_GET_RQ()
        message.primitive_to_message(request)
        for primitive in message.encode_msg(1, 16384):
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            sock.sendall(pdu.encode())
        # The node now sends the C-STORE sub-operation into a full receive window, and is not read.
        ok, output = _echoscu(node)
        assert ok, output
        assert wait_until(lambda: "did not take what the node sent within network_timeout" in node.log(), 30), \
            node.log()[-3000:]
    assert wait_until(lambda: _threads(node) <= threads_before, 30), (_threads(node), threads_before)


def _large_instance() -> pydicom.Dataset:
    """CT_small with 2048×2048 16-bit noise as pixels (8 MiB), new UIDs."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    dataset.Rows = dataset.Columns = 2048
    dataset.PixelData = random.Random(7).randbytes(2048 * 2048 * 2)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = (
        generate_uid() for _ in range(3))
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def _threads(node) -> int:
    """The node process's thread count (/proc)."""
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))


@pytest.mark.parametrize("key", ["association_request_timeout"])
def test_association_request_timeout_must_be_positive(tmp_path, key):
    from dcbnode.config import ConfigError, load_config

    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path}"\n{key} = 0\n')
    with pytest.raises(ConfigError, match=f"node.{key}: must be a positive number of seconds"):
        load_config(path)
    path.write_text(f'[node]\ndata_dir = "{tmp_path}"\n{key} = 2.5\n')
    assert load_config(path).node.association_request_timeout == 2.5


def _busy_association(node, index: int, errors: list[str]) -> None:
    """Store two instances of a study of its own, find it, get it back; any failure goes to ``errors``."""
    try:
        _store_find_get(node, index, errors)
    except Exception as exc:
        errors.append(f"{index}: {exc!r}")


def _store_find_get(node, index: int, errors: list[str]) -> None:
    datasets = [_ct_copy(study) for study in [generate_uid()] for _ in range(2)]
    received: list[str] = []

    def on_store(event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title=f"BUSY{index:02d}")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    syntax = datasets[0].file_meta.TransferSyntaxUID
    ae.add_requested_context(datasets[0].SOPClassUID, syntax)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate(node.host, node.port, ae_title=NODE_AET, ext_neg=[build_role(datasets[0].SOPClassUID,
                                                                                        scu_role=True, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        errors.append(f"{index}: not established")
        return
    try:
        statuses = [int(assoc.send_c_store(dataset).Status) for dataset in datasets]
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = datasets[0].StudyInstanceUID
        found, find_status = _find(assoc, query)
        if find_status is None:
            # No C-FIND response seen at all: the stall of threaded pynetdicom SCUs under load (NOTES.md,
            # pynetdicom issue 842), not an answer of the node; ask once more. A node that answers
            # Success with no match is reported below as it is.
            found, find_status = _find(assoc, query)
        final = [status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
                 if status][-1]
        if statuses != [0, 0] or len(found) != 1 or final != 0 or len(received) != 2:
            errors.append(f"{index}: store {statuses}, found {len(found)} (C-FIND status {find_status}), "
                          f"get 0x{final:04X}, got {len(received)}")
    finally:
        assoc.release()


def _find(assoc, query: pydicom.Dataset) -> tuple[list[pydicom.Dataset], int | None]:
    """The C-FIND matches and the final status (None when no final response arrived)."""
    found, final = [], None
    for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01):
            found.append(ident)
        elif status:
            final = int(status.Status)
    return found, final


def _ct_copy(study: str) -> pydicom.Dataset:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    dataset.StudyInstanceUID = study
    dataset.SeriesInstanceUID, dataset.SOPInstanceUID = generate_uid(), generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def _node_rss(node) -> int:
    """VmRSS of the node's processes (main and children), in bytes."""
    pids = [node.process.pid, *map(int, Path(f"/proc/{node.process.pid}/task/{node.process.pid}/children")
                                        .read_text().split())]
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024
    return total


def test_32_busy_associations_at_once(running_node):
    """32 associations storing, querying and retrieving at the same time: no error, every instance back."""
    node = running_node(max_associations=32)
    errors: list[str] = []
    threads = [threading.Thread(target=_busy_association, args=(node, index, errors)) for index in range(32)]
    for thread in threads:
        thread.start()
    peak = 0
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, _node_rss(node))
        time.sleep(0.2)
    assert errors == []
    print(f"32 busy associations: node RSS peak {peak / 2**20:.0f} MiB")  # for docs/reliability.md
    assert peak < 2 * 2**30  # far below what one 4 GiB allocation would take
