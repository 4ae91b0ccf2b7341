"""Real DICOM peers for tests and benchmarks: DCMTK tools and a bare pynetdicom C-STORE SCP.

Every server is a context manager that starts the peer on a free loopback port, waits until the port
accepts connections, yields a small object (``.host``, ``.port``, ``.aet`` …) and on exit always stops it
(DCMTK: SIGTERM to its whole process group, then SIGKILL; every wait is bounded).

Importing: this file has no imports from ``tests``/``bench``. Test modules import it as ``peers`` (pytest
puts ``tests/`` on ``sys.path`` while ``tests/`` has no ``__init__.py``) or as ``tests.peers`` when the
repository root is on ``sys.path``; ``bench/`` scripts insert the repository root and use
``from tests.peers import ...``.

DCMTK facts this relies on (Debian dcmtk 3.6.7):

- The DCMTK binaries are looked up as ELF executables (``dcmtk_tool``): pynetdicom installs Python console
  scripts of the same names (``storescu``, ``storescp``, ``getscu``, ``findscu``, ``movescu``, ``echoscu``),
  and pyenv shims for them come first on ``PATH``. ``$DCMTK_BIN`` may name the directory to use.
- ``TCP_NODELAY=1`` must be in the DCMTK tools' environment (``dcmtk_env``), or every C-STORE waits ~40 ms.
- ``storescp``/``dcmqrscp`` listen on all interfaces with no bind option: talk to them over loopback only.
- ``dcmqrscp.cfg`` HostTable entries need a host *name* (``localhost``), not an IP address.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LOOPBACK",
    "DcmqrscpPeer",
    "PyStoreSCP",
    "StorescpPeer",
    "dcmqrscp",
    "dcmtk_env",
    "dcmtk_tool",
    "free_port",
    "pynetdicom_store_scp",
    "run_dcmtk",
    "run_getscu",
    "run_storescu",
    "storescp",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 15.0  # seconds for a server to accept connections
STOP_TIMEOUT = 5.0  # seconds per signal when stopping a server
TOOL_TIMEOUT = 300.0  # seconds for one SCU run
_START_ATTEMPTS = 3  # a free port can be taken between free_port() and the server's bind()


# --------------------------------------------------------------------------- basics


def free_port() -> int:
    """A TCP port free on all interfaces right now (DCMTK servers bind 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """``os.environ`` plus ``TCP_NODELAY=1`` (DCMTK otherwise waits on Nagle/delayed ACK per message)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def dcmtk_tool(name: str) -> str:
    """Absolute path of DCMTK's ``name`` binary, skipping pynetdicom's same-named Python scripts/shims."""
    dirs = [os.environ["DCMTK_BIN"]] if os.environ.get("DCMTK_BIN") else []
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += ["/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"]
    for directory in dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK) and _is_elf(candidate):
            return str(candidate)
    raise FileNotFoundError(f"DCMTK tool {name!r} not found (apt-get install dcmtk, or set $DCMTK_BIN)")


def wait_for_port(
    host: str, port: int, timeout: float = START_TIMEOUT, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``host:port`` accepts a TCP connection; raise ``TimeoutError`` (or ``RuntimeError`` at
    once if ``proc`` exits first)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f} s") from None
            time.sleep(0.02)


def run_dcmtk(
    tool: str, args: Sequence[str], *, timeout: float = TOOL_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK ``tool`` with ``args`` (TCP_NODELAY env, output captured as text, never raises on failure;
    a timeout yields returncode -9 and the partial output)."""
    cmd = [dcmtk_tool(tool), *args]
    try:
        return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return subprocess.CompletedProcess(cmd, -9, out, err + f"\n[timed out after {timeout} s]")


def run_storescu(
    files_or_dir: Path | str | Iterable[Path | str],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
    *,
    timeout: float = TOOL_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Send files (or a directory, recursively: ``+sd +r``) with DCMTK ``storescu`` over ONE association.

    ``extra_args`` go before host/port, e.g. ``("-R",)`` (propose only the needed contexts), ``("-nh",)``
    (don't halt on a failed store), ``("-xv",)`` (J2K lossless). Check ``returncode`` and ``stderr`` yourself.
    """
    if isinstance(files_or_dir, (str, os.PathLike)) and Path(files_or_dir).is_dir():
        inputs = ["+sd", "+r", str(files_or_dir)]
    elif isinstance(files_or_dir, (str, os.PathLike)):
        inputs = [str(files_or_dir)]
    else:
        inputs = [str(p) for p in files_or_dir]
    args = ["-aet", calling_aet, "-aec", called_aet, *extra_args, host, str(port), *inputs]
    return run_dcmtk("storescu", args, timeout=timeout)


def run_getscu(
    host: str,
    port: int,
    called_aet: str,
    out_dir: Path | str,
    keys: Mapping[str, str],
    calling_aet: str = "GETSCU",
    extra_args: Sequence[str] = ("-S",),
    *,
    timeout: float = TOOL_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """C-GET with DCMTK ``getscu`` into ``out_dir`` (must exist); ``keys`` become ``-k KEY=VALUE``.

    Default ``extra_args=("-S",)`` selects Study Root; e.g. keys ``{"QueryRetrieveLevel": "SERIES",
    "StudyInstanceUID": …, "SeriesInstanceUID": …}``.
    """
    key_args = [a for k, v in keys.items() for a in ("-k", f"{k}={v}")]
    args = ["-aet", calling_aet, "-aec", called_aet, "-od", str(out_dir), *extra_args, *key_args,
            host, str(port)]
    return run_dcmtk("getscu", args, timeout=timeout)


# --------------------------------------------------------------------------- DCMTK server processes


def _stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group started with ``start_new_session``, then SIGKILL; bounded waits."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            continue
    # children of a forking server may outlive the leader: sweep the group once more
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


@contextlib.contextmanager
def _dcmtk_server(
    name: str, make_cmd: Callable[[int], list[str]], port: int | None, log_dir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """Start ``make_cmd(port)`` in its own session on ``port`` (or a free one, retried); yield
    (process, port, log path); always stop it."""
    attempts = 1 if port is not None else _START_ATTEMPTS
    last_error: Exception | None = None
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        log_path = log_dir / f"server-{chosen}-{attempt}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(make_cmd(chosen), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True)
        try:
            wait_for_port(LOOPBACK, chosen, START_TIMEOUT, proc)
            time.sleep(0.05)  # the port might be someone else's: make sure our process is still alive
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}")
        except (RuntimeError, TimeoutError) as exc:
            _stop_process_group(proc)
            last_error = RuntimeError(f"{exc}\n--- log {log_path} ---\n{_tail(log_path)}")
            continue
        try:
            yield proc, chosen, log_path
        finally:
            _stop_process_group(proc)
        return
    raise RuntimeError(f"could not start {name}") from last_error


@dataclass
class StorescpPeer:
    """A running DCMTK ``storescp``."""

    port: int
    aet: str
    out_dir: Path
    log_path: Path
    host: str = LOOPBACK

    def received(self) -> list[Path]:
        """Files written so far (storescp names them ``<modality>.<SOPInstanceUID>``)."""
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())


@contextlib.contextmanager
def storescp(
    out_dir: Path | str,
    aet: str = "STORESCP",
    port: int | None = None,
    accept_syntaxes: str | Sequence[str] = "+xa",
    extra_args: Sequence[str] = (),
) -> Iterator[StorescpPeer]:
    """DCMTK ``storescp -aet AET -od OUT_DIR +xa -dhl PORT`` (iterative: one association at a time).

    ``accept_syntaxes`` is one storescp flag or several, e.g. ``"+xa"`` (all it supports), ``"+xi"``
    (implicit VR LE only), ``"+xv"`` (prefer J2K lossless). storescp cannot accept HTJ2K.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags = [accept_syntaxes] if isinstance(accept_syntaxes, str) else list(accept_syntaxes)
    tool = dcmtk_tool("storescp")

    def make_cmd(p: int) -> list[str]:
        return [tool, "-aet", aet, "-od", str(out), *flags, "-dhl", *extra_args, str(p)]

    with tempfile.TemporaryDirectory(prefix="storescp-") as tmp, \
            _dcmtk_server("storescp", make_cmd, port, Path(tmp)) as (_proc, chosen, log_path):
        yield StorescpPeer(port=chosen, aet=aet, out_dir=out, log_path=log_path)


@dataclass
class DcmqrscpPeer:
    """A running DCMTK ``dcmqrscp`` with one storage area (``storage_dir``) indexed in ``index.dat``."""

    port: int
    aet: str
    config_path: Path
    storage_dir: Path
    log_path: Path
    host: str = LOOPBACK


def _dcmqrscp_config(port: int, aet: str, storage: Path, hosts: Mapping[str, tuple[str, int]]) -> str:
    host_lines = [f"peer{i} = ({name}, {h}, {p})" for i, (name, (h, p)) in enumerate(hosts.items())]
    return "\n".join([
        f"NetworkTCPPort  = {port}",
        "MaxPDUSize      = 16384",
        "MaxAssociations = 16",
        "",
        "HostTable BEGIN",
        *host_lines,
        "HostTable END",
        "",
        "VendorTable BEGIN",
        "VendorTable END",
        "",
        "AETable BEGIN",
        f"{aet}  {storage}  RW  (500, 1024mb)  ANY",  # dcmqrscp caps both: 500 studies, 1 GiB each
        "AETable END",
        "",
    ])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@contextlib.contextmanager
def dcmqrscp(
    files: Path | str | Iterable[Path | str] = (),
    aet: str = "DCMQRSCP",
    port: int | None = None,
    *,
    move_destinations: Mapping[str, tuple[str, int]] | None = None,
    callers: Sequence[str] = ("STORESCU", "GETSCU", "FINDSCU", "MOVESCU", "ECHOSCU"),
    single_process: bool = False,
    extra_args: Sequence[str] = (),
) -> Iterator[DcmqrscpPeer]:
    """DCMTK ``dcmqrscp`` (C-FIND/C-MOVE/C-GET/C-STORE SCP) in a temp dir, pre-loaded with ``files``.

    ``files`` is a directory (all files below it) or an iterable of paths. They are hard-linked (or
    copied) into the storage area and indexed with ``dcmqridx`` before the server starts. The AETable
    entry accepts ANY peer; ``move_destinations`` ``{AET: (hostname, port)}`` become HostTable entries
    (C-MOVE targets must be there; use ``"localhost"``, an IP address is not accepted), as do ``callers``
    (port 104, informational). Fork-per-association by default, like a real deployment; ``single_process``
    adds ``-s``.
    """
    if isinstance(files, (str, os.PathLike)):
        root = Path(files)
        sources = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    else:
        sources = [Path(p) for p in files]
    hosts: dict[str, tuple[str, int]] = {c: ("localhost", 104) for c in callers}
    hosts.update(move_destinations or {})
    tool = dcmtk_tool("dcmqrscp")
    with tempfile.TemporaryDirectory(prefix="dcmqrscp-") as tmp:
        tmp_path = Path(tmp)
        storage = tmp_path / "db" / aet
        storage.mkdir(parents=True)
        linked = []
        for i, src in enumerate(sources):
            dst = storage / f"{i:06d}_{src.name}"
            _link_or_copy(src, dst)
            linked.append(str(dst))
        for start in range(0, len(linked), 500):  # dcmqridx STORAGE FILE...
            res = run_dcmtk("dcmqridx", [str(storage), *linked[start:start + 500]], timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"dcmqridx failed ({res.returncode}): {res.stdout}{res.stderr}")
        config = tmp_path / "dcmqrscp.cfg"

        def make_cmd(p: int) -> list[str]:
            config.write_text(_dcmqrscp_config(p, aet, storage, hosts))
            mode = ["-s"] if single_process else []
            return [tool, "-c", str(config), *mode, "-dhl", *extra_args, str(p)]

        with _dcmtk_server("dcmqrscp", make_cmd, port, tmp_path) as (_proc, chosen, log_path):
            yield DcmqrscpPeer(port=chosen, aet=aet, config_path=config, storage_dir=storage,
                               log_path=log_path)


# --------------------------------------------------------------------------- pynetdicom SCP


@dataclass
class PyStoreSCP:
    """A running bare pynetdicom C-STORE SCP; ``received`` lists written files in arrival order."""

    port: int
    aet: str
    out_dir: Path
    received: list[Path] = field(default_factory=list)
    host: str = LOOPBACK


@contextlib.contextmanager
def pynetdicom_store_scp(
    out_dir: Path | str,
    aet: str = "PYSTORE",
    port: int | None = None,
    transfer_syntaxes: Sequence[str] | None = None,
    *,
    max_pdu: int | None = None,
) -> Iterator[PyStoreSCP]:
    """A pynetdicom C-STORE SCP (server thread in this process) on ``127.0.0.1``.

    It supports every storage SOP class in ``pynetdicom.AllStoragePresentationContexts`` with
    ``transfer_syntaxes`` (default: pynetdicom's ``ALL_TRANSFER_SYNTAXES``, compressed ones included;
    e.g. ``["1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203"]`` for HTJ2K only or
    ``["1.2.840.10008.1.2"]`` for Implicit VR LE only). Each C-STORE writes ``event.encoded_dataset()``
    (Part-10 bytes as received) to ``out_dir/<n>.dcm`` (n = 0, 1, …) and answers 0x0000.
    ``max_pdu`` sets the advertised maximum PDU (pynetdicom default 16382; 0 = unlimited).
    """
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    syntaxes = list(transfer_syntaxes) if transfer_syntaxes else list(ALL_TRANSFER_SYNTAXES)
    ae = AE(ae_title=aet)
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    peer = PyStoreSCP(port=0, aet=aet, out_dir=out)
    lock = threading.Lock()
    counter = itertools.count()

    def handle_store(event: evt.Event) -> int:
        with lock:
            path = out / f"{next(counter)}.dcm"
        path.write_bytes(event.encoded_dataset())
        with lock:
            peer.received.append(path)
        return 0x0000

    server = ae.start_server((LOOPBACK, port or 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        peer.port = int(server.server_address[1])
        yield peer
    finally:
        server.shutdown()
        ae.shutdown()


def send_raw_request(assoc: Any, primitive: Any) -> list[Any] | None:
    """Send a DIMSE request ``primitive`` as it is — pynetdicom's ``send_c_*`` refuse the malformed values
    a hostile SCU sends, so tests fill the primitive's private fields — over the first accepted context
    of its SOP class; every response primitive up to the final one, or ``None`` when the peer aborted."""
    sop_class = primitive.AffectedSOPClassUID
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class)
    responses = []
    assoc._reactor_checkpoint.clear()  # as pynetdicom's send_c_*: the replies come to us, not the reactor
    try:
        assoc.dimse.send_msg(primitive, context.context_id)
        while True:
            _, response = assoc.dimse.get_msg(block=True)
            if response is None:
                return None
            responses.append(response)
            if response.Status not in (0xFF00, 0xFF01):
                return responses
    finally:
        assoc._reactor_checkpoint.set()


def associate_rq_bytes(*contexts: tuple[str, str], roles: tuple[str, ...] = (), called_aet: str = "DCBNODE") -> bytes:
    """A valid A-ASSOCIATE-RQ to the node for ``contexts`` ((abstract syntax, transfer syntax); default:
    Verification), asking for the SCP role for the SOP classes in ``roles``."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import build_context, build_role
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.sop_class import Verification
    from pynetdicom.transport import AddressInformation

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAWPEER"
    primitive.called_ae_title = called_aet
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 2)
    requested = []
    for number, (abstract, syntax) in enumerate(contexts or [(Verification, ImplicitVRLittleEndian)]):
        context = build_context(abstract, syntax)
        context.context_id = 2 * number + 1
        requested.append(context)
    primitive.presentation_context_definition_list = requested
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length] + [build_role(uid, scp_role=True) for uid in roles]
    return bytes(A_ASSOCIATE_RQ(primitive).encode())
