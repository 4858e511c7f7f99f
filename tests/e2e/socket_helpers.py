"""Helpers for talking to the daemon's socket byte for byte, and for checking its answers.

``RawConnection`` sends exactly the bytes a test gives it (malformed JSON, invalid
UTF-8, half lines) and reads answers line by line; ``ccos_obsd.client.Client`` is
for well-formed traffic. Nothing here sleeps to synchronise: waits poll a
condition until a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.daemon import DaemonProcess
from tests.waiting import wait_for

ANSWER_TIMEOUT_S = 10.0
APPEND_FIELDS = {"ok", "seq", "action_id", "leaf_hash", "chain_hash", "duplicate"}
ZERO_HASH = bytes(32)


class RawConnection:
    """One Unix-socket connection that sends raw bytes and reads NDJSON answers."""

    def __init__(self, path: Path | socket.socket, timeout: float = ANSWER_TIMEOUT_S) -> None:
        """Connect to ``path``, or take over a socket connected already (see ``connect_as``)."""
        if isinstance(path, socket.socket):
            self.sock = path
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
            except OSError:
                self.sock.close()
                raise
        self.sock.settimeout(timeout)
        self._file = self.sock.makefile("rb")

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_line(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def read_line(self) -> bytes:
        """The next raw answer line, or b"" when the daemon closed the connection."""
        return self._file.readline()

    def answer(self) -> dict[str, Any]:
        line = self.read_line()
        if not line:
            raise ConnectionError("the daemon closed the connection")
        assert line.endswith(b"\n"), line
        answer: dict[str, Any] = json.loads(line)
        return answer

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send_line(json.dumps(request).encode("utf-8"))
        return self.answer()

    def roundtrip(self, line: bytes) -> dict[str, Any]:
        self.send_line(line)
        return self.answer()

    def ping(self) -> int:
        answer = self.request({"op": "ping"})
        assert answer["ok"] is True, answer
        head: int = answer["head"]
        return head


def connect_as(path: Path, uid: int, gid: int, groups: tuple[int, ...] = ()) -> RawConnection:
    """A connection the daemon sees as made by ``uid``, ``gid`` and supplementary ``groups`` (needs root).

    A forked child takes those ids, connects, hands the connected socket back over
    SCM_RIGHTS and exits. The kernel records a peer's credentials at connect()
    (SO_PEERCRED, SO_PEERGROUPS), so every request this process then sends on it
    comes from that uid, and the connection can stay open across a reload.
    """
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() in a process with threads; the child only
        # makes system calls and leaves with os._exit, so no lock it could inherit is used.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([gid, *groups])
            os.setgid(gid)
            os.setuid(uid)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(path))
            socket.send_fds(child_end, [b"s"], [conn.fileno()])
            code = 0
        finally:
            os._exit(code)
    child_end.close()
    with parent_end:
        _, fds, _, _ = socket.recv_fds(parent_end, 1, 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and len(fds) == 1, f"uid {uid} could not connect to {path}"
    return RawConnection(socket.socket(fileno=fds[0]))


def unique(prefix: str) -> str:
    """A name no other test uses, so tests can share one daemon."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def canonical(value: Any) -> bytes:
    """DESIGN.md's canonical JSON, written independently of the daemon's encoder."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")).encode(
        "utf-8"
    )


def leaf_hash(entry_bytes: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry_bytes).digest()


def chain_hash(previous: bytes, leaf: bytes) -> bytes:
    return hashlib.sha256(previous + leaf).digest()


def assert_error(answer: dict[str, Any], code: str, field: str | None = None) -> None:
    """A structured error answer: {ok: false, error: {code, message, field?}} (+ id)."""
    assert answer.get("ok") is False, answer
    assert set(answer) <= {"id", "ok", "error"}, answer
    error = answer["error"]
    assert error["code"] == code, answer
    assert isinstance(error["message"], str) and error["message"], answer
    assert set(error) <= {"code", "message", "field"}, answer
    if field is not None:
        assert error.get("field") == field, answer


def assert_appended(answer: dict[str, Any], seq: int | None = None) -> None:
    assert answer.get("ok") is True, answer
    assert set(answer) - {"id"} == APPEND_FIELDS, answer
    assert answer["duplicate"] is False, answer
    if seq is not None:
        assert answer["seq"] == seq, answer


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    wait_for(condition, what, timeout, poll=0.01)


def metric_value(daemon: DaemonProcess, name: str) -> float:
    """The value of an unlabelled sample in /metrics."""
    for line in daemon.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for_open_connections(daemon: DaemonProcess, count: int, timeout: float = 10.0) -> None:
    """Wait until the daemon itself counts ``count`` open socket connections."""
    wait_until(lambda: metric_value(daemon, "ccos_connections_open") == count, timeout,
               f"ccos_connections_open == {count}")


class BackgroundSender:
    """Send bytes from a thread while the test reads answers (neither side can stall)."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(sock, data), daemon=True)
        self._thread.start()

    def _run(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except BaseException as exc:  # noqa: BLE001 - re-raised by join() in the test thread
            self.error = exc

    def join(self, timeout: float = ANSWER_TIMEOUT_S) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "sending did not finish"
        if self.error is not None:
            raise self.error
