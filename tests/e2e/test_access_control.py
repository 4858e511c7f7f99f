"""Roles on the socket: who may write, read and administer, as other uids.

The daemon runs as root (as the tests do, in CI) unless a test says otherwise.
Clients of other uids are connections made by a forked child that takes that uid,
primary gid and supplementary groups (``socket_helpers.connect_as``): the kernel
reports them to the daemon with SO_PEERCRED and SO_PEERGROUPS. The socket lives in
a world-traversable directory, mode 0660, group ``nogroup`` (gid 65534), which
every test client joins, so every client can open it: the role lists decide.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ccos_obsd.ops import TABLE
from tests.daemon import DaemonProcess
from tests.e2e.socket_helpers import RawConnection, assert_appended, assert_error, connect_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="connects as other uids: needs root")

NOBODY = 65534
SOCKET_GID = NOBODY
WRITER = 4000
READER = 4001
ADMIN = 4002
STRANGER = 4003
READ_GID = 4242
ADMIN_GID = 4343
DAEMON_UID = 4100
"""The daemon's own uid in the test that runs it as a user other than root."""

ACTION = {"action_type": "PlanStarted", "plan_id": "p-access"}
WRITES: dict[str, Any] = {
    "append": {"op": "append", "action": ACTION},
    "append_batch": {"op": "append_batch", "actions": [ACTION, ACTION]},
    "call": {"op": "call", "capability": "observability.ingestor:v1.ingest",
             "args": ["single", {"summary": "from an agent"}]},
}
READS: dict[str, Any] = {
    "ping": {"op": "ping"},
    "get": {"op": "get", "seq": 0},
    "query": {"op": "query", "plan_id": "p-access"},
    "stats": {"op": "stats"},
    "logs": {"op": "logs", "n": 5},
    "wm_search": {"op": "wm_search", "text": "agent"},
    "wm_digest": {"op": "wm_digest"},
    "prove_inclusion": {"op": "prove_inclusion", "seq": 0},
    "prove_consistency": {"op": "prove_consistency", "size1": 1},
    "checkpoint": {"op": "checkpoint"},
}
BACKUP_PARENT = Path(tempfile.gettempdir())


def admin_requests(dest: Path) -> dict[str, Any]:
    return {
        "rotate_key": {"op": "rotate_key"},
        "backup": {"op": "backup", "dest": str(dest)},
        "replay": {"op": "replay"},
        "replay_status": {"op": "replay_status"},
    }


def test_the_requests_here_cover_every_op_with_its_role() -> None:
    roles = {**dict.fromkeys(WRITES, "write"), **dict.fromkeys(READS, "read"),
             **dict.fromkeys(admin_requests(BACKUP_PARENT), "admin")}
    assert roles == {name: op.role for name, op in TABLE.items()}


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
def roles(socket_dir: Path) -> Iterator[DaemonProcess]:
    """A daemon with one uid per role, a group for read and one for admin, and backups over the socket on."""
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        daemon = start_daemon(Path(directory), socket_dir, {
            "CCOS_OBSD_SOCKET_ALLOWED_UIDS": str(WRITER),
            "CCOS_OBSD_SOCKET_READ_UIDS": str(READER),
            "CCOS_OBSD_SOCKET_READ_GIDS": str(READ_GID),
            "CCOS_OBSD_SOCKET_ADMIN_UIDS": str(ADMIN),
            "CCOS_OBSD_SOCKET_ADMIN_GIDS": str(ADMIN_GID),
            "CCOS_OBSD_BACKUP_ALLOW_SOCKET": "true",
        })
        try:
            with daemon.client() as client:
                assert_appended(client.append(ACTION), seq=0)  # something to read and prove
            yield daemon
        finally:
            assert daemon.stop() == 0


def peer(daemon: DaemonProcess, uid: int, gid: int = NOBODY, groups: tuple[int, ...] = ()) -> RawConnection:
    return connect_as(daemon.socket_path, uid, gid, (SOCKET_GID, *groups))


def head(daemon: DaemonProcess) -> int:
    with daemon.client() as client:
        size: int = client.ping()
    return size


def forbidden_requests(daemon: DaemonProcess, op: str) -> float:
    for line in daemon.metrics().splitlines():
        if line.startswith(f'ccos_ingest_requests_total{{op="{op}",result="forbidden"}} '):
            return float(line.split()[1])
    return 0.0


def peer_forbidden_lines(daemon: DaemonProcess) -> list[dict[str, Any]]:
    with daemon.client() as client:
        answer = client.request({"op": "logs", "n": 256})
    assert answer["ok"] is True, answer
    return [line for line in answer["lines"] if line.get("event") == "peer_forbidden"]


def assert_forbidden(answer: dict[str, Any], uid: int, op: str, role: str, keys: str) -> None:
    assert_error(answer, "forbidden")
    assert answer["error"]["message"] == f"uid {uid} does not have the {role} role that op {op!r} needs ({keys})"


READ_KEYS = "socket.read_uids, socket.read_gids"
WRITE_KEYS = "socket.allowed_uids, socket.allowed_gids"
ADMIN_KEYS = "socket.admin_uids, socket.admin_gids"


def assert_served(answer: dict[str, Any]) -> None:
    assert answer.get("ok") is True, answer


# --- one uid per role


def test_a_writer_only_uid_appends_and_is_forbidden_every_read_and_admin_op(roles: DaemonProcess) -> None:
    dest = BACKUP_PARENT / f"ccos-refused-backup-{os.getpid()}"
    before, queries_refused = head(roles), forbidden_requests(roles, "query")
    with peer(roles, WRITER) as writer:
        for ident, (op, request) in enumerate({**READS, **admin_requests(dest)}.items()):
            answer = writer.request({"id": ident, **request})
            role = "read" if op in READS else "admin"
            assert_forbidden(answer, WRITER, op, role, READ_KEYS if role == "read" else ADMIN_KEYS)
            assert answer["id"] == ident
        # The ingestor's replay mode rebuilds Working Memory: the replay op's admin work, not a write.
        answer = writer.request({"id": "rebuild", "op": "call", "capability": "observability.ingestor:v1.ingest",
                                 "args": ["replay"]})
        assert_forbidden(answer, WRITER, "call", "admin", ADMIN_KEYS)
        assert head(roles) == before  # no KeyRotated entry, nothing replayed into the ledger
        assert not dest.exists()
        # The same connection still writes: every write op, and a bare action line.
        for request in WRITES.values():
            assert_served(writer.request(request))
        assert_appended(writer.request({"id": "bare", **ACTION}))
    assert head(roles) == before + 1 + 2 + 2 + 1  # append, a batch of two, the call and its result, the bare line
    assert forbidden_requests(roles, "query") == queries_refused + 1
    with roles.client() as client:
        entry = client.get(seq=before)["entry"]
    assert entry["peer"]["uid"] == WRITER and entry["peer"]["gid"] == NOBODY


def test_a_reader_reads_everything_but_may_not_write_or_administer(roles: DaemonProcess) -> None:
    before = head(roles)
    with peer(roles, READER) as reader:
        for request in READS.values():
            assert_served(reader.request(request))
        for op, request in WRITES.items():
            assert_forbidden(reader.request(request), READER, op, "write", WRITE_KEYS)
        assert_forbidden(reader.roundtrip(b'{"id":9,"action_type":"PlanStarted"}'), READER, "append", "write",
                         WRITE_KEYS)
        assert_forbidden(reader.request({"op": "rotate_key"}), READER, "rotate_key", "admin", ADMIN_KEYS)
        assert reader.ping() == before


def test_the_read_role_comes_from_a_supplementary_or_the_primary_group(roles: DaemonProcess) -> None:
    with peer(roles, STRANGER, groups=(READ_GID,)) as supplementary:
        assert_served(supplementary.request(READS["query"]))
    with peer(roles, STRANGER, gid=READ_GID) as primary:
        assert_served(primary.request(READS["get"]))
        assert_forbidden(primary.request(WRITES["append"]), STRANGER, "append", "write", WRITE_KEYS)


def test_an_admin_uid_rotates_the_key_but_neither_reads_nor_writes(roles: DaemonProcess) -> None:
    before = head(roles)
    with peer(roles, ADMIN) as admin:
        rotated = admin.request({"op": "rotate_key"})
        assert_served(rotated)
        assert rotated["seq"] == before and rotated["vkey"]
        assert_served(admin.request({"op": "replay_status"}))
        assert_forbidden(admin.request(READS["query"]), ADMIN, "query", "read", READ_KEYS)
        assert_forbidden(admin.request(WRITES["append"]), ADMIN, "append", "write", WRITE_KEYS)
    with roles.client() as client:
        entry = client.get(seq=before)["entry"]
    assert entry["action_type"] == "KeyRotated" and entry["peer"]["uid"] == ADMIN


def test_an_admin_group_member_backs_up_the_state_dir_out_of_its_own_reach(roles: DaemonProcess) -> None:
    """The peer cannot read the state dir (0700, root); the daemon writes the copy as itself."""
    with tempfile.TemporaryDirectory(prefix="ccos-dest-") as parent:
        os.chmod(parent, 0o1777)  # noqa: S103 - like /tmp: the peer may name a new directory here
        dest = Path(parent) / "copy"
        with peer(roles, STRANGER, groups=(ADMIN_GID,)) as admin:
            answer = admin.request({"op": "backup", "dest": str(dest)})
        assert_served(answer)
        assert answer["entries"] == head(roles)
        key = dest / "signing.key"
        assert key.stat().st_uid == os.geteuid() and stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(dest.stat().st_mode) == 0o700
        read = subprocess.run(["cat", str(key)], capture_output=True, check=False,
                              user=STRANGER, group=NOBODY, extra_groups=[ADMIN_GID])
        assert read.returncode != 0 and read.stdout == b""


def test_root_holds_every_role_whatever_the_lists(roles: DaemonProcess) -> None:
    with roles.client() as client:
        for request in (*WRITES.values(), *READS.values(), {"op": "replay_status"}):
            assert_served(client.request(request))


def test_a_uid_in_no_list_is_told_which_role_it_lacks_and_logged_once_per_role(roles: DaemonProcess) -> None:
    stranger = STRANGER + 100
    for _ in range(3):
        with peer(roles, stranger) as connection:
            assert_forbidden(connection.request(READS["ping"]), stranger, "ping", "read", READ_KEYS)
            assert_forbidden(connection.request(READS["logs"]), stranger, "logs", "read", READ_KEYS)
            assert_forbidden(connection.request(WRITES["append"]), stranger, "append", "write", WRITE_KEYS)
            # Lines that are no request are answered as such: they do nothing and reveal nothing.
            assert_error(connection.roundtrip(b"not json"), "bad_json")
            assert_error(connection.roundtrip(b'{"op":"no_such_op"}'), "unknown_op", "op")
    lines = [line for line in peer_forbidden_lines(roles) if line["uid"] == stranger]
    assert sorted((line["role"], line["op"]) for line in lines) == [("read", "ping"), ("write", "append")], lines
    assert all(line["gid"] == NOBODY and isinstance(line["pid"], int) for line in lines), lines


# --- the defaults


def test_by_default_anyone_who_can_open_the_socket_writes_but_only_root_reads(
    socket_dir: Path, state_dir: Path
) -> None:
    daemon = start_daemon(state_dir, socket_dir, {"CCOS_OBSD_BACKUP_ALLOW_SOCKET": "true"})
    try:
        with peer(daemon, STRANGER) as agent:
            assert_appended(agent.request(WRITES["append"]), seq=0)
            assert_forbidden(agent.request(READS["query"]), STRANGER, "query", "read", READ_KEYS)
            assert_forbidden(agent.request(READS["ping"]), STRANGER, "ping", "read", READ_KEYS)
            assert_forbidden(agent.request({"op": "rotate_key"}), STRANGER, "rotate_key", "admin", ADMIN_KEYS)
        with daemon.client() as client:
            assert client.query(plan_id="p-access")[0]["entry"]["peer"]["uid"] == STRANGER
    finally:
        assert daemon.stop() == 0


# --- reload


def test_a_reload_gives_and_takes_the_read_role_on_a_connection_already_open(
    socket_dir: Path, state_dir: Path
) -> None:
    config = state_dir / "ccos-obsd.toml"
    config.write_text("[socket]\nread_uids = []\n", encoding="utf-8")
    daemon = DaemonProcess(state_dir, "--config", str(config),
                           env={"CCOS_OBSD_SOCKET_GROUP": grp.getgrgid(SOCKET_GID).gr_name})
    daemon.socket_path = socket_dir / f"{state_dir.name}.sock"
    daemon.start()
    try:
        with peer(daemon, STRANGER) as connection:
            assert_forbidden(connection.request(READS["ping"]), STRANGER, "ping", "read", READ_KEYS)
            for lists, served in ((f"read_uids = [{STRANGER}]", True), ("read_uids = []", False)):
                config.write_text(f"[socket]\n{lists}\n", encoding="utf-8")
                daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                assert daemon.wait_for_event("config_reloaded")["changed"] == ["socket.read_uids"]
                answer = connection.request(READS["ping"])
                if served:
                    assert answer == {"ok": True, "head": 0}
                else:
                    assert_forbidden(answer, STRANGER, "ping", "read", READ_KEYS)
    finally:
        assert daemon.stop() == 0


# --- the daemon as an ordinary user, as under `make run`


def as_user(uid: int, *groups: int) -> list[str]:
    """A command prefix: run the rest as ``uid`` (primary group ``uid``) with these supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]


class OwnUserDaemon(DaemonProcess):
    def command(self) -> list[str]:
        return [*as_user(DAEMON_UID, SOCKET_GID), *super().command()]


@pytest.fixture
def own_user_daemon() -> Iterator[DaemonProcess]:
    """A daemon running as DAEMON_UID on its own state dir (0710, group nogroup: the socket inside is reachable)."""
    # The daemon starts child processes (sink host, renderer) with the same interpreter.
    spawn = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import ccos_obsd'], check=True)"
    probe = subprocess.run([*as_user(DAEMON_UID), sys.executable, "-c", spawn],
                           capture_output=True, check=False, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"uid {DAEMON_UID} cannot run {sys.executable} (it lives where other users cannot read)")
    with tempfile.TemporaryDirectory(prefix="ccos-own-") as directory:
        state_dir = Path(directory)
        os.chown(state_dir, DAEMON_UID, SOCKET_GID)
        os.chmod(state_dir, 0o710)  # noqa: S103 - search only, for the socket inside: the documented layout
        daemon = OwnUserDaemon(state_dir, env={"CCOS_OBSD_SOCKET_GROUP": grp.getgrgid(SOCKET_GID).gr_name,
                                               "CCOS_OBSD_BACKUP_ALLOW_SOCKET": "true"})
        daemon.popen_options = {"cwd": "/"}
        daemon.start()
        try:
            yield daemon
        finally:
            assert daemon.stop() == 0


def cli_as_daemon_user(daemon: DaemonProcess, *args: str, input: bytes | None = None) -> str:
    result = subprocess.run(
        [*as_user(DAEMON_UID), sys.executable, "-m", "ccos_obsd", *args, "--socket", str(daemon.socket_path)],
        input=input, capture_output=True, timeout=120, check=False, cwd="/",
    )
    assert result.returncode == 0, (args, result.stderr.decode())
    return result.stdout.decode()


def test_the_daemons_own_user_holds_every_role_and_its_tools_work(own_user_daemon: DaemonProcess) -> None:
    daemon = own_user_daemon
    sent = cli_as_daemon_user(daemon, "send", input=b'{"action_type":"PlanStarted","plan_id":"own"}\n')
    assert json.loads(sent)["seq"] == 0
    cli_as_daemon_user(daemon, "demo", "--rate", "50", "--duration", "0.2")
    (record,) = [json.loads(line) for line in cli_as_daemon_user(daemon, "query", "--plan-id", "own").splitlines()]
    assert record["entry"]["peer"]["uid"] == DAEMON_UID
    for command in (["stats"], ["logs", "-n", "3"], ["wm", "digest"], ["prove", "--seq", "0"],
                    ["keys", "rotate"], ["replay"]):
        cli_as_daemon_user(daemon, *command)
    with tempfile.TemporaryDirectory(prefix="ccos-dest-") as parent:
        os.chown(parent, DAEMON_UID, DAEMON_UID)
        cli_as_daemon_user(daemon, "backup", str(Path(parent) / "copy"))
        assert (Path(parent) / "copy" / "ledger.db").stat().st_uid == DAEMON_UID
    # Another user who can open the socket writes, and reads nothing.
    with peer(daemon, STRANGER) as agent:
        assert_served(agent.request(WRITES["append"]))
        assert_forbidden(agent.request(READS["query"]), STRANGER, "query", "read", READ_KEYS)
