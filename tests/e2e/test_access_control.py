"""Who may use the socket: ``socket.allowed_uids`` and ``socket.allowed_gids``.

The daemon runs as root (as the tests do, in CI); clients run as other users
through ``socat`` started with another uid, primary gid and supplementary groups
(the kernel reports them to the daemon with SO_PEERCRED and SO_PEERGROUPS). The
socket lives in a world-traversable directory, mode 0660, group ``nogroup`` (gid
65534), so every test client can open it: the allow-lists admit or refuse it.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.socket_helpers import assert_appended, assert_error

NOBODY = 65534
SOCKET_GID = NOBODY
ALLOWED_UID = 4000
ALLOWED_GID = 4242
OTHER_UID = 4001

def start_daemon(state_dir: Path, socket_dir: Path, env: dict[str, str]) -> DaemonProcess:
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_SOCKET_GROUP": grp.getgrgid(SOCKET_GID).gr_name, **env})
    daemon.socket_path = socket_dir / f"{state_dir.name}.sock"
    return daemon.start()


@pytest.fixture(scope="module")
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ccos-sock-") as directory:
        os.chmod(directory, 0o755)  # noqa: S103 - other users must reach the socket inside
        yield Path(directory)


@pytest.fixture(scope="module")
def restricted(socket_dir: Path) -> Iterator[DaemonProcess]:
    """A daemon serving uid ALLOWED_UID and members of group ALLOWED_GID only."""
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        daemon = start_daemon(Path(directory), socket_dir, {
            "CCOS_OBSD_SOCKET_ALLOWED_UIDS": str(ALLOWED_UID),
            "CCOS_OBSD_SOCKET_ALLOWED_GIDS": str(ALLOWED_GID),
        })
        try:
            yield daemon
        finally:
            assert daemon.stop() == 0


def send_as(
    daemon: DaemonProcess, requests: list[Any], *, uid: int, gid: int, groups: tuple[int, ...] = ()
) -> list[dict[str, Any]]:
    """Send one line per request (a str is sent as is) from a process with these ids; the answers."""
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)
    result = subprocess.run(
        ["socat", "-t", "30", "-", f"UNIX-CONNECT:{daemon.socket_path}"],
        input=lines.encode(), capture_output=True, timeout=60, check=False,
        user=uid, group=gid, extra_groups=[SOCKET_GID, *groups],
    )
    assert result.returncode == 0, result.stderr.decode()
    answers = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(answers) == len(requests), answers
    return answers


def head(daemon: DaemonProcess) -> int:
    with daemon.client() as client:
        size: int = client.ping()
    return size


def peer_forbidden_lines(daemon: DaemonProcess) -> list[dict[str, Any]]:
    with daemon.client() as client:
        answer = client.request({"op": "logs", "n": 256})
    assert answer["ok"] is True, answer
    return [line for line in answer["lines"] if line.get("event") == "peer_forbidden"]


def forbidden_requests(daemon: DaemonProcess, op: str) -> float:
    for line in daemon.metrics().splitlines():
        if line.startswith(f'ccos_ingest_requests_total{{op="{op}",result="forbidden"}} '):
            return float(line.split()[1])
    return 0.0


ACTION = {"action_type": "PlanStarted", "plan_id": "p-access"}


def test_a_peer_outside_the_lists_is_refused_every_request_and_appends_nothing(restricted: DaemonProcess) -> None:
    before = head(restricted)
    appends_before = forbidden_requests(restricted, "append")
    requests: list[Any] = [
        {"id": 1, "op": "ping"},
        {"id": 2, **ACTION},
        {"id": "three", "op": "append", "action": ACTION},
        {"op": "append_batch", "actions": [ACTION, ACTION]},
        {"id": 5, "op": "query", "plan_id": "p-access"},
        {"id": 6, "op": "get", "seq": 0},
        {"id": 7, "op": "rotate_key"},
        {"id": 8, "op": "no_such_op"},
        "not json",
    ]
    answers = send_as(restricted, requests, uid=NOBODY, gid=NOBODY)
    for request, answer in zip(requests, answers, strict=True):
        assert_error(answer, "forbidden")
        assert f"uid {NOBODY}" in answer["error"]["message"], answer
        if isinstance(request, dict) and "id" in request:
            assert answer["id"] == request["id"], answer
        else:
            assert "id" not in answer, answer
    assert head(restricted) == before
    assert forbidden_requests(restricted, "append") == appends_before + 2


def test_a_listed_uid_is_served_and_stamped(restricted: DaemonProcess) -> None:
    (answer,) = send_as(restricted, [ACTION], uid=ALLOWED_UID, gid=NOBODY)
    assert_appended(answer)
    with restricted.client() as client:
        record = client.request({"op": "get", "seq": answer["seq"]})["record"]
    assert record["entry"]["peer"]["uid"] == ALLOWED_UID
    assert record["entry"]["peer"]["gid"] == NOBODY


def test_a_supplementary_group_in_the_list_is_served(restricted: DaemonProcess) -> None:
    (answer,) = send_as(restricted, [ACTION], uid=NOBODY, gid=NOBODY, groups=(ALLOWED_GID,))
    assert_appended(answer)


def test_a_primary_group_in_the_list_is_served(restricted: DaemonProcess) -> None:
    (answer,) = send_as(restricted, [{"op": "ping"}], uid=NOBODY, gid=ALLOWED_GID)
    assert answer["ok"] is True, answer


def test_root_is_always_served(restricted: DaemonProcess) -> None:
    with restricted.client() as client:
        assert client.append(ACTION)["ok"] is True


def test_a_refused_uid_is_logged_once(restricted: DaemonProcess) -> None:
    for _ in range(3):
        send_as(restricted, [{"op": "ping"}] * 5, uid=OTHER_UID, gid=NOBODY)
    send_as(restricted, [{"op": "ping"}], uid=NOBODY, gid=NOBODY)
    lines = peer_forbidden_lines(restricted)
    other = [line for line in lines if line["uid"] == OTHER_UID]
    assert len(other) == 1, lines
    assert other[0]["gid"] == NOBODY and isinstance(other[0]["pid"], int), other
    assert len([line for line in lines if line["uid"] == NOBODY]) == 1, lines


def test_with_both_lists_empty_nobody_is_refused(socket_dir: Path, state_dir: Path) -> None:
    daemon = start_daemon(state_dir, socket_dir, {})
    try:
        answers = send_as(daemon, [ACTION, {"op": "ping"}], uid=OTHER_UID, gid=NOBODY)
        assert_appended(answers[0], seq=0)
        assert answers[1] == {"ok": True, "head": 1}
        assert peer_forbidden_lines(daemon) == []
    finally:
        assert daemon.stop() == 0


def test_a_socket_backup_by_another_user_leaves_the_key_out_of_its_reach(socket_dir: Path, state_dir: Path) -> None:
    """The peer cannot read the state dir (0700, root); the daemon writes the copy as itself."""
    daemon = start_daemon(state_dir, socket_dir, {"CCOS_OBSD_BACKUP_ALLOW_SOCKET": "true"})
    with tempfile.TemporaryDirectory(prefix="ccos-dest-") as parent:
        os.chmod(parent, 0o1777)  # noqa: S103 - like /tmp: the peer may name a new directory here
        dest = Path(parent) / "copy"
        try:
            (appended, answer) = send_as(daemon, [ACTION, {"op": "backup", "dest": str(dest)}],
                                         uid=OTHER_UID, gid=NOBODY)
        finally:
            assert daemon.stop() == 0
        assert_appended(appended, seq=0)
        assert answer["ok"] is True and answer["entries"] == 1, answer
        key = dest / "signing.key"
        assert key.stat().st_uid == os.geteuid() and stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(dest.stat().st_mode) == 0o700
        read = subprocess.run(["cat", str(key)], capture_output=True, check=False,
                              user=OTHER_UID, group=NOBODY, extra_groups=[])
        assert read.returncode != 0 and read.stdout == b""


def test_only_root_or_the_daemon_user_may_rotate_the_key(socket_dir: Path, state_dir: Path) -> None:
    daemon = start_daemon(state_dir, socket_dir, {})
    try:
        [refused] = send_as(daemon, [{"op": "rotate_key"}], uid=OTHER_UID, gid=NOBODY)
        assert_error(refused, "forbidden")
        assert head(daemon) == 0  # no KeyRotated entry
        with daemon.client() as client:
            rotated = client.request({"op": "rotate_key"})  # this test runs as root
        assert rotated["ok"] is True and rotated["seq"] == 0
    finally:
        assert daemon.stop() == 0
