"""Load and hostile clients: 1,000 connections, clients that never read, slow writers.

The daemon runs with its default limits (``socket.max_connections`` 1024,
``socket.max_inflight`` 4096). The test process raises its open-file limit
before starting it, and the daemon inherits that (checked in /proc): 1,024
connections need more than the 1,024 descriptors many systems give by default.

Memory is the daemon's resident set (VmRSS in /proc/PID/status), before and
after; throughput is appends per second of one pipelining client, measured
alone and then beside the hostile clients, in the same test.
"""

from __future__ import annotations

import json
import resource
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.socket_helpers import assert_error, wait_for_open_connections

CONNECTIONS = 1000
MAX_CONNECTIONS = 1024
"""socket.max_connections, the default."""
FILES_NEEDED = MAX_CONNECTIONS + 512
"""Every connection is a descriptor in both processes, plus the daemon's databases, threads' files, HTTP."""
IDLE_CONNECTION_BYTES = 32 * 1024
"""Bound on the memory one idle connection costs the daemon. It holds a protocol object, a transport,
an empty deque and an empty buffer: about 5 KiB measured. 32 KiB leaves room for allocator noise
and still catches a read-sized (256 KiB) buffer kept per connection."""
NON_READER_BYTES = 8 * 2**20
"""Bound on the memory one client that never reads costs the daemon. It stops reading from it after
one read (up to 256 KiB, some 3,700 of these ~70-byte requests) once socket.max_inflight (4096)
answers wait or its transport buffer is full: ~8,000 answers of ~1 KiB each (answer, future,
bookkeeping) at most; about 3 MiB measured."""
BIG_READ_BYTES = 16 * 2**20
"""Bound for a client that pipelines 60 reads of ~0.7 MB answers and never reads: the daemon holds
a few answers (the transport's high-water mark and one answer beyond), not all 40 MB of them."""
SLOW_TICK_S = 0.2
THROUGHPUT_RATIO = 0.5


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


def open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


@pytest.fixture(scope="module")
def files_limit() -> Iterator[None]:
    """Enough descriptors for 1,024 connections, in this process and (inherited) in the daemon."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FILES_NEEDED:
        # Raising the hard limit needs root (CI runs as root); otherwise setrlimit fails loudly.
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILES_NEEDED, max(hard, FILES_NEEDED)))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, max(hard, FILES_NEEDED)))


@pytest.fixture(scope="module")
def loaded(files_limit: None) -> Iterator[DaemonProcess]:
    env = {"CCOS_OBSD_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory(prefix="ccos-load-") as directory:
        daemon = DaemonProcess(Path(directory), env=env).start()
        try:
            assert daemon.proc is not None
            assert open_files_limit(daemon.proc.pid) >= FILES_NEEDED, "the daemon did not inherit the limit"
            yield daemon
        finally:
            daemon.stop()


def connect(daemon: DaemonProcess, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(daemon.socket_path))
    return sock


def read_answer(sock: socket.socket) -> dict[str, object]:
    """One answer line, read byte-exact (no buffered reader left holding later bytes)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(data)!r}")
        data += chunk
    answer: dict[str, object] = json.loads(data)
    return answer


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
    sockets.clear()


def warm_up(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        for _ in range(5):
            client.append_batch([{"action_type": "PlanStarted", "plan_id": "warm-up"}] * 200)


APPENDS = [json.dumps({"op": "append", "action": {"action_type": "InternalStep", "step_id": str(i)}}).encode()
           for i in range(200)]


def throughput(daemon: DaemonProcess, seconds: float = 1.0) -> float:
    """Appends per second of one client pipelining 200 appends at a time, over ``seconds``."""
    done = 0
    with daemon.client() as client:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            for answer in client.pipeline(APPENDS):
                assert answer["ok"] is True, answer
                done += 1
        return done / (time.monotonic() - started)


# --- 1,000 connections, and the connection limit


def test_a_thousand_connections_are_each_served_and_cost_little_memory(loaded: DaemonProcess) -> None:
    assert loaded.proc is not None
    warm_up(loaded)
    with loaded.client() as client:
        head = client.ping()
    wait_for_open_connections(loaded, 0)
    before = rss_bytes(loaded.proc.pid)
    sockets: list[socket.socket] = []
    try:
        sockets.extend(connect(loaded) for _ in range(CONNECTIONS))
        for n, sock in enumerate(sockets):
            sock.sendall(json.dumps({"id": n, "action_type": "PlanStarted", "plan_id": f"conn-{n}"}).encode() + b"\n")
        answers = [read_answer(sock) for sock in sockets]
        assert all(a["ok"] is True and a["id"] == n for n, a in enumerate(answers)), answers[:3]
        assert sorted(a["seq"] for a in answers) == list(range(head, head + CONNECTIONS))  # type: ignore[type-var]
        wait_for_open_connections(loaded, CONNECTIONS)
        per_connection = (rss_bytes(loaded.proc.pid) - before) / CONNECTIONS
        print(f"{CONNECTIONS} connections: {per_connection / 1024:.1f} KiB of daemon memory each")
        assert per_connection < IDLE_CONNECTION_BYTES

        # Up to socket.max_connections every connection is served; the next one hears busy.
        sockets.extend(connect(loaded) for _ in range(MAX_CONNECTIONS - CONNECTIONS))
        for sock in sockets[CONNECTIONS:]:
            sock.sendall(b'{"op":"ping"}\n')
            assert read_answer(sock) == {"ok": True, "head": head + CONNECTIONS}
        with connect(loaded) as refused:
            answer = read_answer(refused)
            assert_error(answer, "busy")
            assert "max_connections" in str(answer)
            assert refused.recv(1) == b"", "a refused connection is closed"
        # A freed slot is usable again.
        sockets.pop().close()
        wait_for_open_connections(loaded, MAX_CONNECTIONS - 1)
        with loaded.client() as client:
            assert client.ping() == head + CONNECTIONS
    finally:
        close_all(sockets)
    wait_for_open_connections(loaded, 0)


# --- clients that never read, slow writers, and a normal client beside them


class NonReader:
    """Pipelines requests of one length (``line(n)`` for the n-th) and never reads, until its sends block."""

    def __init__(self, daemon: DaemonProcess, line: Callable[[int], bytes]) -> None:
        self.line = line
        self.line_length = len(line(0))
        self.sock = connect(daemon, timeout=0.5)
        self.sent = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        n = 0
        try:
            while True:
                chunk = b"".join(self.line(i) for i in range(n, n + 100))
                assert len(chunk) == 100 * self.line_length
                n += 100
                view = memoryview(chunk)
                while view:
                    sent = self.sock.send(view)
                    self.sent += sent
                    view = view[sent:]
        except TimeoutError:
            pass  # stalled: the daemon stopped reading from us
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc


def append_line(n: int) -> bytes:
    return json.dumps({"id": f"{n:08d}", "action_type": "InternalStep", "step_id": "non-reader"}).encode() + b"\n"


def big_read_line(n: int) -> bytes:
    return b'{"op":"query","plan_id":"warm-up","limit":10000}\n'


class SlowWriter:
    """Sends one byte of a ping to each of its connections every SLOW_TICK_S, until told to finish."""

    PREFIX = b'{"op":"ping"'

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.ticks = 0
        self._finish = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            byte = self.PREFIX[self.ticks:self.ticks + 1] or b" "  # then JSON whitespace, a byte at a time
            for sock in self.sockets:
                sock.sendall(byte)
            self.ticks += 1
            if self._finish.wait(SLOW_TICK_S) and self.ticks >= len(self.PREFIX):
                break
        for sock in self.sockets:
            sock.sendall(b"}\n")

    def finish(self) -> None:
        self._finish.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def test_hostile_clients_leave_a_normal_client_its_throughput(loaded: DaemonProcess) -> None:
    assert loaded.proc is not None
    warm_up(loaded)
    throughput(loaded, 0.5)  # warm the append path before measuring
    baseline = max(throughput(loaded), throughput(loaded))
    wait_for_open_connections(loaded, 0)
    before = rss_bytes(loaded.proc.pid)
    sockets: list[socket.socket] = []
    non_readers: list[NonReader] = []
    slow: SlowWriter | None = None
    try:
        # 4 clients pipeline appends, 16 pipeline large reads; none reads an answer.
        non_readers = [NonReader(loaded, append_line) for _ in range(4)]
        non_readers += [NonReader(loaded, big_read_line) for _ in range(16)]
        for reader in non_readers:
            reader.thread.join(timeout=25)
            assert not reader.thread.is_alive(), "the daemon kept reading from a client that never reads"
            assert reader.error is None, reader.error
        per_non_reader = (rss_bytes(loaded.proc.pid) - before) / len(non_readers)
        print(f"clients that never read: {per_non_reader / 2**20:.2f} MiB of daemon memory each")
        assert per_non_reader < NON_READER_BYTES

        slow_sockets = [connect(loaded) for _ in range(10)]
        sockets.extend(slow_sockets)
        idle = CONNECTIONS - 1 - len(non_readers) - len(slow_sockets)
        sockets.extend(connect(loaded) for _ in range(idle))
        wait_for_open_connections(loaded, CONNECTIONS - 1)
        slow = SlowWriter(slow_sockets)
        beside = max(throughput(loaded), throughput(loaded))
        assert slow.thread.is_alive(), "the slow writers were done before the measurement was"
        slow.finish()
        print(f"throughput alone {baseline:.0f}/s, beside {CONNECTIONS - 1} other connections {beside:.0f}/s")
        assert beside >= THROUGHPUT_RATIO * baseline
        for sock in slow_sockets:  # each slow line is one request, answered once it is complete
            answer = read_answer(sock)
            assert answer["ok"] is True and "head" in answer, answer

        # The append pipeliners lost nothing: once they half-close, every complete line is answered, in order.
        for reader in non_readers[:4]:
            reader.sock.settimeout(30)
            reader.sock.shutdown(socket.SHUT_WR)
            lines = reader.sock.makefile("rb").read().splitlines()
            assert len(lines) == reader.sent // reader.line_length
            answers = [json.loads(line) for line in lines]
            assert all(a["ok"] is True for a in answers), [a for a in answers if not a["ok"]][:3]
            assert [a["id"] for a in answers] == [f"{n:08d}" for n in range(len(answers))]
    finally:
        if slow is not None and slow.thread.is_alive():
            slow.finish()
        close_all(sockets)
        for reader in non_readers:
            reader.sock.close()
    wait_for_open_connections(loaded, 0)


def queries_answered(daemon: DaemonProcess) -> float:
    for line in daemon.metrics().splitlines():
        if line.startswith('ccos_ingest_requests_total{op="query",result="ok"}'):
            return float(line.split()[1])
    return 0.0


def test_a_client_that_pipelines_large_reads_and_never_reads_costs_a_few_answers(loaded: DaemonProcess) -> None:
    """Reads run only while their client takes the answers, so unread answers do not pile up in memory."""
    assert loaded.proc is not None
    query = {"op": "query", "plan_id": "big", "limit": 10000}
    with loaded.client() as client:
        client.append_batch([{"action_type": "PlanStarted", "plan_id": "big", "metadata": {"pad": "x" * 200}}] * 1000)
        size = len(json.dumps(client.request(query)))
    before, answered_before = rss_bytes(loaded.proc.pid), queries_answered(loaded)
    requests, alongside = 60, 12
    with connect(loaded, timeout=30) as greedy:
        greedy.sendall((json.dumps(query).encode() + b"\n") * requests)
        # Another client runs the same reads meanwhile: time in which the greedy client's
        # reads would be run too (and their answers buffered) if the daemon did that.
        with loaded.client() as client:
            for _ in range(alongside):
                assert len(client.request(query)["records"]) == 1000
        greedy_answered = queries_answered(loaded) - answered_before - alongside
        grown = rss_bytes(loaded.proc.pid) - before
        print(f"{requests} pipelined reads of {size / 1e6:.1f} MB answers, never read: "
              f"{greedy_answered:.0f} run, the daemon grew {grown / 2**20:.1f} MiB")
        assert greedy_answered <= 4
        assert grown < BIG_READ_BYTES
        # All are answered, in order, once the client reads.
        reader = greedy.makefile("rb")
        for _ in range(requests):
            answer = json.loads(reader.readline())
            assert answer["ok"] is True and len(answer["records"]) == 1000


def test_out_of_descriptors_new_clients_wait_and_are_served_once_there_are_some(loaded: DaemonProcess) -> None:
    """EMFILE on accept: the daemon lives, waiting clients stay in the backlog, nothing is lost."""
    assert loaded.proc is not None
    pid = loaded.proc.pid
    with loaded.client() as client:
        head = client.ping()
    wait_for_open_connections(loaded, 0)  # the last use of HTTP until the limit is back
    in_use = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    spare = 5
    limit = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + spare, limit[1]))
    sockets: list[socket.socket] = []
    try:
        sockets.extend(connect(loaded, timeout=30) for _ in range(4 * spare))
        for n, sock in enumerate(sockets):
            sock.sendall(json.dumps({"id": n, "action_type": "PlanStarted", "plan_id": "emfile"}).encode() + b"\n")
        first = [read_answer(sock) for sock in sockets[:spare - 1]]  # served: within the limit
        assert all(a["ok"] is True for a in first), first
        assert loaded.proc.poll() is None
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
        # The rest waited in the backlog; the daemon accepts them once it can again.
        rest = [read_answer(sock) for sock in sockets[spare - 1:]]
        assert all(a["ok"] is True for a in rest), rest
        assert sorted(a["seq"] for a in first + rest) == list(range(head, head + len(sockets)))  # type: ignore[type-var]
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
        close_all(sockets)
    with loaded.client() as client:
        assert client.ping() == head + 4 * spare
