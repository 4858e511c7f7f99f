"""The nats sink against real nats-server processes: every acknowledged entry in the stream exactly once.

A single JetStream server and a 3-node JetStream cluster on loopback (R3 stream),
started by the tests on free ports. The stream is read back message by message and
compared with ``ccos-obsd export``: same bodies, each seq once, each with its
``Nats-Msg-Id``; across a daemon SIGKILL, a NATS restart, a dead NATS and a cluster
node killed under load.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StorageType, StreamConfig
from prometheus_client.parser import text_string_to_metric_families

from ccos_obsd.ledger import store
from ccos_obsd.sinks.nats import subject_origin
from tests.daemon import DaemonProcess, run_cli
from tests.nats_servers import NatsCluster, NatsServer, StreamMessage, read_stream, run, stream_config, wait_until

KEY_NAME = "host-1.example/ccos-obsd"
ORIGIN = subject_origin(KEY_NAME)
STREAM = "CCOS_LEDGER"
CATCH_UP_S = 90.0


@pytest.fixture
def nats_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ccos-nats-") as directory:
        yield Path(directory)


@pytest.fixture
def nats_server(nats_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer(nats_dir / "store").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster(nats_dir: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster.on_loopback(nats_dir).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def write_config(state_dir: Path, servers: list[str], **options: object) -> Path:
    config = state_dir / "nats.toml"
    lines = ["[signing]", f'key_name = "{KEY_NAME}"', "", "[[sinks]]", 'type = "nats"',
             f"servers = {json.dumps(servers)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    config.write_text("\n".join(lines) + "\n")
    return config


def start(state_dir: Path, config: Path) -> DaemonProcess:
    return DaemonProcess(state_dir, "--config", str(config)).start()


def sample(daemon: DaemonProcess, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(daemon.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def append(daemon: DaemonProcess, first: int, count: int) -> list[int]:
    """Append ``count`` actions; the seqs the daemon acknowledged."""
    with daemon.client() as client:
        answers = client.append_batch([{"action_type": "CapabilityCall", "function_name": "web.search",
                                        "action_id": f"a-{n}", "arguments": [n]} for n in range(first, first + count)])
    assert all(answer["ok"] for answer in answers), answers
    return [int(answer["seq"]) for answer in answers]


class Load:
    """Appends in a background thread until stopped, keeping the acknowledged seqs (ended by a killed daemon)."""

    def __init__(self, daemon: DaemonProcess, first: int) -> None:
        self.daemon = daemon
        self.next = first
        self.acked: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        wait_until(lambda: len(self.acked) >= 200, "the first appends under load")
        return self

    def _run(self) -> None:
        try:
            with self.daemon.client(timeout=10) as client:
                while not self._stop.is_set():
                    actions = [{"action_type": "CapabilityCall", "function_name": "web.search",
                                "action_id": f"a-{n}"} for n in range(self.next, self.next + 50)]
                    answers = client.append_batch(actions)
                    self.next += len(actions)
                    self.acked += [int(a["seq"]) for a in answers if a.get("ok")]
        except (OSError, ValueError):
            return  # the daemon was killed

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def caught_up(daemon: DaemonProcess, head: int | None = None) -> bool:
    lag = sample(daemon, "ccos_sink_lag_entries", sink="nats")
    return lag == 0 and (head is None or sample(daemon, "ccos_ledger_entries") == head)


def export_lines(state_dir: Path) -> list[str]:
    result = run_cli("export", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().splitlines()


def entry_messages(urls: list[str]) -> list[StreamMessage]:
    return [m for m in run(read_stream(urls, STREAM)) if m.subject == f"ccos.ledger.entries.{ORIGIN}"]


def assert_exactly_once(state_dir: Path, urls: list[str], acked: list[int]) -> None:
    """The stream holds each ledger entry once, its body the export line, its id ``<origin>/<seq>``."""
    lines = export_lines(state_dir)
    messages = entry_messages(urls)
    by_seq = {json.loads(m.data)["seq"]: m for m in messages}
    assert len(by_seq) == len(messages), "a seq is in the stream twice"
    assert sorted(by_seq) == list(range(len(lines)))
    for line in lines:
        seq = json.loads(line)["seq"]
        assert by_seq[seq].data.decode() == line
        assert by_seq[seq].msg_id == f"{ORIGIN}/{seq}"
    assert set(acked) <= set(by_seq)


def test_entries_and_checkpoints_reach_a_created_stream(state_dir: Path, nats_server: NatsServer) -> None:
    config = write_config(state_dir, [nats_server.url], max_age=86400)
    daemon = start(state_dir, config)
    try:
        acked = append(daemon, 0, 300)
        wait_until(lambda: caught_up(daemon, 300), "the nats sink to deliver")
        assert sample(daemon, "ccos_sink_delivered_total", sink="nats") == 300
        assert_exactly_once(state_dir, [nats_server.url], acked)
        # The checkpoint over the whole ledger follows (written once the interval ran out; polled).
        subject = f"ccos.ledger.checkpoints.{ORIGIN}"

        def last_checkpoint() -> StreamMessage | None:
            found = [m for m in run(read_stream([nats_server.url], STREAM)) if m.subject == subject]
            return found[-1] if found and found[-1].msg_id == f"{ORIGIN}/cp/300" else None

        message = wait_until(last_checkpoint, "the checkpoint of size 300 in the stream")
        conn = store.connect(store.ledger_path(state_dir), readonly=True)
        try:
            notes = {cp.size: cp.note for cp in store.read_checkpoints(conn)}
        finally:
            conn.close()
        assert message.data.decode() == notes[300]
        checkpoints = [m for m in run(read_stream([nats_server.url], STREAM)) if m.subject == subject]
        assert len({m.msg_id for m in checkpoints}) == len(checkpoints)
        for m in checkpoints:
            size = int(m.msg_id.rsplit("/", 1)[1])
            assert m.data.decode() == notes[size]
    finally:
        daemon.stop()
    settings = run(stream_config([nats_server.url], STREAM))
    assert settings.subjects == ["ccos.ledger.>"]
    assert settings.storage == "file"
    assert settings.num_replicas == 1
    assert settings.duplicate_window >= 120
    assert settings.max_age == 86400


def test_exactly_once_across_a_daemon_sigkill_under_load(state_dir: Path, nats_server: NatsServer) -> None:
    config = write_config(state_dir, [nats_server.url])
    daemon = start(state_dir, config)
    with Load(daemon, 0) as load:
        wait_until(lambda: (sample(daemon, "ccos_sink_delivered_total", sink="nats") or 0) > 0,
                   "deliveries under load")
        daemon.kill()
    daemon = start(state_dir, config)
    try:
        with Load(daemon, load.next) as more:
            pass
        with daemon.client() as client:
            head = client.ping()
        wait_until(lambda: caught_up(daemon, head), "the sink to catch up after the crash", CATCH_UP_S)
        assert_exactly_once(state_dir, [nats_server.url], load.acked + more.acked)
    finally:
        daemon.stop()


def test_a_dead_nats_delays_only_the_sink_then_it_catches_up(state_dir: Path, nats_dir: Path) -> None:
    server = NatsServer(nats_dir / "store")  # not started yet: nothing listens on its port
    config = write_config(state_dir, [server.url])
    daemon = start(state_dir, config)
    try:
        acked = append(daemon, 0, 200)  # acknowledged although NATS is down
        wait_until(lambda: (sample(daemon, "ccos_sink_errors_total", sink="nats") or 0) > 0, "a failed delivery")
        assert sample(daemon, "ccos_sink_lag_entries", sink="nats") == 200
        acked += append(daemon, 200, 100)
        assert sample(daemon, "ccos_sink_lag_entries", sink="nats") == 300
        server.start()
        try:
            wait_until(lambda: caught_up(daemon, 300), "the sink to catch up once NATS is up", CATCH_UP_S)
            assert_exactly_once(state_dir, [server.url], acked)
        finally:
            server.stop()
    finally:
        daemon.stop()


def test_exactly_once_across_a_nats_restart(state_dir: Path, nats_server: NatsServer) -> None:
    config = write_config(state_dir, [nats_server.url])
    daemon = start(state_dir, config)
    try:
        acked = append(daemon, 0, 200)
        wait_until(lambda: caught_up(daemon, 200), "the first deliveries")
        nats_server.stop()
        acked += append(daemon, 200, 200)
        wait_until(lambda: (sample(daemon, "ccos_sink_lag_entries", sink="nats") or 0) > 0, "a lag while NATS is down")
        nats_server.start()  # same port, same store dir
        wait_until(lambda: caught_up(daemon, 400), "the sink to catch up after the restart", CATCH_UP_S)
        assert_exactly_once(state_dir, [nats_server.url], acked)
    finally:
        daemon.stop()


def test_r3_stream_exactly_once_with_a_node_killed_under_load(state_dir: Path, nats_cluster: NatsCluster) -> None:
    config = write_config(state_dir, nats_cluster.urls, replicas=3)
    daemon = start(state_dir, config)
    try:
        with Load(daemon, 0) as load:
            wait_until(lambda: (sample(daemon, "ccos_sink_delivered_total", sink="nats") or 0) >= 200,
                       "deliveries under load")
            nats_cluster.servers[0].kill()
            delivered = sample(daemon, "ccos_sink_delivered_total", sink="nats") or 0
            wait_until(lambda: (sample(daemon, "ccos_sink_delivered_total", sink="nats") or 0) > delivered + 200,
                       "deliveries with one node down", CATCH_UP_S)
        with daemon.client() as client:
            head = client.ping()
        wait_until(lambda: caught_up(daemon, head), "the sink to catch up", CATCH_UP_S)
        alive = nats_cluster.urls[1:]
        assert run(stream_config(alive, STREAM)).num_replicas == 3
        assert_exactly_once(state_dir, alive, load.acked)
    finally:
        daemon.stop()


def test_an_existing_stream_is_used_as_it_is_with_a_warning(state_dir: Path, nats_server: NatsServer) -> None:
    async def create() -> None:
        client = await nats.connect(servers=[nats_server.url])
        try:
            await client.jetstream().add_stream(StreamConfig(
                name=STREAM, subjects=["ccos.ledger.>"], storage=StorageType.MEMORY, duplicate_window=120.0,
                max_age=3600.0))
        finally:
            await client.close()

    run(create())
    daemon = start(state_dir, write_config(state_dir, [nats_server.url]))
    try:
        acked = append(daemon, 0, 20)
        warning = daemon.wait_for_event("nats_stream_differs", 20)
        assert set(warning["settings"]) == {"storage", "duplicate_window", "max_age"}
        wait_until(lambda: caught_up(daemon, 20), "the nats sink to deliver")
        assert_exactly_once(state_dir, [nats_server.url], acked)
    finally:
        daemon.stop()
    assert run(stream_config([nats_server.url], STREAM)).storage == "memory"


def test_a_republished_batch_is_acknowledged_as_a_duplicate_and_stored_once(
    state_dir: Path, nats_server: NatsServer
) -> None:
    config = write_config(state_dir, [nats_server.url])
    daemon = start(state_dir, config)
    try:
        acked = append(daemon, 0, 100)
        wait_until(lambda: caught_up(daemon, 100), "the first deliveries")
    finally:
        daemon.stop()
    # The cursor moved back (as after a crash between the PubAcks and the cursor's write).
    conn = store.connect(store.ledger_path(state_dir), readonly=False)
    try:
        store.write_sink_cursor(conn, "nats", 0)
    finally:
        conn.close()
    daemon = start(state_dir, config)
    try:
        acked += append(daemon, 100, 10)
        wait_until(lambda: caught_up(daemon, 110), "the sink to publish everything again")
        assert sample(daemon, "ccos_sink_errors_total", sink="nats") == 0
        assert_exactly_once(state_dir, [nats_server.url], acked)
    finally:
        daemon.stop()
