"""DICOM over TLS (PS3.15 B.1) on the [tls] listener, with certificates made here: stock pynetdicom over
``ssl`` as the peer (Debian's DCMTK is built without TLS: ``echoscu --help`` lists no ``+tls``)."""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pydicom
import pytest
from conftest import NODE_AET, REPO, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from peers import LOOPBACK, free_port
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove, Verification

CT = get_testdata_file("CT_small.dcm", download=False)


class Pki(NamedTuple):
    ca: Path
    node_cert: Path
    node_key: Path
    client_cert: Path
    client_key: Path
    foreign_cert: Path
    foreign_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A CA with a node and a client certificate, and a client certificate from another CA."""
    folder = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "node", "client", "other", "foreign")}
    ca = _certificate("dcbnode test CA", keys["ca"], "dcbnode test CA", keys["ca"], ca=True)
    other = _certificate("another CA", keys["other"], "another CA", keys["other"], ca=True)
    ca_path, _ = _write(folder, "ca", ca, keys["ca"])
    node = _write(folder, "node", _certificate("DCBNODE", keys["node"], "dcbnode test CA", keys["ca"], False),
                  keys["node"])
    client = _write(folder, "client", _certificate("MODALITY", keys["client"], "dcbnode test CA", keys["ca"],
                                                   False), keys["client"])
    foreign = _write(folder, "foreign", _certificate("MODALITY", keys["foreign"], "another CA", keys["other"],
                                                     False), keys["foreign"])
    del other
    return Pki(ca_path, *node, *client, *foreign)


def _client_context(pki: Pki, cert: Path | None, key: Path | None,
                    maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(cert, key)
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    return context


def _tls_table(pki: Pki, port: int) -> dict:
    return {"port": port, "certificate": str(pki.node_cert), "private_key": str(pki.node_key),
            "ca_certificates": str(pki.ca), "require_client_certificate": True}


def _echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AET, tls_args=(context, None) if context else None)
    if not assoc.is_established:
        return False
    try:
        return bool(assoc.send_c_echo().Status == 0)
    finally:
        assoc.release()


def test_tls_only_node_admits_only_clients_with_a_certificate_of_its_ca(running_node, pki: Pki):
    tls_port = free_port()
    node = running_node(port=0, tables={"tls": _tls_table(pki, tls_port)})
    assert _echo(tls_port, _client_context(pki, pki.client_cert, pki.client_key))
    # A store over TLS.
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, pydicom.dcmread(CT).file_meta.TransferSyntaxUID)
    assoc = ae.associate(LOOPBACK, tls_port, ae_title=NODE_AET,
                         tls_args=(_client_context(pki, pki.client_cert, pki.client_key), None))
    assert assoc.is_established
    assert assoc.send_c_store(pydicom.dcmread(CT)).Status == 0
    assoc.release()
    # No association: plain DICOM to the TLS port, no client certificate, one from another CA, TLS 1.1.
    assert not _echo(tls_port, None)
    assert not _echo(tls_port, _client_context(pki, None, None))
    assert not _echo(tls_port, _client_context(pki, pki.foreign_cert, pki.foreign_key))
    assert not _echo(tls_port, _client_context(pki, pki.client_cert, pki.client_key, ssl.TLSVersion.TLSv1_1))
    assert wait_until(lambda: node.log().count("TLS handshake failed") >= 3), node.log()[-3000:]
    assert f"accepting associations on {LOOPBACK} TLS port {tls_port} (" in node.log()


def test_c_move_to_a_tls_peer_uses_tls(running_node, pki: Pki):
    tls_port, store_port = free_port(), free_port()
    received = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    scp = AE(ae_title="TLSPEER")
    scp.add_supported_context(CTImageStorage, [str(pydicom.dcmread(CT).file_meta.TransferSyntaxUID),
                                               "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    scp.add_supported_context(Verification)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_context.load_cert_chain(pki.client_cert, pki.client_key)
    server_context.verify_mode = ssl.CERT_REQUIRED  # the node must show its certificate
    server = scp.start_server((LOOPBACK, store_port), block=False, ssl_context=server_context,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = running_node(tables={"tls": _tls_table(pki, tls_port),
                                    "peers.TLSPEER": {"host": LOOPBACK, "port": store_port, "tls": True}})
        ae = AE(ae_title="MOVESCU")
        ae.add_requested_context(CTImageStorage, pydicom.dcmread(CT).file_meta.TransferSyntaxUID)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AET)  # the plain port, still open
        assert assoc.is_established
        dataset = pydicom.dcmread(CT)
        assert assoc.send_c_store(dataset).Status == 0
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = dataset.StudyInstanceUID
        statuses = [status.Status for status, _ in
                    assoc.send_c_move(identifier, "TLSPEER", StudyRootQueryRetrieveInformationModelMove) if status]
        assoc.release()
        assert statuses[-1] == 0, [hex(s) for s in statuses]
        assert received == [dataset.SOPInstanceUID]
        # dcbnode-admin echo reaches the peer the way a C-MOVE does: over TLS.
        echo = subprocess.run([sys.executable, "-m", "dcbnode.cli.admin", "--config", str(node.config_path), "echo",
                               "TLSPEER"], cwd=REPO, capture_output=True, text=True, check=False)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    finally:
        server.shutdown()


def test_tls_settings_are_checked(tmp_path: Path, pki: Pki):
    from dcbnode.config import ConfigError, load_config

    path = tmp_path / "node.toml"

    def error(text: str) -> str:
        path.write_text(f'[node]\ndata_dir = "{tmp_path}"\n{text}')
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        return str(caught.value)

    assert error("port = 0\n").startswith("node.port: 0 turns the plain listener off, but [tls] port is not set")
    assert error(f'[tls]\nport = 2762\ncertificate = "{pki.node_cert}"\n').startswith("tls.private_key: missing")
    assert error(f'[tls]\nport = 2762\ncertificate = "{tmp_path}/none.crt"\n').startswith(
        f"tls.certificate: {tmp_path}/none.crt is not a readable file")
    assert error(f'[tls]\nport = 2762\ncertificate = "{pki.node_cert}"\nprivate_key = "{pki.node_key}"\n'
                 ).startswith("tls.ca_certificates: missing; client certificates are verified against it")
