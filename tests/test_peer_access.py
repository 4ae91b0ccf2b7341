"""Nobody let in: [access] require_known_peer, [peers.<AE>] allow, SIGHUP, and C-MOVE to look-alike AE
titles — with DCMTK's echoscu/storescu/findscu/movescu/storescp and stock pynetdicom against a node."""

from __future__ import annotations

import re
import signal
from io import BytesIO
from pathlib import Path

import pydicom
from conftest import NODE_AET, indexed_count, read_back, wait_until, write_config
from peers import LOOPBACK, free_port, run_dcmtk, send_raw_request, storescp
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

CT = get_testdata_file("CT_small.dcm", download=False)
#: TEST-NET-1 (RFC 5737): an address no test connection comes from.
ELSEWHERE = "192.0.2.1"


def _dcmtk(tool: str, node, calling: str, *args: str, files: tuple[str, ...] = ()):
    return run_dcmtk(tool, ["-v", "-aet", calling, "-aec", NODE_AET, *args, node.host, str(node.port), *files],
                     timeout=60)


def _peers(limited_allow: list[str], storescp_port: int) -> dict[str, dict]:
    return {
        "peers.KNOWN": {"host": LOOPBACK, "port": 1},
        "peers.LIMITED": {"host": LOOPBACK, "port": 1, "allow": limited_allow},
        "peers.FARAWAY": {"host": ELSEWHERE, "port": 1},
        "peers.STORESCP": {"host": LOOPBACK, "port": storescp_port},
    }


def test_only_known_peers_from_their_host_and_only_what_they_are_allowed(running_node):
    storescp_port = free_port()
    node = running_node(access={"require_known_peer": True}, tables=_peers(["echo", "find"], storescp_port))
    # Unknown calling AE title, and a known one from another address: the association is rejected.
    for calling in ("STRANGER", "FARAWAY"):
        result = _dcmtk("echoscu", node, calling)
        assert result.returncode != 0
        assert "Association Rejected" in result.stdout + result.stderr, result.stdout + result.stderr
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert _dcmtk("echoscu", node, "KNOWN").returncode == 0
    assert _dcmtk("echoscu", node, "LIMITED").returncode == 0
    # LIMITED may find but not store: the C-STORE is refused 0124, nothing is stored.
    stored = _dcmtk("storescu", node, "LIMITED", files=(str(CT),))
    assert "Received Store Response (Unknown Status: 0x124)" in stored.stderr, stored.stdout + stored.stderr
    found = _dcmtk("findscu", node, "LIMITED", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")
    assert found.returncode == 0, found.stdout + found.stderr
    moved = _dcmtk("movescu", node, "LIMITED", "-S", "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", "StudyInstanceUID=1.2.3")
    assert re.search(r"0x0?124", moved.stdout + moved.stderr), moved.stdout + moved.stderr
    log = node.log()
    assert "calling AE title 'STRANGER' is not in [peers]; [access] require_known_peer is on" in log
    assert f"FARAWAY connected from {LOOPBACK}, which is not its [peers.FARAWAY] host {ELSEWHERE}" in log
    assert f"store refused: LIMITED@{LOOPBACK} is not allowed to store ([peers.LIMITED] allow)" in log
    assert f"move refused: LIMITED@{LOOPBACK} is not allowed to move" in log

    # SIGHUP: LIMITED may now store, STRANGER becomes known.
    tables = {"node": {"ae_title": NODE_AET, "bind": LOOPBACK, "port": node.port, "data_dir": str(node.data_dir)},
              "access": {"require_known_peer": True},
              **_peers(["echo", "find", "store"], storescp_port),
              "peers.STRANGER": {"host": "localhost", "port": 1}}
    write_config(node.config_path, tables)
    node.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "SIGHUP: reloaded" in node.log(), 15)
    stored = _dcmtk("storescu", node, "LIMITED", files=(str(CT),))
    assert stored.returncode == 0 and "0x0124" not in stored.stdout + stored.stderr, stored.stdout + stored.stderr
    assert _dcmtk("echoscu", node, "STRANGER").returncode == 0
    archive = read_back(node.data_dir)
    try:
        assert indexed_count(archive) == 1
    finally:
        archive.close()


def test_c_move_to_a_look_alike_destination_is_a801_and_sends_nothing(running_node, tmp_path: Path):
    storescp_port = free_port()
    node = running_node(tables={"peers.STORESCP": {"host": LOOPBACK, "port": storescp_port}})
    assert _dcmtk("storescu", node, "MODALITY", files=(str(CT),)).returncode == 0
    study = pydicom.dcmread(CT).StudyInstanceUID
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    with storescp(tmp_path / "in", aet="STORESCP", port=storescp_port) as peer:
        for look_alike in ("storescp", "STORESCP1", "STORE SCP", "STORESC"):
            result = _dcmtk("movescu", node, "MOVESCU", "-S", "-aem", look_alike, *keys)
            assert "Final Move Response (Refused: MoveDestinationUnknown)" in result.stderr, (look_alike, result.stderr)
        # NUL padding, which DCMTK does not send: pynetdicom, under the node, finds the request invalid (AE
        # VR) and aborts the association.
        for look_alike in (b"STORESCP\0", b"STORESCP\0\0\0\0\0\0\0\0", b"STORE\0SCP"):
            assert _pynetdicom_move(node, look_alike, study) is None, look_alike
        assert peer.received() == []
        # Spaces around an AE title are not significant (PS3.5 6.2): the configured peer itself.
        result = _dcmtk("movescu", node, "MOVESCU", "-S", "-aem", " STORESCP ", *keys)
        assert result.returncode == 0, result.stdout + result.stderr
        assert wait_until(lambda: len(peer.received()) == 1, 10)
    assert node.log().count("C-MOVE to unknown destination") == 4


def _pynetdicom_move(node, destination: bytes, study: str) -> int | None:
    """A C-MOVE with ``destination`` as raw bytes (pynetdicom's SCU refuses to send such titles, so the
    request primitive is filled in here); the final status, ``None`` when the node aborted instead."""
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(node.host, node.port, ae_title=NODE_AET)
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    request = C_MOVE()
    request.MessageID = 7
    request.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelMove
    request._move_destination = destination  # what a hostile or broken SCU puts on the wire
    request.Identifier = BytesIO(encode(identifier, True, True))
    try:
        responses = send_raw_request(assoc, request)
    finally:
        assoc.release()
    return None if responses is None else int(responses[-1].Status)


def test_allow_lists_only_known_services(tmp_path: Path):
    from dcbnode.config import ConfigError, load_config

    path = tmp_path / "node.toml"
    peer = '[peers.CT]\nhost = "ct"\nport = 104\n'
    path.write_text(f'[node]\ndata_dir = "{tmp_path}"\n{peer}allow = ["store", "stor"]\n')
    try:
        load_config(path)
    except ConfigError as error:
        assert str(error).startswith('peers.CT.allow: unknown service "stor"; use any of "echo", "store"'), str(error)
    else:
        raise AssertionError("accepted")
    path.write_text(f'[node]\ndata_dir = "{tmp_path}"\n{peer}allow = []\n')
    assert load_config(path).peers["CT"].allow == frozenset()
