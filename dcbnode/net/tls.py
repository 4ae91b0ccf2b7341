"""DICOM over TLS (PS3.15 B.1, the Basic TLS Secure Transport Connection Profile; TLS 1.2 or later):
the ``[tls]`` listener's context and the one C-MOVE sub-associations to a ``tls = true`` peer use.

The handshake of an accepted connection is not done by the accepting thread (a client that connects
and sends nothing would stop every other connection): :class:`~.provider.NodeSocket` does it in the
association's own thread, within ``association_request_timeout``.
"""

from __future__ import annotations

import ssl

from ..config import TlsConfig

__all__ = ["client_tls_args", "server_context"]


def _context(purpose: int, tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(tls.ca_certificates)
    return context


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The TLS listener's context: the node's certificate; client certificates verified against
    ``ca_certificates``, and required when ``require_client_certificate`` (``ssl.SSLError`` for a
    certificate, key or CA file that cannot be used)."""
    context = _context(ssl.PROTOCOL_TLS_SERVER, tls)
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_tls_args(tls: TlsConfig) -> tuple[ssl.SSLContext, None]:
    """``tls_args`` for ``AE.associate`` to a ``tls = true`` peer: its certificate must chain to
    ``ca_certificates`` (the system's CAs when not set); the node shows its own certificate.  The host
    name is not checked against the certificate: peers are configured by address as often as by name
    (PS3.15 B.1 asks for certificate-based authentication, which the chain check is)."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT, tls)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_certificates is None:
        context.load_default_certs()
    return context, None
