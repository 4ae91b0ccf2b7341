"""Tests for the systemd integration: the notify protocol and the unit file.

The notify tests bind a real ``AF_UNIX`` datagram socket and point
``$NOTIFY_SOCKET`` at it, playing the part of systemd; nothing is mocked.
The unit file is checked with the real ``systemd-analyze verify``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcbnode import service_notify

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT_FILE = REPO_ROOT / "systemd" / "dcbnode.service"
SHIPPED_EXEC_START = "ExecStart=/usr/local/bin/dcbnode serve --config /etc/dcbnode/dcbnode.toml"
SHIPPED_EXEC_RELOAD = "ExecReload=/bin/kill -HUP $MAINPID"

# sun_path is 108 bytes on Linux including the terminating NUL.
_SUN_PATH_MAX = 107


class NotifyListener:
    """The service-manager end of the protocol: a bound datagram socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        #: What systemd would put in $NOTIFY_SOCKET for this socket.
        self.env_value = env_value

    def receive(self) -> str:
        """Return the next datagram as text; fail the test if none arrives."""
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            pytest.fail("no notification datagram received")
        return data.decode("utf-8")

    def receive_with_sender_pid(self) -> tuple[str, int]:
        """Return the next datagram and the pid the kernel says sent it."""
        cred_size = struct.calcsize("3i")
        data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(cred_size))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[:cred_size])
                return data.decode("utf-8"), pid
        pytest.fail("datagram carried no SCM_CREDENTIALS")

    def assert_silent(self) -> None:
        """Fail if any datagram is waiting (i.e. something extra was sent)."""
        self.sock.setblocking(False)
        try:
            extra = self.sock.recv(65536)
        except BlockingIOError:
            return
        finally:
            self.sock.settimeout(2.0)
        pytest.fail(f"unexpected extra datagram: {extra!r}")


def _make_listener(sock: socket.socket, address: str, env_value: str) -> NotifyListener:
    sock.bind(address)
    # Like systemd does, so the kernel attaches the sender's credentials.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(2.0)
    return NotifyListener(sock, env_value)


@pytest.fixture
def path_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    """A path-based notify socket in tmp_path, with $NOTIFY_SOCKET set to it."""
    directory = tmp_path
    short_dir: str | None = None
    if len(str(tmp_path / "notify.sock")) > _SUN_PATH_MAX:
        # A deeply nested basetemp would exceed sun_path; fall back to /tmp.
        short_dir = tempfile.mkdtemp(prefix="dcbn-", dir="/tmp")
        directory = Path(short_dir)
    path = str(directory / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        listener = _make_listener(sock, path, path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield listener
    if short_dir is not None:
        shutil.rmtree(short_dir, ignore_errors=True)


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    """An abstract-namespace notify socket, with $NOTIFY_SOCKET='@name'."""
    # Abstract names are global to the network namespace: make it unique.
    name = f"dcbnode-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        listener = _make_listener(sock, "\0" + name, "@" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield listener


# --------------------------------------------------------------------------
# notify protocol
# --------------------------------------------------------------------------


def test_ready_sends_exactly_ready(path_listener: NotifyListener) -> None:
    assert service_notify.ready() is True
    assert path_listener.receive() == "READY=1"
    path_listener.assert_silent()


def test_ready_with_status_is_one_datagram(path_listener: NotifyListener) -> None:
    assert service_notify.ready("listening on 104") is True
    assert path_listener.receive().split("\n") == ["READY=1", "STATUS=listening on 104"]
    path_listener.assert_silent()


def test_stopping_sends_exactly_stopping(path_listener: NotifyListener) -> None:
    assert service_notify.stopping() is True
    assert path_listener.receive() == "STOPPING=1"
    path_listener.assert_silent()


def test_reloading_sends_reloading_and_monotonic_usec(path_listener: NotifyListener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert service_notify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    lines = path_listener.receive().split("\n")
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2
    match = re.fullmatch(r"MONOTONIC_USEC=(\d+)", lines[1])
    assert match is not None, lines
    # systemd compares the value to its own CLOCK_MONOTONIC reading.
    assert before <= int(match.group(1)) <= after
    path_listener.assert_silent()


def test_status_sends_status_line(path_listener: NotifyListener) -> None:
    assert service_notify.status("3 associations, 1200 instances stored") is True
    assert path_listener.receive() == "STATUS=3 associations, 1200 instances stored"


def test_status_newlines_cannot_inject_assignments(path_listener: NotifyListener) -> None:
    # A newline in free text would otherwise smuggle in a second assignment.
    assert service_notify.status("peer list reloaded\nREADY=1") is True
    assert path_listener.receive() == "STATUS=peer list reloaded READY=1"


def test_extend_timeout(path_listener: NotifyListener) -> None:
    assert service_notify.extend_timeout(30) is True
    assert path_listener.receive() == "EXTEND_TIMEOUT_USEC=30000000"
    with pytest.raises(ValueError):
        service_notify.extend_timeout(0)


def test_raw_notify_passes_state_through(path_listener: NotifyListener) -> None:
    assert service_notify.notify("STATUS=a\nERRNO=0") is True
    assert path_listener.receive() == "STATUS=a\nERRNO=0"
    with pytest.raises(ValueError):
        service_notify.notify("")


def test_datagram_comes_from_this_process(path_listener: NotifyListener) -> None:
    # NotifyAccess=main makes systemd drop datagrams whose sender pid is not
    # MAINPID, so the message must be sent from the calling process itself.
    assert service_notify.ready() is True
    message, pid = path_listener.receive_with_sender_pid()
    assert message == "READY=1"
    assert pid == os.getpid()


def test_abstract_socket(abstract_listener: NotifyListener) -> None:
    assert abstract_listener.env_value.startswith("@")
    assert service_notify.ready() is True
    assert abstract_listener.receive() == "READY=1"
    assert service_notify.stopping() is True
    assert abstract_listener.receive() == "STOPPING=1"
    assert service_notify.reloading() is True
    assert abstract_listener.receive().split("\n")[0] == "RELOADING=1"


def test_returns_false_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert service_notify.notify("READY=1") is False
    assert service_notify.ready() is False
    assert service_notify.stopping() is False
    assert service_notify.reloading() is False
    assert service_notify.status("x") is False


def test_returns_false_with_empty_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert service_notify.ready() is False


def test_returns_false_for_unsupported_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path.sock")
    assert service_notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert service_notify.ready() is False


def test_returns_false_when_socket_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. systemd restarted under us: the node must keep running, not crash.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "no-such.sock"))
    assert service_notify.ready() is False


# --------------------------------------------------------------------------
# unit file
# --------------------------------------------------------------------------


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Parse ``Key=Value`` lines of a unit file (all sections merged)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_file_has_required_settings() -> None:
    """The contract with docs/deployment.md and the server, checked without systemd."""
    text = UNIT_FILE.read_text(encoding="utf-8")
    assert SHIPPED_EXEC_START in text.splitlines()
    assert SHIPPED_EXEC_RELOAD in text.splitlines()
    settings = _unit_settings(text)
    expected = {
        "Type": "notify",
        "User": "dcbnode",
        "Group": "dcbnode",
        "StateDirectory": "dcbnode",
        "Restart": "on-failure",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "NoNewPrivileges": "true",
        "ReadWritePaths": "/var/lib/dcbnode",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert "TimeoutStopSec" in settings
    # These would break the service: W^X breaks libffi callbacks, a private
    # user namespace voids CAP_NET_BIND_SERVICE for port 104.
    for forbidden in ("MemoryDenyWriteExecute", "PrivateUsers", "PrivateNetwork"):
        assert forbidden not in settings, forbidden


def _systemd_analyze() -> str:
    """Path of systemd-analyze; skip locally, but fail under CI, if missing."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        message = "systemd-analyze not installed (Debian/Ubuntu: apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
    return exe


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    text = UNIT_FILE.read_text(encoding="utf-8")

    # verify checks that every Exec*= binary exists and is executable on
    # *this* machine. The dcbnode entry point is only there once installed
    # (and its path depends on the install location), so point ExecStart at
    # an executable that is certainly present; the arguments stay as shipped.
    assert SHIPPED_EXEC_START in text.splitlines()
    stand_in = sys.executable
    assert not re.search(r"\s", stand_in), "unit quoting below assumes no whitespace"
    text = text.replace("ExecStart=/usr/local/bin/dcbnode ", f"ExecStart={stand_in} ", 1)
    # /bin/kill comes from procps, which every real server has but minimal
    # containers may lack; only then substitute it, so a typo in the shipped
    # path is still caught wherever procps is installed.
    if not os.access("/bin/kill", os.X_OK):
        text = text.replace("ExecReload=/bin/kill ", "ExecReload=/bin/true ", 1)

    # Keep the real unit name: verify derives the unit name from the file name.
    unit = tmp_path / "dcbnode.service"
    unit.write_text(text, encoding="utf-8")

    _assert_verified(analyze, unit)


def _assert_verified(analyze: str, *units: Path) -> None:
    """``systemd-analyze verify`` accepts the units without a word about them."""
    # Notes on what verify does and does not need (systemd 252):
    # - No running systemd (works in containers where PID 1 is not systemd)
    #   and no root.
    # - User=/Group= need not exist: they are resolved only at start time,
    #   so the test does not create the dcbnode user.
    # - --man=no: without it verify would look up man: Documentation= pages,
    #   and CI images usually ship without man-db.
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 even for unknown keys ("Unknown key 'ProtectSytem' ...,
    # ignoring.") and unparsable values, which would silently drop a
    # hardening setting. Every diagnostic about our unit names the file or
    # the unit, so any such line is a failure.
    complaints = [line for line in output.splitlines() if "dcbnode" in line]
    assert complaints == [], output


def test_compact_timer_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The nightly compaction (docs/deployment.md): a oneshot service running ``dcbnode-admin compact`` with
    the node's configuration, as the node's user, and the timer that starts it."""
    analyze = _systemd_analyze()
    service = (REPO_ROOT / "systemd" / "dcbnode-compact.service").read_text(encoding="utf-8")
    shipped = "ExecStart=/usr/local/bin/dcbnode-admin compact --config /etc/dcbnode/dcbnode.toml"
    assert shipped in service.splitlines()
    settings = _unit_settings(service)
    for key, value in {"Type": "oneshot", "User": "dcbnode", "ReadWritePaths": "/var/lib/dcbnode"}.items():
        assert settings.get(key) == [value], key
    (tmp_path / "dcbnode-compact.service").write_text(
        service.replace("ExecStart=/usr/local/bin/dcbnode-admin ", f"ExecStart={sys.executable} ", 1), encoding="utf-8")
    timer = tmp_path / "dcbnode-compact.timer"
    shutil.copyfile(REPO_ROOT / "systemd" / "dcbnode-compact.timer", timer)
    assert _unit_settings(timer.read_text(encoding="utf-8"))["Persistent"] == ["true"]
    _assert_verified(analyze, tmp_path / "dcbnode-compact.service", timer)


def test_node_extends_the_start_timeout_while_it_recovers(path_listener: NotifyListener, running_node) -> None:
    """A real ``dcbnode serve`` under a notify socket: before recovery it asks systemd for more time
    (EXTEND_TIMEOUT_USEC) and says so in its status, and only then sends READY=1."""
    node = running_node()
    received = [path_listener.receive() for _ in range(3)]
    assert received[0] == "EXTEND_TIMEOUT_USEC=300000000", received
    assert received[1] == "STATUS=recovering the archive: listing volumes", received
    assert received[2].startswith("READY=1\n") and f"port {node.port}" in received[2], received
    assert re.search(r"recovery: 0 volume\(s\).* in \d+\.\d s", node.log()), node.log()
