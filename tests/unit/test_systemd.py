"""The sd_notify and socket-activation protocols, read the way libsystemd reads them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ccos_obsd.errors import SystemdEnvironmentError
from ccos_obsd.systemd import (
    ListenFd,
    Notifier,
    PassedSockets,
    listen_fds,
    notify_address,
    watchdog_interval,
)

# --- $LISTEN_FDS


def test_no_variables_no_sockets() -> None:
    assert listen_fds({}) == []


def test_variables_for_another_process_are_ignored_and_removed() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ingest:http", "PATH": "/bin"}
    assert listen_fds(environ) == []
    assert environ == {"PATH": "/bin"}


def test_variables_stay_when_asked() -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert listen_fds(environ, unset_environment=False) == []
    assert environ == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}


@pytest.mark.parametrize("environ", [
    {"LISTEN_PID": "me", "LISTEN_FDS": "1"},
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "one"},
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"},
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ingest"},
])
def test_malformed_variables_are_an_error_and_are_removed(environ: dict[str, str]) -> None:
    environ = {k: v.replace("{pid}", str(os.getpid())) for k, v in environ.items()}
    with pytest.raises(SystemdEnvironmentError):
        listen_fds(environ)
    assert environ == {}


CHILD = """
import json, os, socket, sys
from ccos_obsd.systemd import PassedSockets, listen_fds
unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
unix.bind(sys.argv[1]); unix.listen()
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.bind(("127.0.0.1", 0)); tcp.listen()
tcp_name = list(tcp.getsockname())
copies = [os.dup(tcp.fileno()), os.dup(unix.fileno())]
tcp.close(); unix.close()
for fd, copy in enumerate(copies, start=3):   # fds start at 3, as systemd passes them
    os.dup2(copy, fd, inheritable=True)
    os.close(copy)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES=sys.argv[2])
fds = listen_fds()
cloexec = [not os.get_inheritable(f.fd) for f in fds]
left = [k for k in os.environ if k.startswith("LISTEN_")]
try:
    passed = PassedSockets.from_fds(fds)
    roles = {name: getattr(passed, name).getsockname() for name in passed.names}
    roles["http"] = list(roles["http"])
except ValueError as exc:
    roles = {"error": str(exc)}
print(json.dumps({"fds": [[f.fd, f.name] for f in fds], "cloexec": cloexec, "left": left, "roles": roles,
                  "tcp": tcp_name}))
"""


def run_child(tmp_path: Path, names: str) -> dict[str, object]:
    path = tmp_path / "s.sock"
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), names], capture_output=True, text=True,
                            timeout=60, check=True)
    outcome: dict[str, object] = json.loads(result.stdout)
    return outcome


def test_passed_fds_are_read_named_closed_on_exec_and_forgotten(tmp_path: Path) -> None:
    outcome = run_child(tmp_path, "http:ingest")
    assert outcome["fds"] == [[3, "http"], [4, "ingest"]]
    assert outcome["cloexec"] == [True, True]
    assert outcome["left"] == []
    assert outcome["roles"] == {"ingest": str(tmp_path / "s.sock"), "http": outcome["tcp"]}


def test_unnamed_fds_are_taken_by_address_family(tmp_path: Path) -> None:
    # systemd names an fd after its .socket unit when FileDescriptorName= is not set.
    outcome = run_child(tmp_path, "ccos-obsd-http.socket:ccos-obsd.socket")
    assert outcome["roles"] == {"ingest": str(tmp_path / "s.sock"), "http": outcome["tcp"]}


def test_a_tcp_socket_named_ingest_is_refused(tmp_path: Path) -> None:
    outcome = run_child(tmp_path, "ingest:http")
    assert outcome["roles"] == {"error": "fd 3 (ingest) is passed as 'ingest' but is not a Unix stream socket"}


def test_two_sockets_for_one_role_are_refused() -> None:
    first, second = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    with pytest.raises(ValueError, match="second socket for 'ingest'"):
        PassedSockets.from_fds([ListenFd(first.detach(), "ingest"), ListenFd(second.detach(), "unknown")])


# --- $NOTIFY_SOCKET


def test_a_leading_at_names_an_abstract_socket() -> None:
    assert notify_address("@/org/freedesktop/systemd1/notify/123") == b"\0/org/freedesktop/systemd1/notify/123"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"


@pytest.mark.parametrize("abstract", [True, False])
def test_notify_sends_one_datagram_of_assignments(tmp_path: Path, abstract: bool) -> None:
    name = f"ccos-test-{uuid.uuid4().hex}"
    address = f"@{name}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(f"\0{name}" if abstract else address)
        manager.settimeout(5)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
        try:
            assert notifier.enabled
            assert notifier.notify(READY=1, STATUS="ready: 0 entries")
            assert manager.recv(4096) == b"READY=1\nSTATUS=ready: 0 entries\n"
        finally:
            notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False


def test_a_gone_manager_is_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.notify(WATCHDOG=1) is False
    notifier.close()


# --- $WATCHDOG_USEC


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "200000"}, 0.2),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    pid = os.getpid()
    environ = {k: v.format(pid=pid, other=pid + 1) for k, v in environ.items()}
    assert watchdog_interval(environ) == expected
