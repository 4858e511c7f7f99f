"""Start, stop, restart, crash and refuse to start: the daemon's lifecycle as a process."""

from __future__ import annotations

import hashlib
import json
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import DaemonProcess, run_cli, running_daemon

RUN_TIMEOUT_S = 20.0
"""A ``run`` that should refuse to start but does not would otherwise hang the suite."""


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def sample(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


def export_records(state_dir: Path) -> list[dict[str, Any]]:
    result = run_cli("export", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def verify_ok(state_dir: Path, entries: int) -> None:
    result = run_cli("verify", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.decode().startswith("ok")
    assert f"{entries} entries" in result.stdout.decode()


def chains(previous_hex: str, answer: dict[str, Any]) -> bool:
    expected = hashlib.sha256(bytes.fromhex(previous_hex) + bytes.fromhex(answer["leaf_hash"])).hexdigest()
    return bool(answer["chain_hash"] == expected)


# --- restart


def test_restart_continues_the_chain_and_the_metrics(state_dir: Path) -> None:
    first = DaemonProcess(state_dir).start()
    try:
        with first.client() as client:
            before = [client.append({"action_type": "CapabilityCall", "function_name": "cap.a", "cost": 0.5,
                                     "duration_ms": 20, "success": True}) for _ in range(6)]
            before += [client.append({"action_type": "PlanStarted", "plan_id": f"p{i}", "cost": 0.25})
                       for i in range(4)]
    finally:
        assert first.stop() == 0  # SIGTERM: a clean exit
    assert [a["seq"] for a in before] == list(range(10))

    second = DaemonProcess(state_dir).start()
    try:
        assert second.ready["entries"] == 10
        assert second.ready["key_id"] == first.ready["key_id"]
        with second.client() as client:
            assert client.ping() == 10
            after = [client.append({"action_type": "CapabilityCall", "function_name": "cap.a", "cost": 1.0,
                                    "duration_ms": 200, "success": False}) for _ in range(3)]
            after += [client.append({"action_type": "PlanCompleted", "plan_id": "p0", "cost": 0.125})
                      for _ in range(2)]
            assert client.ping() == 15
        assert [a["seq"] for a in after] == list(range(10, 15))
        previous = before[-1]["chain_hash"]
        for answer in after:
            assert chains(previous, answer)
            previous = answer["chain_hash"]

        values = samples(second.metrics())
        assert sample(values, "ccos_ledger_entries") == 15
        assert sample(values, "ccos_actions_total", action_type="CapabilityCall") == 9
        assert sample(values, "ccos_actions_total", action_type="PlanStarted") == 4
        assert sample(values, "ccos_actions_total", action_type="PlanCompleted") == 2
        assert sample(values, "ccos_cost_total") == pytest.approx(6 * 0.5 + 4 * 0.25 + 3 * 1.0 + 2 * 0.125)
        assert sample(values, "ccos_capability_calls_total", capability="cap.a", outcome="success") == 6
        assert sample(values, "ccos_capability_calls_total", capability="cap.a", outcome="failure") == 3
        assert sample(values, "ccos_capability_duration_seconds_count", capability="cap.a") == 9
        assert sample(values, "ccos_capability_duration_seconds_bucket", capability="cap.a", le="0.025") == 6
        assert sample(values, "ccos_capability_cost_total", capability="cap.a") == pytest.approx(6.0)

        verify_ok(state_dir, 15)  # while the second daemon runs
    finally:
        assert second.stop() == 0
    verify_ok(state_dir, 15)
    records = export_records(state_dir)
    assert [r["seq"] for r in records] == list(range(15))
    assert {r["key_id"] for r in records} == {first.ready["key_id"]}


def drain_log(daemon: DaemonProcess) -> list[dict[str, Any] | str]:
    """Every log line the stopped daemon wrote after the ones already waited for."""
    lines = list(daemon.log)
    while not daemon.lines.empty():
        lines.append(daemon.lines.get_nowait())
    return lines


STOP_RIGHT_AFTER_READY_TRIES = 5


def test_sigterm_as_soon_as_ready_is_a_clean_stop(state_dir: Path) -> None:
    """A supervisor may stop the daemon the moment it reports ready.

    Whether a signal sent right after ``daemon_ready`` lands before the daemon
    handles SIGTERM is timing: several tries make a daemon that is not ready for
    it fail reliably, and a daemon that is passes every time.
    """
    for attempt in range(STOP_RIGHT_AFTER_READY_TRIES):
        daemon = DaemonProcess(state_dir).start()
        code = daemon.stop()
        events = [line.get("event") for line in drain_log(daemon) if isinstance(line, dict)]
        assert code == 0, (f"try {attempt + 1}: exit {code}, killed by the SIGTERM sent as soon as daemon_ready "
                           f"was logged; log events {events}")
        assert "daemon_stopped" in events
        assert not daemon.socket_path.exists()


# --- refusing to start


def run_args(state_dir: Path, *extra: str) -> list[str]:
    return ["run", "--state-dir", str(state_dir), "--socket", str(state_dir / "ccos-obsd.sock"), *extra]


def test_a_key_file_others_can_read_stops_the_start(state_dir: Path) -> None:
    first = DaemonProcess(state_dir).start()
    with first.client() as client:
        client.ping()
    assert first.stop() == 0
    key_files = [p for p in state_dir.iterdir() if "key" in p.name]
    assert len(key_files) == 1, key_files
    key_file = key_files[0]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # created private

    key_file.chmod(0o644)
    result = run_cli(*run_args(state_dir, "--http", "127.0.0.1:0"), timeout=RUN_TIMEOUT_S)
    message = result.stderr.decode()
    assert result.returncode == 3, message
    assert str(key_file) in message, message
    assert "Traceback" not in message
    assert not (state_dir / "ccos-obsd.sock").exists()


def test_a_second_daemon_on_a_locked_state_dir_exits_3(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        client.append({"action_type": "PlanStarted"})
    result = run_cli(*run_args(daemon.state_dir, "--http", "127.0.0.1:0"), timeout=RUN_TIMEOUT_S)
    message = result.stderr.decode()
    assert result.returncode == 3, message
    assert "lock" in message.lower(), message
    assert "Traceback" not in message
    # The running daemon is untouched: same socket, same ledger.
    assert daemon.socket_path.exists()
    with daemon.client() as client:
        assert client.append({"action_type": "PlanCompleted"})["seq"] == 1
    status, _, _ = daemon.get("/healthz")
    assert status == 200


@pytest.mark.parametrize(
    ("config_toml", "env", "flags", "names"),
    [
        ('[socket]\nmax_batchez = 5\n', {}, (), ("socket.max_batchez",)),
        (None, {"CCOS_OBSD_SOCKET_MAX_BATCH": "abc"}, (), ("socket.max_batch", "CCOS_OBSD_SOCKET_MAX_BATCH")),
        (None, {}, ("--http", "nonsense"), ("http.listen", "--http")),
    ],
    ids=["unknown-toml-key", "bad-env-value", "bad-flag"],
)
def test_bad_config_exits_2_with_one_line_naming_the_key(
    state_dir: Path, config_toml: str | None, env: dict[str, str], flags: tuple[str, ...], names: tuple[str, ...]
) -> None:
    args = run_args(state_dir, *flags)
    if config_toml is not None:
        config = state_dir / "config.toml"
        config.write_text(config_toml, encoding="utf-8")
        args += ["--config", str(config)]
    if "--http" not in flags:
        args += ["--http", "127.0.0.1:0"]
    result = run_cli(*args, env=env, timeout=RUN_TIMEOUT_S)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert any(name in lines[0] for name in names), lines
    assert not (state_dir / "ccos-obsd.sock").exists()


class CommandDaemon(DaemonProcess):
    """A daemon started with exactly the given ``run`` arguments (no harness defaults)."""

    def __init__(self, state_dir: Path, args: list[str], socket_path: Path, env: dict[str, str]) -> None:
        super().__init__(state_dir, env=env)
        self.args = args
        self.socket_path = socket_path

    def command(self) -> list[str]:
        return [sys.executable, "-m", "ccos_obsd", "run", *self.args]


def test_env_overrides_the_file_and_a_flag_overrides_the_env(state_dir: Path) -> None:
    config = state_dir / "config.toml"
    config.write_text(
        f'state_dir = "{state_dir}"\n[socket]\npath = "{state_dir / "file.sock"}"\n'
        '[http]\nlisten = "127.0.0.1:0"\n',
        encoding="utf-8",
    )
    env = {"CCOS_OBSD_SOCKET_PATH": str(state_dir / "env.sock")}

    from_env = CommandDaemon(state_dir, ["--config", str(config)], state_dir / "env.sock", env).start()
    try:
        assert from_env.ready["socket"] == str(state_dir / "env.sock")
        assert from_env.ready["state_dir"] == str(state_dir)
        with from_env.client() as client:
            assert client.append({"action_type": "PlanStarted"})["seq"] == 0
        assert not (state_dir / "file.sock").exists()
    finally:
        assert from_env.stop() == 0

    flag_args = ["--config", str(config), "--socket", str(state_dir / "flag.sock")]
    from_flag = CommandDaemon(state_dir, flag_args, state_dir / "flag.sock", env).start()
    try:
        assert from_flag.ready["socket"] == str(state_dir / "flag.sock")
        with from_flag.client() as client:
            assert client.ping() == 1
        assert not (state_dir / "env.sock").exists()
        assert not (state_dir / "file.sock").exists()
    finally:
        assert from_flag.stop() == 0


def test_config_file_from_the_environment_variable(state_dir: Path) -> None:
    config = state_dir / "config.toml"
    config.write_text('[socket]\nmax_batch = 2\n', encoding="utf-8")
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_CONFIG": str(config)}).start()
    try:
        with daemon.client() as client:
            answer = client.request({"op": "append_batch", "actions": [{"action_type": "PlanStarted"}] * 3})
        assert answer["ok"] is False
        assert "max_batch" in answer["error"]["message"]
    finally:
        daemon.stop()


# --- crash


PIPELINED = 2000
KILL_AFTER = 300


def append_lines(n: int) -> list[bytes]:
    return [json.dumps({"op": "append", "id": i, "action": {
        "action_type": "InternalStep", "action_id": f"crash-{i:04d}", "plan_id": "crash", "cost": 0.5,
    }}).encode() + b"\n" for i in range(n)]


def test_sigkill_loses_no_acknowledged_append(state_dir: Path) -> None:
    daemon = DaemonProcess(state_dir).start()
    acked: dict[str, dict[str, Any]] = {}
    killed = False
    try:
        with daemon.client() as client:
            try:
                for answer in client.pipeline(append_lines(PIPELINED)):
                    assert answer["ok"] is True, answer
                    acked[answer["action_id"]] = answer
                    if len(acked) == KILL_AFTER:
                        assert daemon.proc is not None
                        daemon.proc.send_signal(signal.SIGKILL)
                        killed = True
            except (ConnectionError, ValueError):
                pass  # the daemon died mid-stream (ValueError: a half-written last answer)
    finally:
        code = daemon.stop()
    assert killed
    assert code == -signal.SIGKILL
    assert len(acked) >= KILL_AFTER

    restarted = DaemonProcess(state_dir).start()
    try:
        assert restarted.ready["entries"] >= len(acked)
        records = export_records(state_dir)
        by_action = {}
        for record in records:
            entry = json.loads(record["entry"])
            assert entry["action_id"] not in by_action, "appended twice"
            by_action[entry["action_id"]] = record
        for action_id, answer in acked.items():
            record = by_action.get(action_id)
            assert record is not None, f"acknowledged {action_id} (seq {answer['seq']}) is not in the ledger"
            assert record["seq"] == answer["seq"]
            assert record["leaf_hash"] == answer["leaf_hash"]
            assert record["chain_hash"] == answer["chain_hash"]
        verify_ok(state_dir, len(records))

        # The client's recovery: re-send everything; nothing is appended twice.
        with restarted.client() as client:
            resent = list(client.pipeline(append_lines(PIPELINED)))
        assert all(a["ok"] for a in resent)
        for answer in resent:
            if answer["action_id"] in acked:
                assert answer["duplicate"] is True
                assert answer["seq"] == acked[answer["action_id"]]["seq"]
        values = samples(restarted.metrics())
        assert sample(values, "ccos_ledger_entries") == PIPELINED
        assert sample(values, "ccos_actions_total", action_type="InternalStep") == PIPELINED
        assert sample(values, "ccos_cost_total") == PIPELINED * 0.5
    finally:
        assert restarted.stop() == 0
    verify_ok(state_dir, PIPELINED)


def test_sigterm_while_a_client_pipelines_answers_everything_it_read(state_dir: Path) -> None:
    """Shutdown: stop reading, answer every request already read, commit, exit 0."""
    daemon = DaemonProcess(state_dir).start()
    received: list[dict[str, Any]] = []
    try:
        with daemon.client() as client:
            try:
                for answer in client.pipeline(append_lines(PIPELINED)):
                    received.append(answer)
                    if len(received) == KILL_AFTER:
                        assert daemon.proc is not None
                        daemon.proc.send_signal(signal.SIGTERM)
            except ConnectionError:
                pass  # closed with our unread requests still queued
        assert daemon.proc is not None
        code = daemon.proc.wait(timeout=30)
    finally:
        daemon.stop()
    assert code == 0
    assert not daemon.socket_path.exists()
    # Every answer is a commit, or "unavailable" (shutting down: retry later).
    refused = [a for a in received if not a["ok"]]
    assert all(a["error"]["code"] == "unavailable" for a in refused), refused[:3]
    acked = {a["action_id"]: a for a in received if a["ok"]}
    assert len(acked) >= KILL_AFTER - len(refused)
    records = export_records(state_dir)
    in_ledger = {json.loads(r["entry"])["action_id"]: r for r in records}
    assert set(in_ledger) == set(acked), "the ledger holds exactly the answered appends"
    for action_id, answer in acked.items():
        assert in_ledger[action_id]["seq"] == answer["seq"]
    verify_ok(state_dir, len(records))


def test_lifecycle_lines_are_written_at_every_log_level(state_dir: Path) -> None:
    """Supervisors wait for daemon_ready; a quieter log level must not hide it."""
    with running_daemon(state_dir, "--log-level", "error") as daemon:
        with daemon.client() as client:
            client.append({"action_type": "PlanStarted"})
        assert daemon.ready["entries"] == 0
    lines = list(daemon.log)
    while not daemon.lines.empty():
        lines.append(daemon.lines.get_nowait())
    events = [line.get("event") for line in lines if isinstance(line, dict)]
    assert "daemon_stopped" in events
    assert "action_appended" not in events


def test_an_unusable_state_dir_is_a_configuration_error(state_dir: Path) -> None:
    not_a_dir = state_dir / "file"
    not_a_dir.write_text("x")
    result = run_cli("run", "--state-dir", str(not_a_dir / "state"), "--http", "127.0.0.1:0")
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "state_dir" in lines[0]


def test_a_ledger_of_another_format_is_a_start_up_failure(state_dir: Path) -> None:
    import sqlite3

    with running_daemon(state_dir):
        pass
    conn = sqlite3.connect(state_dir / "ledger.db")
    try:
        with conn:
            conn.execute("UPDATE meta SET value = '2' WHERE key = 'format'")
    finally:
        conn.close()
    started = run_cli("run", "--state-dir", str(state_dir), "--socket", str(state_dir / "s.sock"),
                      "--http", "127.0.0.1:0")
    assert started.returncode == 3, started.stderr
    assert b"format 2" in started.stderr and b"Traceback" not in started.stderr
