"""Sinks pull committed entries from the ledger: nothing lost across crashes, no duplicate in WM."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import DaemonProcess, run_cli, running_daemon
from tests.waiting import wait_for


def sample(daemon: DaemonProcess, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(daemon.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def start(state_dir: Path, config: Path) -> DaemonProcess:
    return DaemonProcess(state_dir, "--config", str(config), env={"CCOS_OBSD_WM_ENABLED": "true"}).start()


def test_wm_and_jsonl_sinks_catch_up_and_survive_a_crash(state_dir: Path) -> None:
    export = state_dir / "out" / "ledger.jsonl"
    config = state_dir / "sinks.toml"
    config.write_text(f'[[sinks]]\ntype = "jsonl"\nname = "file"\npath = "{export}"\n')
    daemon = start(state_dir, config)
    try:
        with daemon.client() as client:
            for n in range(50):
                client.append({"action_type": "CapabilityCall", "function_name": "web.search",
                               "action_id": f"a-{n}", "plan_id": "p1"})

        def caught_up(expected: int) -> bool:
            return (sample(daemon, "ccos_sink_lag_entries", sink="wm") == 0
                    and sample(daemon, "ccos_sink_lag_entries", sink="file") == 0
                    and sample(daemon, "ccos_wm_entries") == expected)

        wait_for(lambda: caught_up(50), "sinks to catch up")
        assert sample(daemon, "ccos_sink_delivered_total", sink="file") == 50
    finally:
        daemon.kill()
    # After SIGKILL: the restarted runners continue from their durable cursors.
    daemon = start(state_dir, config)
    try:
        with daemon.client() as client:
            for n in range(50, 60):
                client.append({"action_type": "PlanStarted", "action_id": f"a-{n}", "plan_id": "p2"})
        wait_for(lambda: sample(daemon, "ccos_sink_lag_entries", sink="wm") == 0
                 and sample(daemon, "ccos_sink_lag_entries", sink="file") == 0
                 and sample(daemon, "ccos_wm_entries") == 60, "sinks to catch up after the restart")
        records = [json.loads(line) for line in export.read_text().splitlines()]
        assert {r["seq"] for r in records} == set(range(60))  # at least once, every entry
        keys = run_cli("keys", "--state-dir", str(state_dir)).stdout.decode().strip()
        deduplicated = state_dir / "dedup.jsonl"
        by_seq = {r["seq"]: r for r in records}
        deduplicated.write_text("".join(json.dumps(by_seq[s]) + "\n" for s in sorted(by_seq)))
        verified = run_cli("verify", "--export", str(deduplicated), "--vkey", keys)
        assert verified.returncode == 0, verified.stdout
    finally:
        daemon.stop()


def test_a_bad_sink_option_is_a_configuration_error(state_dir: Path) -> None:
    config = state_dir / "bad.toml"
    config.write_text('[[sinks]]\ntype = "jsonl"\nname = "x"\npath = "out.jsonl"\nbogus = 1\n')
    result = run_cli("run", "--config", str(config), "--state-dir", str(state_dir))
    assert result.returncode == 2
    assert "sinks[0].bogus" in result.stderr.decode()


def test_wm_search_digest_and_a_rebuild_with_the_same_digest(state_dir: Path) -> None:
    env = {"CCOS_OBSD_WM_ENABLED": "true"}
    daemon = DaemonProcess(state_dir, env=env, reader=True).start()  # GETs /v1/wm/search
    try:
        with daemon.client() as client:
            for n in range(30):
                client.append({"action_type": "CapabilityCall", "function_name": f"tool.{n % 3}",
                               "plan_id": f"plan-{n % 2}", "timestamp_ms": 1_700_000_000_000 + n})
        wait_for(lambda: sample(daemon, "ccos_wm_entries") == 30, "WM to hold every entry")
        found = run_cli("wm", "search", "tool.1", "--socket", str(daemon.socket_path), env=env)
        assert found.returncode == 0, found.stderr
        entries = [json.loads(line) for line in found.stdout.decode().splitlines()]
        assert len(entries) == 10
        assert [e["timestamp_s"] for e in entries] == sorted((e["timestamp_s"] for e in entries), reverse=True)
        status, _, body = daemon.get("/v1/wm/search?tags=capabilitycall&plan_id=plan-0&limit=100")
        assert status == 200 and len(body.decode().splitlines()) == 15
        online = run_cli("wm", "digest", "--socket", str(daemon.socket_path), env=env).stdout.decode().strip()
    finally:
        daemon.stop()
    offline = run_cli("wm", "digest", "--state-dir", str(state_dir), env=env).stdout.decode().strip()
    assert online == offline and len(online) == 64
    rebuilt = run_cli("replay", "--state-dir", str(state_dir), "--quiet", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["scanned_actions"] == 30
    assert run_cli("wm", "digest", "--state-dir", str(state_dir), env=env).stdout.decode().strip() == online


def test_wm_search_says_when_working_memory_is_off(state_dir: Path) -> None:
    with running_daemon(state_dir, env={"CCOS_OBSD_WM_ENABLED": "false"}) as daemon, daemon.client() as client:
        answer = client.request({"op": "wm_search", "text": "x"})
    assert answer["ok"] is False and answer["error"]["code"] == "unavailable"


def test_working_memory_is_on_by_default_in_a_process_of_its_own(daemon: DaemonProcess) -> None:
    started = next(x for x in daemon.log if isinstance(x, dict) and x.get("event") == "sink_host_started")
    assert started["sinks"] == ["wm"] and started["pid"] != daemon.ready["pid"]
    with daemon.client() as client:
        client.append({"action_type": "PlanStarted", "plan_id": "default-wm", "metadata": {"note": "zebra"}})
        deadline = time.monotonic() + 10
        while not (found := client.request({"op": "wm_search", "plan_id": "default-wm"})).get("entries"):
            assert time.monotonic() < deadline, found
            time.sleep(0.02)
    assert found["entries"][0]["meta"]["seq"] == 0


INGEST = "observability.ingestor:v1.ingest"


def test_the_ingestor_capability_and_a_rebuild_that_reproduces_its_records(state_dir: Path) -> None:
    env = {"CCOS_OBSD_WM_ENABLED": "true"}
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        with daemon.client() as client:
            single = client.request({"op": "call", "capability": INGEST,
                                     "args": ["single", {"summary": "cheaper provider found", "provider": "Acme"}]})
            assert single == {"ok": True, "result": {"mode": "single", "ingested": 1, "errors": [], "delivered": True}}
            batch = client.request({"op": "call", "capability": INGEST,
                                    "args": ["batch", [{"summary": "one"}, {"bogus": 1}, {"content": "three"}]]})
            assert batch["result"]["ingested"] == 2
            assert batch["result"]["errors"] == [{"index": 1, "reason": "unknown record field 'bogus'"}]
            unknown = client.request({"op": "call", "capability": "other:v1", "args": ["single", {}]})
            assert unknown["error"]["code"] == "invalid_request" and unknown["error"]["field"] == "capability"
            bad_mode = client.request({"op": "call", "capability": INGEST, "args": ["explode"]})
            assert bad_mode["error"]["code"] == "invalid_request"
            # Each call is two ledger entries: CapabilityCall (records in arguments) + CapabilityResult.
            assert client.ping() == 4
            call = client.get(seq=0)["entry"]
            assert call["action_type"] == "CapabilityCall" and call["function_name"] == INGEST
            assert call["arguments"][1][0]["summary"] == "cheaper provider found"
            assert client.get(seq=1)["entry"]["parent_action_id"] == call["action_id"]
        # 4 ledger entries + 3 ingested records.
        wait_for(lambda: sample(daemon, "ccos_wm_entries") == 7, "WM to hold entries and records")
        assert sample(daemon, "ccos_capability_calls_total", capability=INGEST, outcome="success") == 2
        found = run_cli("wm", "search", "cheaper", "--socket", str(daemon.socket_path), env=env)
        assert json.loads(found.stdout.decode().splitlines()[0])["meta"]["provider"] == "Acme"
        incremental = run_cli("wm", "digest", "--socket", str(daemon.socket_path), env=env).stdout
        with daemon.client() as client:
            replay = client.request({"op": "replay"})
        assert replay["ok"] and replay["scanned_actions"] == 4
        assert run_cli("wm", "digest", "--socket", str(daemon.socket_path), env=env).stdout == incremental
        with daemon.client() as client:
            answer = client.request({"op": "call", "capability": INGEST, "args": ["replay"]})
        # The replay call's own CapabilityCall is committed first: the replay scans it too.
        assert answer["result"]["mode"] == "replay" and answer["result"]["scanned_actions"] == 5
    finally:
        daemon.stop()


def test_wm_budgets_evict_the_oldest_first(state_dir: Path) -> None:
    env = {"CCOS_OBSD_WM_ENABLED": "true", "CCOS_OBSD_WM_MAX_ENTRIES": "5"}
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        with daemon.client() as client:
            client.append_batch([{"action_type": "PlanStarted", "plan_id": f"p{n}", "timestamp_ms": 1_000 * n}
                                 for n in range(12)])
        wait_for(lambda: sample(daemon, "ccos_sink_lag_entries", sink="wm") == 0
                 and sample(daemon, "ccos_wm_entries") == 5, "WM to settle at its budget")
        found = run_cli("wm", "search", "--limit", "50", "--socket", str(daemon.socket_path), env=env)
        plans = [json.loads(line)["meta"]["plan_id"] for line in found.stdout.decode().splitlines()]
        assert plans == ["p11", "p10", "p9", "p8", "p7"]
    finally:
        daemon.stop()


@pytest.mark.parametrize("budget", [{"CCOS_OBSD_WM_MAX_ENTRIES": "100"}, {"CCOS_OBSD_WM_MAX_TOKENS": "1500"}],
                         ids=["max_entries", "max_tokens"])
def test_a_rebuild_under_budgets_reproduces_the_live_digest(state_dir: Path, budget: dict[str, str]) -> None:
    env = {"CCOS_OBSD_WM_ENABLED": "true", **budget}
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        with daemon.client() as client:
            for batch in range(10):  # 1,000 actions stamped out of order, of uneven sizes, and ingested records
                client.append_batch([
                    {"action_type": "CapabilityCall", "function_name": "f" * (n % 37 + 1),
                     "timestamp_ms": 1_700_000_000_000 + (n * 7_919 % 1_000) * 1_000}
                    for n in range(batch * 100, batch * 100 + 100)
                ])
                assert client.request({"op": "call", "capability": INGEST, "args": ["batch", [
                    {"summary": f"insight {batch}.{k}", "timestamp_s": 1_700_000_000 + batch * 97 + k}
                    for k in range(5)]]})["ok"]
            head = client.ping()
        wait_for(lambda: sample(daemon, "ccos_sink_lag_entries", sink="wm") == 0, "WM to catch up", 60)
        with daemon.client(timeout=120) as client:
            live = client.request({"op": "wm_digest"})
            entries = live["entries"]
            assert entries == 100 if "CCOS_OBSD_WM_MAX_ENTRIES" in budget else 0 < entries < head
            assert client.request({"op": "replay"})["scanned_actions"] == head  # the socket's replay
            assert client.request({"op": "wm_digest"}) == live
    finally:
        daemon.stop()
    rebuilt = run_cli("replay", "--state-dir", str(state_dir), "--quiet", env=env)  # the offline one
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert run_cli("wm", "digest", "--state-dir", str(state_dir), env=env).stdout.decode().strip() == live["digest"]


def test_sigkill_before_the_sink_delivered_loses_nothing_and_duplicates_nothing(state_dir: Path) -> None:
    env = {"CCOS_OBSD_WM_ENABLED": "true"}
    daemon = DaemonProcess(state_dir, env=env).start()
    with daemon.client() as client:
        lines = [json.dumps({"op": "append", "action": {"action_type": "InternalStep", "step_id": str(n)}}).encode()
                 for n in range(3000)]
        acked = sum(1 for answer in client.pipeline(lines) if answer["ok"])
    daemon.kill()  # the WM sink is typically still behind the ledger here
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        wait_for(lambda: sample(daemon, "ccos_sink_lag_entries", sink="wm") == 0
                 and sample(daemon, "ccos_wm_entries") == acked, "WM to hold every entry exactly once", 60)
    finally:
        daemon.stop()


def test_a_replay_through_the_daemon_reports_progress_and_reproduces_the_digest(state_dir: Path) -> None:
    # More entries than wm.replay.REPLAY_INLINE: the replay runs in worker processes.
    from ccos_obsd.wm.replay import REPLAY_INLINE

    count = REPLAY_INLINE + 5_000
    with running_daemon(state_dir) as daemon:
        with daemon.client() as client:
            for start in range(0, count, 1000):
                answers = client.append_batch([
                    {"action_type": "CapabilityCall", "function_name": f"tool.{n % 5}", "plan_id": f"p{n // 100}"}
                    for n in range(start, start + 1000)
                ])
                assert all(a["ok"] for a in answers)
            assert client.request({"op": "replay_status"}) == {"ok": True, "running": False}
        wait_for(lambda: sample(daemon, "ccos_wm_entries") == count, "WM to hold every entry")
        before = run_cli("wm", "digest", "--socket", str(daemon.socket_path)).stdout.decode().strip()
        seen: list[dict[str, Any]] = []
        answers: list[dict[str, Any]] = []
        with daemon.client(timeout=300) as replaying, daemon.client() as watching:
            replay = threading.Thread(target=lambda: answers.append(replaying.request({"op": "replay"})))
            replay.start()
            while replay.is_alive():
                seen.append(watching.request({"op": "replay_status"}))
            replay.join()
        [answer] = answers
        assert answer["ok"] is True and answer["scanned_actions"] == count and answer["ingested"] == count
        running = [s for s in seen if s["running"]]
        assert running, "the replay finished before a status arrived"
        assert all(0 <= s["done"] <= s["total"] == count for s in running)
        assert run_cli("wm", "digest", "--socket", str(daemon.socket_path)).stdout.decode().strip() == before
        cli = run_cli("replay", "--socket", str(daemon.socket_path), "--from", str(count - 10))
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["scanned_actions"] == 10
        # On a terminal, the CLI draws the daemon's progress (it polls replay_status).
        bar = replay_on_a_terminal(daemon)
        assert "replay" in bar and "25.0k/25.0k" in bar and "verify" not in bar, bar


def replay_on_a_terminal(daemon: DaemonProcess) -> str:
    """What `ccos-obsd replay --socket` writes to a terminal on its standard error."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, columns
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ccos_obsd", "replay", "--socket", str(daemon.socket_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal, timeout=300, check=False,
        )
        os.close(terminal)
        terminal = -1
        assert done.returncode == 0
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    return b"".join(chunks).decode(errors="replace")


def sink_host_pid(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    for task in Path(f"/proc/{daemon.proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"ccos_obsd.sinks.host" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no sink host process")


def test_a_sink_host_that_dies_is_restarted_and_its_counters_never_go_back(state_dir: Path) -> None:
    import os
    import signal

    with running_daemon(state_dir) as daemon:
        with daemon.client() as client:
            client.append_batch([{"action_type": "PlanStarted", "plan_id": f"p{n}"} for n in range(50)])
        wait_for(lambda: sample(daemon, "ccos_sink_delivered_total", sink="wm") == 50, "the first 50 delivered")
        first = sink_host_pid(daemon)
        os.kill(first, signal.SIGKILL)
        daemon.wait_for_event("sink_host_exited")
        with daemon.client() as client:
            client.append_batch([{"action_type": "PlanStarted", "plan_id": f"q{n}"} for n in range(30)])
        wait_for(lambda: sample(daemon, "ccos_wm_entries") == 80, "WM to hold all 80 entries")
        assert sink_host_pid(daemon) != first
        assert sample(daemon, "ccos_sink_lag_entries", sink="wm") == 0
        # Counters carry on from the dead host's: at least every entry, never reset to the new host's own.
        assert sample(daemon, "ccos_sink_delivered_total", sink="wm") >= 80


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_an_idle_sink_host_does_not_wake_up(state_dir: Path) -> None:
    with running_daemon(state_dir) as daemon:
        with daemon.client() as client:
            for n in range(20):
                client.append({"action_type": "PlanStarted", "plan_id": f"p{n}"})
        wait_for(lambda: sample(daemon, "ccos_sink_lag_entries", sink="wm") == 0, "WM to catch up")
        pid = sink_host_pid(daemon)
        time.sleep(0.5)  # let the last report and the cursor mirror finish
        before = cpu_ticks(pid)
        time.sleep(5.0)  # a measurement window, not a wait for something
        # No timers and no polling: 5 s of no traffic cost it nothing (a 20 Hz timer cost about 2 ticks).
        assert cpu_ticks(pid) - before == 0
