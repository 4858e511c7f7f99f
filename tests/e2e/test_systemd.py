"""Running under systemd: the shipped units, socket activation, sd_notify, the watchdog, reload.

systemd is not PID 1 where the tests run, so each part is checked with the tool
systemd itself provides for it: ``systemd-analyze verify`` and ``security
--offline`` for the units, ``systemd-sysusers --root`` for the users,
``systemd-socket-activate`` to pass sockets the way a .socket unit does, a
datagram socket of the test's own as ``$NOTIFY_SOCKET``, and the seccomp filter
of ``MemoryDenyWriteExecute=`` (``wx_guard.py``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ccos_obsd.client import Client
from ccos_obsd.config import load_config
from ccos_obsd.daemon import DRAIN_TIMEOUT_S, SINK_CATCH_UP_S, STATUS_INTERVAL_S
from ccos_obsd.sinks.host import STOP_GRACE_S
from tests.daemon import DaemonProcess, run_cli

ROOT = Path(__file__).resolve().parents[2]
UNITS_DIR = ROOT / "systemd"
SERVICE = UNITS_DIR / "ccos-obsd.service"
INGEST_SOCKET = UNITS_DIR / "ccos-obsd.socket"
HTTP_SOCKET = UNITS_DIR / "ccos-obsd-http.socket"
UNITS = (SERVICE, INGEST_SOCKET, HTTP_SOCKET)
SHIPPED_CONFIG = UNITS_DIR / "ccos-obsd.toml"
SYSUSERS = UNITS_DIR / "sysusers.d" / "ccos-obsd.conf"
WX_GUARD = Path(__file__).with_name("wx_guard.py")
TOOL_TIMEOUT_S = 60
NOTIFY_TIMEOUT_S = 20.0

ACTION = {"action_type": "CapabilityCall", "function_name": "web.search", "duration_ms": 5, "success": True}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key -> [values]`` of a unit file (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def setting(path: Path, key: str) -> str:
    values = unit_settings(path)[key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def exec_start(path: Path = SERVICE) -> list[str]:
    return shlex.split(setting(path, "Service.ExecStart"))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --- the unit files


def installed_copy(directory: Path) -> list[Path]:
    """The units as installed, with ExecStart's program where this checkout installed it.

    ``verify`` requires ExecStart's program to exist; every other byte is the shipped unit's.
    """
    program = Path(sys.executable).with_name("ccos-obsd")
    assert program.exists(), program
    shipped = exec_start()[0]
    copies = []
    for unit in UNITS:
        text = unit.read_text()
        if unit == SERVICE:
            assert text.count(f"ExecStart={shipped} ") == 1
            text = text.replace(f"ExecStart={shipped} ", f"ExecStart={program} ")
        copy = directory / unit.name
        copy.write_text(text)
        copies.append(copy)
    return copies


def analyze_verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--recursive-errors=yes", "--man=no", *map(str, units)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    result = analyze_verify(installed_copy(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "verify printed warnings"


def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a misspelt setting in the same units is reported.
    units = installed_copy(tmp_path)
    service = units[0]
    service.write_text(service.read_text().replace("ProtectHome=yes", "ProtectHomme=yes"))
    result = analyze_verify(units)
    assert result.returncode != 0
    assert "ProtectHomme" in result.stderr


def test_service_exposure_is_2_or_better() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager", str(SERVICE)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )
    found = re.search(r"Overall exposure level for ccos-obsd\.service: (\d+\.\d+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_is_a_notify_service_with_watchdog_reload_and_sandbox() -> None:
    service = unit_settings(SERVICE)
    one = {key: values[-1] for key, values in service.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    assert one["Service.WatchdogSec"] == "30s"
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.User"] == "ccos-obsd"
    assert one["Service.StateDirectory"] == "ccos-obsd"
    assert one["Service.StateDirectoryMode"] == "0700"
    assert one["Service.UMask"] == "0077"
    # Stopping drains connections, lets sinks catch up, then commits and checkpoints.
    stop_s = int(one["Service.TimeoutStopSec"].removesuffix("s"))
    assert stop_s > DRAIN_TIMEOUT_S + SINK_CATCH_UP_S + STOP_GRACE_S
    for key in ("MemoryDenyWriteExecute", "NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock",
                "ProtectHostname", "ProtectControlGroups", "RestrictNamespaces", "RestrictRealtime",
                "RestrictSUIDSGID", "LockPersonality", "RemoveIPC"):
        assert one[f"Service.{key}"] == "yes", key
    assert one["Service.ProtectSystem"] == "strict"
    assert one["Service.ProtectProc"] == "invisible"
    assert one["Service.CapabilityBoundingSet"] == ""
    assert service["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # A RuntimeDirectory= of the service would be removed at each stop, with the socket
    # unit's socket file in it; peers seen through PrivateUsers= would all be "nobody".
    assert "Service.RuntimeDirectory" not in service
    assert "Service.PrivateUsers" not in service
    assert "Service.ProcSubset" not in service


def test_sockets_are_named_for_the_daemon_and_owned_by_the_writers_group() -> None:
    ingest = {key: values[-1] for key, values in unit_settings(INGEST_SOCKET).items()}
    assert ingest["Socket.FileDescriptorName"] == "ingest"
    assert ingest["Socket.SocketMode"] == "0660"
    assert ingest["Socket.SocketUser"] == "ccos-obsd"
    assert ingest["Socket.SocketGroup"] == "ccos-writers"
    assert ingest["Socket.Service"] == "ccos-obsd.service"
    http = {key: values[-1] for key, values in unit_settings(HTTP_SOCKET).items()}
    assert http["Socket.FileDescriptorName"] == "http"
    assert http["Socket.Service"] == "ccos-obsd.service"
    assert setting(SERVICE, "Service.Sockets").split() == [INGEST_SOCKET.name, HTTP_SOCKET.name]


def test_units_and_shipped_config_name_the_same_places() -> None:
    config = load_config(SHIPPED_CONFIG, environ={})
    argv = exec_start()
    assert flag(argv, "--config") == "/etc/ccos-obsd/ccos-obsd.toml"
    assert flag(argv, "--state-dir") == f"/var/lib/{setting(SERVICE, 'Service.StateDirectory')}"
    assert str(config.state_dir) == flag(argv, "--state-dir")
    assert str(config.socket.path) == setting(INGEST_SOCKET, "Socket.ListenStream")
    assert f"{config.http.host}:{config.http.port}" == setting(HTTP_SOCKET, "Socket.ListenStream")


def test_sysusers_creates_the_daemon_user_and_the_writers_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
                            capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert {"ccos-obsd", "ccos-writers"} <= groups.keys()
    _name, _, uid, gid, _, home, shell = users["ccos-obsd"]
    assert gid == groups["ccos-obsd"][2]
    assert int(uid) < 1000, "a system user"
    assert home == "/var/lib/ccos-obsd"
    assert shell.endswith("nologin")


def test_daemon_runs_under_memory_deny_write_execute(state_dir: Path) -> None:
    control = subprocess.run(
        [sys.executable, str(WX_GUARD), sys.executable, "-c",
         "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )
    assert control.returncode != 0 and "Operation not permitted" in control.stderr, "the filter is not active"

    class Guarded(DaemonProcess):
        def command(self) -> list[str]:
            return [sys.executable, str(WX_GUARD), *super().command()]

    daemon = Guarded(state_dir).start()
    try:
        with daemon.client() as client:
            answers = [client.append(dict(ACTION)) for _ in range(3)]
        assert [a["seq"] for a in answers] == [0, 1, 2]
        assert "ccos_ledger_entries 3.0" in daemon.metrics()
    finally:
        assert daemon.stop() == 0
    verified = run_cli("verify", "--state-dir", str(state_dir), "--quiet")
    assert verified.returncode == 0, verified.stdout + verified.stderr


# --- socket activation


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ActivatedDaemon(DaemonProcess):
    """The daemon started by ``systemd-socket-activate``, which listens first, then execs it."""

    def __init__(self, state_dir: Path, listen: list[str], fdnames: str | None, *extra: str) -> None:
        super().__init__(state_dir, *extra)
        self.listen = listen
        self.fdnames = fdnames

    def command(self) -> list[str]:
        activate = ["systemd-socket-activate"]
        for address in self.listen:
            activate += ["-l", address]
        if self.fdnames is not None:
            activate.append(f"--fdname={self.fdnames}")
        return [*activate, sys.executable, "-m", "ccos_obsd", "run", "--state-dir", str(self.state_dir),
                *self.extra_args]


def connect_when_listening(path: Path, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # polling for systemd-socket-activate's bind, with a deadline


def request_on(sock: socket.socket, line: bytes) -> bytes:
    sock.settimeout(30)
    sock.sendall(line)
    with sock.makefile("rb") as answers:
        return answers.readline()


def test_socket_activation_serves_the_passed_unix_socket_and_http_port(state_dir: Path) -> None:
    path = state_dir / "activated.sock"
    port = free_port()
    daemon = ActivatedDaemon(state_dir, [str(path), f"127.0.0.1:{port}"], "ingest:http").start(wait=False)
    try:
        # The first connection starts the daemon (as with a .socket unit): it waits in the
        # backlog and is answered once the daemon serves the passed socket.
        with connect_when_listening(path) as first:
            answer = request_on(first, b'{"op":"append","action":{"action_type":"PlanStarted","plan_id":"p1"}}\n')
        assert b'"ok":true' in answer and b'"seq":0' in answer
        ready = daemon.wait_ready()
        assert ready["socket"] == str(path)
        assert ready["http"] == f"127.0.0.1:{port}"
        passed = next(e for e in daemon.log if isinstance(e, dict) and e.get("event") == "sockets_from_systemd")
        assert passed["sockets"] == {"ingest": str(path), "http": f"127.0.0.1:{port}"}
        # The daemon bound nothing of its own.
        assert not (state_dir / "ccos-obsd.sock").exists()
        with Client(path) as client:
            assert client.append(dict(ACTION))["seq"] == 1
        assert "ccos_ledger_entries 2.0" in daemon.metrics()
    finally:
        assert daemon.stop() == 0
    # The socket belongs to the service manager: it is still there for the next start.
    assert path.exists()


def test_an_unnamed_unix_socket_is_taken_as_the_ingest_socket(state_dir: Path) -> None:
    path = state_dir / "plain.sock"
    daemon = ActivatedDaemon(state_dir, [str(path)], None, "--http", "127.0.0.1:0").start(wait=False)
    try:
        with connect_when_listening(path) as first:
            assert b'"head":0' in request_on(first, b'{"op":"ping"}\n')
        ready = daemon.wait_ready()
        assert ready["socket"] == str(path)
        assert "ccos_ledger_entries 0.0" in daemon.metrics()  # HTTP bound by the daemon itself
    finally:
        assert daemon.stop() == 0


# --- sd_notify


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float = NOTIFY_TIMEOUT_S) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.splitlines() if line)
        self.received.append(message)
        return message

    def wait_for(self, key: str, value: str | None = None, timeout: float = NOTIFY_TIMEOUT_S,
                 containing: str = "") -> dict[str, str]:
        """Messages until one sets ``key`` (to ``value``, or to a text ``containing``, when given)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {key}={value or '…'} within {timeout}s: {self.received}")
            message = self.next(remaining)
            if key in message and (value is None or message[key] == value) and containing in message[key]:
                return message

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


@contextmanager
def notify_socket(address: str) -> Iterator[NotifySocket]:
    receiver = NotifySocket(address)
    try:
        yield receiver
    finally:
        receiver.close()


def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(state_dir: Path) -> None:
    with notify_socket(str(state_dir / "notify.sock")) as manager:
        daemon = DaemonProcess(state_dir, env={"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "200000"})
        daemon.start(wait=False)
        try:
            ready = manager.wait_for("READY", "1")
            # READY=1 means "serving": the socket answers right away.
            with daemon.client() as client:
                assert client.ping() == 0
            assert ready["STATUS"].startswith("ready: 0 entries")
            daemon.wait_ready()
            with daemon.client() as client:
                client.append_batch([dict(ACTION) for _ in range(5)])
            # The watchdog pings every WATCHDOG_USEC/2 and STATUS follows the head.
            status = manager.wait_for("STATUS", containing="5 entries", timeout=STATUS_INTERVAL_S * 3)
            assert re.fullmatch(r"serving: 5 entries, \d+\.\d actions/s", status["STATUS"])
            pings = sum(1 for m in manager.received if m.get("WATCHDOG") == "1")
            while pings < 5:
                manager.wait_for("WATCHDOG", "1", timeout=2.0)
                pings += 1
            daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            stopping = manager.wait_for("STOPPING", "1")
            assert "STATUS" in stopping
        finally:
            assert daemon.stop() == 0


def test_no_watchdog_pings_when_watchdog_pid_is_another_process(state_dir: Path) -> None:
    # An abstract-namespace notify socket ("@..."), as systemd may hand out.
    with notify_socket(f"@ccos-obsd-test-{uuid.uuid4().hex}") as manager:
        env = {"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
        daemon = DaemonProcess(state_dir, env=env).start(wait=False)
        try:
            manager.wait_for("READY", "1")
            # Two status periods: a daemon that pinged would have sent about 40 pings by then.
            manager.wait_for("STATUS", timeout=STATUS_INTERVAL_S * 3)
            manager.wait_for("STATUS", timeout=STATUS_INTERVAL_S * 3)
            assert not [m for m in manager.received if "WATCHDOG" in m]
        finally:
            assert daemon.stop() == 0


# --- reload (SIGHUP)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def reload(daemon: DaemonProcess, event: str = "config_reloaded") -> dict[str, Any]:
    daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    return daemon.wait_for_event(event)


def logged_action_ids(daemon: DaemonProcess) -> set[str]:
    return {e["action_id"] for e in daemon.log if isinstance(e, dict) and "action_id" in e and "seq" in e}


def test_sighup_applies_the_log_level_and_limits_and_names_what_needs_a_restart(state_dir: Path) -> None:
    config = write_config(state_dir / "ccos-obsd.toml", '[log]\nlevel = "info"\n[socket]\nmax_batch = 2\n')
    daemon = DaemonProcess(state_dir, "--config", str(config)).start()
    try:
        with daemon.client() as client:
            client.append({**ACTION, "action_id": "at-info"})
            daemon.wait_for_event("action_appended")
            too_many = client.request({"op": "append_batch", "actions": [dict(ACTION)] * 3})
            assert too_many["ok"] is False

            write_config(config, '[log]\nlevel = "warning"\n[socket]\nmax_batch = 3\n[ledger]\nmax_group = 100\n')
            reloaded = reload(daemon)
            assert reloaded["changed"] == ["log.level", "socket.max_batch"]
            assert reloaded["restart_required"] == ["ledger.max_group"]
            client.append({**ACTION, "action_id": "at-warning"})
            assert all(a["ok"] for a in client.append_batch([dict(ACTION)] * 3))

            write_config(config, '[log]\nlevel = "info"\n[socket]\nmax_batch = 3\n[ledger]\nmax_group = 100\n')
            reloaded = reload(daemon)
            assert reloaded["changed"] == ["log.level"]
            assert reloaded["restart_required"] == ["ledger.max_group"]  # still the start-up value
            client.append({**ACTION, "action_id": "back-at-info"})
            daemon.wait_for_event("action_appended")
        # Lines are written in order: the one for the action appended at "warning" would
        # have come before the second config_reloaded line.
        assert {"at-info", "back-at-info"} <= logged_action_ids(daemon)
        assert "at-warning" not in logged_action_ids(daemon)
    finally:
        assert daemon.stop() == 0


def test_a_reload_with_an_invalid_config_keeps_the_running_one(state_dir: Path) -> None:
    config = write_config(state_dir / "ccos-obsd.toml", "[socket]\nmax_batch = 2\n")
    with notify_socket(str(state_dir / "notify.sock")) as manager:
        daemon = DaemonProcess(state_dir, "--config", str(config), env={"NOTIFY_SOCKET": manager.address}).start()
        try:
            manager.wait_for("READY", "1")
            write_config(config, '[socket]\nmax_batch = "lots"\n')
            failed = reload(daemon, "config_reload_failed")
            assert failed["key"] == "socket.max_batch"
            assert failed["level"] == "error"
            assert "RELOADING" in manager.wait_for("RELOADING", "1")
            assert "kept" in manager.wait_for("READY", "1")["STATUS"]
            with daemon.client() as client:
                assert client.append(dict(ACTION))["ok"]
                assert client.request({"op": "append_batch", "actions": [dict(ACTION)] * 3})["ok"] is False

            write_config(config, "[socket]\nmax_batch = 3\n")
            assert reload(daemon)["changed"] == ["socket.max_batch"]
            manager.wait_for("RELOADING", "1")
            manager.wait_for("READY", "1")
            with daemon.client() as client:
                assert all(a["ok"] for a in client.append_batch([dict(ACTION)] * 3))
        finally:
            assert daemon.stop() == 0


def wait_for_file_text(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path} within {timeout}s")
        time.sleep(0.02)  # polling a file another process writes, with a deadline


def test_sighup_reopens_the_jsonl_sink_file_after_logrotate(state_dir: Path) -> None:
    audit = state_dir / "audit.jsonl"
    config = write_config(state_dir / "ccos-obsd.toml",
                          f'[[sinks]]\ntype = "jsonl"\nname = "audit"\npath = "{audit}"\n')
    daemon = DaemonProcess(state_dir, "--config", str(config)).start()
    try:
        with daemon.client() as client:
            client.append({**ACTION, "action_id": "before-rotation"})
            wait_for_file_text(audit, "before-rotation")
            rotated = audit.with_name("audit.jsonl.1")
            audit.rename(rotated)  # what logrotate does, before `systemctl reload`
            assert reload(daemon)["changed"] == []
            client.append({**ACTION, "action_id": "after-rotation"})
            wait_for_file_text(audit, "after-rotation")
        assert "after-rotation" not in rotated.read_text()
        assert "before-rotation" not in audit.read_text()
    finally:
        assert daemon.stop() == 0
