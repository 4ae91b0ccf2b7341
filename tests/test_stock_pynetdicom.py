"""dcbnode changes pynetdicom only for its own associations: a stock pynetdicom SCU in the same process as
the node (tests, ``dcbnode-admin echo``) runs pynetdicom as shipped.

The check runs in a fresh interpreter (this test process may have imported dcbnode's network code
already): it records every attribute of every pynetdicom module and of every class defined there, imports
dcbnode's node, builds and starts it, stores and echoes with stock pynetdicom SCUs, retrieves with C-GET
(the node's own send path), stops the node, and records them again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from peers import free_port

_SCRIPT = r'''
import json, sys, threading
from pathlib import Path

def snapshot():
    seen = {}
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("pynetdicom") or module is None:
            continue
        for attr, value in vars(module).items():
            seen[f"{name}.{attr}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for key, member in vars(value).items():
                    seen[f"{name}.{attr}.{key}"] = id(member)
            if isinstance(value, dict) and attr.isupper():  # tables such as fsm.ACTIONS
                for key, member in value.items():
                    seen[f"{name}.{attr}[{key!r}]"] = id(member)
    return seen

import pynetdicom, pynetdicom.fsm, pynetdicom.dul, pynetdicom.dimse, pynetdicom.transport, pynetdicom.dsutils
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet, Verification
before = snapshot()

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from dcbnode.archive import Archive
from dcbnode.config import load_config
from dcbnode.net.context import NodeContext
from dcbnode.net.listener import Listeners
from dcbnode.net.server import Node
from dcbnode.net.logging_setup import configure_logging
from pynetdicom._handlers import standard_pdu_recv_handler

configure_logging("INFO")  # as `dcbnode serve` does: pynetdicom's standard log handlers off for the node
data = Path(sys.argv[1])
config = load_config(None, {"node.data_dir": str(data), "node.port": int(sys.argv[2]), "node.bind": "127.0.0.1"})
archive = Archive(data, config.node.resolved_database_url)
node = Node(NodeContext(config=config, archive=archive))
listening = Listeners.open("127.0.0.1", int(sys.argv[2]), 0)
listening.start()
node.start(listening)
ct = dcmread(get_testdata_file("CT_small.dcm", download=False))
results = {}

ae = AE(ae_title="STOCKSCU")
ae.add_requested_context(Verification)
ae.add_requested_context(CTImageStorage, str(ct.file_meta.TransferSyntaxUID))
ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
assoc = ae.associate("127.0.0.1", node.port, ae_title=config.node.ae_title)
results["stock_classes"] = [type(assoc) is Association, type(assoc.dul) is pynetdicom.dul.DULServiceProvider,
                            type(assoc.dimse) is pynetdicom.dimse.DIMSEServiceProvider,
                            type(assoc.dul.socket) is pynetdicom.transport.AssociationSocket]
# pynetdicom's standard log handlers stay bound to a stock association, not to the node's server
results["log_handlers"] = [standard_pdu_recv_handler in [h for h, _ in assoc.get_handlers(evt.EVT_PDU_RECV)],
                           any(server.get_handlers(evt.EVT_PDU_RECV) for server in node._servers)]
results["echo"] = int(assoc.send_c_echo().Status)
results["store"] = int(assoc.send_c_store(ct).Status)
assoc.release()

received = []
getter = AE(ae_title="STOCKGET")
getter.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
getter.add_requested_context(CTImageStorage, str(ct.file_meta.TransferSyntaxUID))
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
role = SCP_SCU_RoleSelectionNegotiation()
role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, False, True
handlers = [(evt.EVT_C_STORE, lambda event: received.append(event.encoded_dataset(include_meta=False)) or 0)]
assoc = getter.associate("127.0.0.1", node.port, ae_title=config.node.ae_title, ext_neg=[role],
                         evt_handlers=handlers)
query = Dataset()
query.QueryRetrieveLevel = "STUDY"
query.StudyInstanceUID = ct.StudyInstanceUID
statuses = [int(status.Status) for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
assoc.release()
results["get"] = statuses[-1]
results["received"] = len(received)
node.stop(grace=5)
archive.close()

after = snapshot()
results["changed"] = sorted(key for key in before if key in after and before[key] != after[key])
results["added"] = sorted(key for key in after if key not in before and key.split(".")[1] in
                          {"association", "dimse", "dul", "fsm", "transport", "dsutils", "ae"})
print(json.dumps(results))
'''


def test_a_stock_pynetdicom_scu_in_the_nodes_process_is_unchanged(tmp_path: Path) -> None:
    script = tmp_path / "stock.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's dcbnode, wherever the script is
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(free_port())], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["stock_classes"] == [True, True, True, True]
    assert results["log_handlers"] == [True, False]
    assert (results["echo"], results["store"], results["get"], results["received"]) == (0, 0, 0, 1)
    assert results["changed"] == []
    assert results["added"] == []


def test_an_incompatible_pynetdicom_stops_serve_at_start_with_one_line(tmp_path: Path) -> None:
    """A pynetdicom whose internals differ from those dcbnode's associations were written against (here:
    one helper of ``Association`` removed before dcbnode starts) stops ``dcbnode serve`` with one line,
    instead of a node that starts without C-MOVE/C-GET."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import pynetdicom.association as a\ndel a.Association._check_received_status\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-m", "dcbnode.cli.node", "serve", "--port", str(free_port()),
                           "--bind", "127.0.0.1", "--data-dir", str(tmp_path / "data")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "is not supported by this dcbnode" in errors[0], done.stderr[-3000:]
    assert "NodeAssociation.send_c_store" in errors[0]
    assert "Traceback" not in done.stderr
