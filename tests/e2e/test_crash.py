"""SIGKILL at random moments under concurrent load, then restart on the same state dir.

Several writers pipeline single appends, bare action lines and batches on their
own connections and record every acknowledged action (action_id -> seq, leaf and
chain hash). At a moment drawn from a seeded RNG the daemon is killed with
SIGKILL: during group commits, checkpoints (``checkpoint.interval`` is 20 ms, so
nearly every commit carries one), metric snapshots (every 100 ms) and Working
Memory deliveries (small WM batches, so the sink is always mid-delivery under
load); in some rounds the sink host process is killed first, mid-load, and the
daemon restarts it. After each kill:

- ``ccos-obsd verify --state-dir`` passes on the crashed state dir;
- the restarted daemon holds every acknowledged action at its acknowledged seq
  with its hashes, no action twice, seqs contiguous from 0, every row complete
  (its leaf hash is over its stored bytes, its chain hash follows, 64-byte signature);
- re-sending acknowledged actions answers ``duplicate`` with the same seq;
- the restart replaces the socket file the killed daemon left behind;
- once caught up, Working Memory holds each ledger entry exactly once;
- the metric aggregates (snapshot + fold-in) count every entry exactly once.

``CCOS_CRASH_ITERATIONS`` sets the number of kills (20; ``make soak`` runs 500) and
``CCOS_CRASH_SEED`` replays a failing run (its seed is printed on failure).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import DaemonProcess
from tests.e2e.socket_helpers import wait_until

ITERATIONS = int(os.environ.get("CCOS_CRASH_ITERATIONS", "20"))
KILLS_PER_STATE_DIR = 4
"""Kills (and restarts) on one state dir before the next starts afresh: keeps each check short."""
WRITERS = 3
WINDOW = 32
"""Unanswered requests per writer: enough to keep group commits full, bounded so a run stays small."""
KILL_DELAY_S = (0.0, 0.2)
"""The kill comes this long (uniformly drawn) after the writers' first acknowledgement."""
SINK_HOST_KILLS = 0.3
"""Share of rounds in which the sink host process (Working Memory's) is SIGKILLed first, mid-load."""
RESENT_PER_CHECK = 24
CATCH_UP_TIMEOUT_S = 30.0

CONFIG = """\
[checkpoint]
interval = 0.02
[metrics]
snapshot_interval = 0.1
[log]
level = "warning"
[wm]
enabled = true
[[sinks]]
type = "wm"
name = "wm"
batch = 40
"""


@dataclass(frozen=True)
class Ack:
    seq: int
    leaf_hash: str
    chain_hash: str
    action: dict[str, Any]


@dataclass
class Acked:
    """Every acknowledged action of one state dir, from every writer."""

    by_id: dict[str, Ack] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, action: dict[str, Any], answer: dict[str, Any]) -> None:
        assert answer.get("ok") is True and answer.get("duplicate") is False, answer
        assert answer["action_id"] == action["action_id"], (answer, action)
        with self.lock:
            assert action["action_id"] not in self.by_id, f"acknowledged twice as new: {answer}"
            self.by_id[action["action_id"]] = Ack(answer["seq"], answer["leaf_hash"], answer["chain_hash"], action)


def random_action(rng: random.Random, action_id: str) -> dict[str, Any]:
    kind = rng.randrange(3)
    if kind == 0:
        return {"action_id": action_id, "action_type": "CapabilityCall", "function_name": f"tool.{rng.randrange(5)}",
                "cost": rng.randrange(1000) / 1000, "duration_ms": rng.randrange(5000), "success": rng.random() < 0.9,
                "arguments": [rng.randrange(100), "q\u00e9ry"]}
    if kind == 1:
        return {"action_id": action_id, "action_type": "PlanStepStarted", "plan_id": f"plan-{rng.randrange(20)}",
                "step_id": f"step-{rng.randrange(100)}", "metadata": {"note": "\u2713 \U0001f9ea"}}
    return {"action_id": action_id, "action_type": "InternalStep", "session_id": f"s-{rng.randrange(4)}"}


class Writer:
    """One connection pipelining appends (at most WINDOW unanswered) until the daemon dies.

    A sender thread writes requests and remembers what each one carried; this
    object's reader thread matches answers to them in order and records the acks.
    """

    def __init__(self, socket_path: Path, prefix: str, rng: random.Random, acked: Acked) -> None:
        self.prefix = prefix
        self.rng = rng
        self.acked = acked
        self.errors: list[str] = []
        self.answered = 0
        self.first_answer = threading.Event()
        self._sent: collections.deque[tuple[str, list[dict[str, Any]]]] = collections.deque()
        self._window = threading.Semaphore(WINDOW)
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(CATCH_UP_TIMEOUT_S)
        self._sock.connect(str(socket_path))
        self._sender = threading.Thread(target=self._send, name=f"send-{prefix}", daemon=True)
        self._reader = threading.Thread(target=self._read, name=f"read-{prefix}", daemon=True)

    def start(self) -> None:
        self._sender.start()
        self._reader.start()

    def _request(self, n: int) -> tuple[bytes, str, list[dict[str, Any]]]:
        kind = self.rng.random()
        if kind < 0.5:
            action = random_action(self.rng, f"{self.prefix}-{n}")
            return json.dumps({"id": n, "op": "append", "action": action}).encode(), "single", [action]
        if kind < 0.65:
            action = random_action(self.rng, f"{self.prefix}-{n}")
            return json.dumps({"id": n, **action}).encode(), "single", [action]
        actions = [random_action(self.rng, f"{self.prefix}-{n}.{i}") for i in range(self.rng.randrange(2, 17))]
        return json.dumps({"op": "append_batch", "actions": actions}).encode(), "batch", actions

    def _send(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                if not self._window.acquire(timeout=0.1):
                    continue
                line, kind, actions = self._request(n)
                n += 1
                self._sent.append((kind, actions))  # before sending: the answer may come at once
                self._sock.sendall(line + b"\n")
        except OSError:
            pass  # the daemon is gone
        finally:
            self._stop.set()

    def _read(self) -> None:
        reader = self._sock.makefile("rb")
        try:
            while True:
                line = reader.readline()
                if not line.endswith(b"\n"):
                    return  # the daemon died (a cut answer acknowledges nothing)
                kind, actions = self._sent.popleft()
                self._check(json.loads(line), kind, actions)
                self.answered += 1
                self.first_answer.set()
                self._window.release()
        except OSError:
            pass
        finally:
            self._stop.set()
            self._window.release()
            reader.close()

    def _check(self, answer: dict[str, Any], kind: str, actions: list[dict[str, Any]]) -> None:
        if not answer.get("ok"):
            self.errors.append(f"{kind}: {answer}")
            return
        results = [answer] if kind == "single" else answer["results"]
        if len(results) != len(actions):
            self.errors.append(f"{len(actions)} actions, {len(results)} results: {answer}")
            return
        for action, result in zip(actions, results, strict=True):
            if result.get("ok") is not True:
                self.errors.append(f"batch result: {result}")
            else:
                self.acked.record(action, result)

    def join(self) -> None:
        self._stop.set()
        self._sender.join(timeout=CATCH_UP_TIMEOUT_S)
        self._reader.join(timeout=CATCH_UP_TIMEOUT_S)
        assert not self._sender.is_alive() and not self._reader.is_alive(), f"writer {self.prefix} hangs"
        self._sock.close()


# --- the checks after a restart


def ledger_rows(state_dir: Path) -> list[tuple[Any, ...]]:
    uri = f"{(state_dir / 'ledger.db').resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        return conn.execute(
            "SELECT seq, action_id, entry, leaf_hash, chain_hash, key_id, signature FROM entries ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()


def crashed_state(state_dir: Path) -> tuple[int, int, int]:
    """(entries, WM sink cursor, size of the latest checkpoint) as the kill left them."""
    uri = f"{(state_dir / 'ledger.db').resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        (entries,) = conn.execute("SELECT count(*) FROM entries").fetchone()
        cursor = conn.execute("SELECT next_seq FROM sink_cursors WHERE name = 'wm'").fetchone()
        (checkpoint,) = conn.execute("SELECT coalesce(max(size), 0) FROM checkpoints").fetchone()
    finally:
        conn.close()
    # The WM sink keeps its own cursor in wm.db, moved with the entries it covers; the
    # ledger's row is a mirror refreshed now and then.
    wm_file = state_dir / "wm.db"
    if wm_file.exists():
        wm = sqlite3.connect(f"{wm_file.resolve().as_uri()}?mode=ro", uri=True)
        try:
            own = wm.execute("SELECT value FROM wm_meta WHERE key = 'next_seq'").fetchone()
        finally:
            wm.close()
        if own is not None:
            cursor = (int(own[0]),)
    return entries, 0 if cursor is None else cursor[0], checkpoint


def check_ledger(state_dir: Path, acked: Acked) -> list[str]:
    """Every row complete and chained, seqs 0..n-1, every ack present; the action_ids by seq."""
    rows = ledger_rows(state_dir)
    assert [row[0] for row in rows] == list(range(len(rows))), "seqs are not contiguous from 0"
    previous = bytes(32)
    action_ids: list[str] = []
    for seq, action_id, entry, leaf, chain, key_id, signature in rows:
        assert isinstance(entry, bytes) and entry, f"seq {seq}: no entry bytes"
        fields = json.loads(entry)
        assert fields["seq"] == seq and fields["action_id"] == action_id, f"seq {seq}: row and entry disagree"
        assert bytes(leaf) == hashlib.sha256(b"\x00" + entry).digest(), f"seq {seq}: leaf hash"
        previous = hashlib.sha256(previous + bytes(leaf)).digest()
        assert bytes(chain) == previous, f"seq {seq}: chain hash"
        assert isinstance(key_id, str) and len(key_id) == 8, f"seq {seq}: key id {key_id!r}"
        assert isinstance(signature, bytes) and len(signature) == 64, f"seq {seq}: signature"
        action_ids.append(action_id)
    assert len(set(action_ids)) == len(action_ids), "an action is in the ledger twice"
    at = {action_id: seq for seq, action_id in enumerate(action_ids)}
    for action_id, ack in acked.by_id.items():
        assert at.get(action_id) == ack.seq, f"acknowledged {action_id} at seq {ack.seq}, ledger: {at.get(action_id)}"
        _, _, _, leaf, chain, _, _ = rows[ack.seq]
        assert (bytes(leaf).hex(), bytes(chain).hex()) == (ack.leaf_hash, ack.chain_hash), f"seq {ack.seq}: hashes"
    return action_ids


def samples(daemon: DaemonProcess) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(daemon.metrics())
            for s in family.samples]


def wm_lag(daemon: DaemonProcess) -> float | None:
    for name, labels, value in samples(daemon):
        if name == "ccos_sink_lag_entries" and labels.get("sink") == "wm":
            return value
    return None


def read_working_memory(state_dir: Path) -> tuple[list[tuple[int, str]], int]:
    """(seq, record) of every WM entry, and the entry count WM keeps in its stats row."""
    conn = sqlite3.connect(f"{(state_dir / 'wm.db').resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT seq, record FROM wm_entries ORDER BY seq").fetchall()
        (counted,) = conn.execute("SELECT entries FROM wm_stats").fetchone()
    finally:
        conn.close()
    return rows, counted


def check_working_memory(daemon: DaemonProcess, state_dir: Path, action_ids: list[str]) -> None:
    """Once the WM sink caught up: one WM entry per ledger entry, each derived from it."""
    read: list[tuple[list[tuple[int, str]], int]] = []

    def caught_up() -> bool:
        if wm_lag(daemon) != 0:
            return False
        try:
            read.append(read_working_memory(state_dir))
        except sqlite3.OperationalError:  # the sink has not created its store yet
            return False
        return True

    wait_until(caught_up, CATCH_UP_TIMEOUT_S, "Working Memory to catch up")
    rows, counted = read[-1]
    seqs = [seq for seq, _ in rows]
    assert seqs == list(range(len(action_ids))), (
        f"WM holds {len(rows)} entries for {len(action_ids)} ledger entries "
        f"(missing {sorted(set(range(len(action_ids))) - set(seqs))[:5]}, "
        f"twice {[s for s, n in collections.Counter(seqs).items() if n > 1][:5]})"
    )
    for seq, record in rows:
        wm_id = json.loads(record)["id"]
        assert wm_id.startswith(f"wm:{action_ids[seq]}:"), f"WM entry {wm_id} at seq {seq}"
    assert counted == len(rows), f"wm_stats counts {counted} entries, the table holds {len(rows)}"


def check_metrics(daemon: DaemonProcess, head: int) -> None:
    values = samples(daemon)
    assert ("ccos_ledger_entries", {}, head) in values
    counted = sum(value for name, _, value in values if name == "ccos_actions_total")
    assert counted == head, f"ccos_actions_total sums to {counted}, the ledger holds {head}"


def check_duplicates(daemon: DaemonProcess, acked: Acked, rng: random.Random) -> None:
    """The client's recovery: re-sending acknowledged actions appends nothing."""
    chosen = rng.sample(sorted(acked.by_id), min(RESENT_PER_CHECK, len(acked.by_id)))
    lines = [json.dumps({"op": "append", "action": acked.by_id[a].action}).encode() for a in chosen]
    with daemon.client() as client:
        head = client.ping()
        for action_id, answer in zip(chosen, client.pipeline(lines), strict=True):
            assert answer.get("ok") is True and answer["duplicate"] is True, answer
            assert answer["seq"] == acked.by_id[action_id].seq, answer
        assert client.ping() == head


def start_verify(state_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ccos_obsd", "verify", "--state-dir", str(state_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def check_verified(verify: subprocess.Popen[bytes], head: int) -> None:
    output = verify.communicate(timeout=120)[0].decode("utf-8", "replace")
    assert verify.returncode == 0, f"verify after the kill: {output}"
    assert output.startswith(f"ok: {head} entries"), output


def check_recovered(daemon: DaemonProcess, state_dir: Path, acked: Acked, rng: random.Random) -> int:
    with daemon.client() as client:
        head = client.ping()
    assert daemon.ready["entries"] == head
    action_ids = check_ledger(state_dir, acked)
    assert len(action_ids) == head
    check_duplicates(daemon, acked, rng)
    check_working_memory(daemon, state_dir, action_ids)
    check_metrics(daemon, head)
    return head


# --- one kill


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(after_name[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def load_and_kill(daemon: DaemonProcess, acked: Acked, rng: random.Random, name: str) -> tuple[int, bool]:
    """Start the writers, SIGKILL the daemon at a random moment of the load; (acks this round, host killed)."""
    before = len(acked.by_id)
    writers = [Writer(daemon.socket_path, f"{name}-w{w}", random.Random(rng.random()), acked)  # noqa: S311 - replayable
               for w in range(WRITERS)]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: any(w.first_answer.is_set() for w in writers), CATCH_UP_TIMEOUT_S, "the first answer")
        assert daemon.proc is not None
        host_killed = rng.random() < SINK_HOST_KILLS
        if host_killed:  # the daemon restarts it; Working Memory must still end up exact
            threading.Event().wait(rng.uniform(*KILL_DELAY_S))  # a random moment, not a synchronisation
            children = children_of(daemon.proc.pid)
            assert children, "no sink host process beside the daemon"
            for child in children:
                os.kill(child, signal.SIGKILL)
        threading.Event().wait(rng.uniform(*KILL_DELAY_S))  # the random kill moment, not a synchronisation
        daemon.proc.send_signal(signal.SIGKILL)
    finally:
        code = daemon.stop()
        for writer in writers:
            writer.join()
    assert code == -signal.SIGKILL, f"the daemon exited with {code} before the kill"
    assert daemon.socket_path.is_socket(), "SIGKILL leaves the socket file: the restart must replace it"
    errors = [error for writer in writers for error in writer.errors]
    assert not errors, f"error answers under load: {errors[:3]}"
    return len(acked.by_id) - before, host_killed


def run_state_dir(state_dir: Path, config: Path, kills: int, rng: random.Random, run: str,
                  report: list[str], wm_behind: list[int]) -> None:
    acked = Acked()
    verify: subprocess.Popen[bytes] | None = None
    for kill in range(kills + 1):
        started = time.monotonic()
        daemon = DaemonProcess(state_dir, "--config", str(config)).start()
        try:
            head = check_recovered(daemon, state_dir, acked, rng)
            if verify is not None:
                check_verified(verify, head)
                verify = None
            if kill == kills:
                break
            new, host_killed = load_and_kill(daemon, acked, rng, f"{run}-{kill}")
            verify = start_verify(state_dir)  # the crashed state as it is on disk, before a restart
            entries, wm_cursor, checkpoint = crashed_state(state_dir)
            host = "; sink host killed first" if host_killed else ""
            report.append(f"kill {kill}: {new} acked, {entries - head} appended; WM {entries - wm_cursor} behind, "
                          f"{entries - checkpoint} after the last checkpoint{host}; {time.monotonic() - started:.2f}s")
            wm_behind.append(entries - wm_cursor)
        finally:
            daemon.stop()
    # The last restart ends with SIGTERM: a clean stop, and the ledger still verifies.
    assert daemon.proc is not None and daemon.proc.returncode == 0
    final = start_verify(state_dir)
    check_verified(final, len(ledger_rows(state_dir)))


def test_sigkill_at_random_moments_loses_no_acknowledged_action(tmp_path: Path) -> None:
    seed = int(os.environ.get("CCOS_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)  # noqa: S311 - a replayable schedule of kills, not a secret
    print(f"crash test seed {seed} ({ITERATIONS} kills); replay with CCOS_CRASH_SEED={seed}")
    config = tmp_path / "crash.toml"
    config.write_text(CONFIG)
    report: list[str] = []
    wm_behind: list[int] = []
    done = 0
    try:
        while done < ITERATIONS:
            kills = min(KILLS_PER_STATE_DIR, ITERATIONS - done)
            # Not tmp_path: a Unix socket path must stay under 108 bytes.
            with tempfile.TemporaryDirectory(prefix="ccos-crash-") as directory:
                run_state_dir(Path(directory), config, kills, rng, f"r{done}", report, wm_behind)
            done += kills
    except BaseException as exc:
        exc.add_note(f"crash test seed {seed}: replay with CCOS_CRASH_SEED={seed}; after {len(report)} kills")
        raise
    finally:
        print("\n".join(report))
    assert len(report) == ITERATIONS
    if ITERATIONS >= KILLS_PER_STATE_DIR:  # the kills did land while Working Memory was being fed
        assert max(wm_behind) > 0, "no kill came while the WM sink was behind the ledger"
