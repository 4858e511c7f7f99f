"""Real ``nats-server`` processes for tests: one JetStream server, or a 3-node JetStream cluster on loopback.

Each server listens on a free loopback port with its store in a temporary directory;
``start`` returns once the server accepts clients and (for a cluster) once JetStream
has a meta leader: no sleeps, conditions with deadlines. A stopped server can be
started again on the same port and store dir (a NATS restart).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.js.errors import NotFoundError

from tests.waiting import wait_for

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
START_TIMEOUT_S = 30.0
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], Any], what: str, timeout: float = START_TIMEOUT_S) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    return wait_for(condition, what, timeout)


class NatsServer:
    def __init__(self, store_dir: Path, *, name: str = "n1", port: int | None = None, cluster_port: int | None = None,
                 routes: tuple[int, ...] = (), cluster_name: str | None = None) -> None:
        self.store_dir = store_dir
        self.name = name
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.cluster_name = cluster_name
        self.log_file = store_dir.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir),
                   "--server_name", self.name, "-l", str(self.log_file)]
        if self.cluster_port is not None:
            command += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--cluster_name",
                        self.cluster_name or "ccos-test",
                        "--routes", ",".join(f"nats://127.0.0.1:{port}" for port in self.routes)]
        return command

    def start(self, *, wait: bool = True) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            wait_until(self.accepts, f"nats-server {self.name} on port {self.port}")
        return self

    def accepts(self) -> bool:
        """The server answers a client with its INFO line."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            raise AssertionError(f"nats-server {self.name} exited with {self.proc.returncode}: {log[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                return connection.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class NatsCluster:
    servers: list[NatsServer]

    @classmethod
    def on_loopback(cls, root: Path, size: int = 3) -> NatsCluster:
        cluster_ports = [free_port() for _ in range(size)]
        return cls([
            NatsServer(root / f"n{i + 1}" / "store", name=f"n{i + 1}", cluster_port=cluster_ports[i],
                       routes=tuple(p for j, p in enumerate(cluster_ports) if j != i), cluster_name="ccos-test")
            for i in range(size)
        ])

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start(self) -> NatsCluster:
        for server in self.servers:
            server.start(wait=False)
        for server in self.servers:
            wait_until(server.accepts, f"nats-server {server.name}")
        wait_until(lambda: run(jetstream_ready(self.urls)), "a JetStream meta leader")
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


async def jetstream_ready(urls: list[str]) -> bool:
    """JetStream answers account requests (in a cluster: a meta leader was elected)."""
    try:
        client = await nats.connect(servers=urls, connect_timeout=1, allow_reconnect=False)
    except Exception:  # noqa: BLE001 - not up yet
        return False
    try:
        await client.jetstream(timeout=2).account_info()
        return True
    except Exception:  # noqa: BLE001 - no leader yet
        return False
    finally:
        await client.close()


@dataclass(frozen=True)
class StreamMessage:
    seq: int
    subject: str
    msg_id: str
    data: bytes


async def read_stream(urls: list[str], stream: str) -> list[StreamMessage]:
    """Every message in ``stream``, in stream order ([] when the stream does not exist)."""
    client = await nats.connect(servers=urls, connect_timeout=2)
    try:
        js = client.jetstream(timeout=5)
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        messages = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                raw = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            headers = raw.headers or {}
            messages.append(StreamMessage(seq, raw.subject or "", headers.get("Nats-Msg-Id", ""), raw.data or b""))
        return messages
    finally:
        await client.close()


async def stream_config(urls: list[str], stream: str) -> Any:
    client = await nats.connect(servers=urls, connect_timeout=2)
    try:
        return (await client.jetstream(timeout=5).stream_info(stream)).config
    finally:
        await client.close()
