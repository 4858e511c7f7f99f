"""Start the real daemon process for a benchmark.

Unlike ``tests.daemon.DaemonProcess`` (which reads stdout through a pipe and
parses every line), the daemon's stdout goes to a file here: at the default
``info`` level it writes one line per action, and a pipe read by the benchmark
process would both cost the benchmark CPU and stall the daemon when full.
Readiness is a ``ping`` answered on the socket, which works at every log level
(at ``warning`` the ``daemon_ready`` line is not written). HTTP listens on a
loopback port picked here, so ``/metrics`` is reachable at every level too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from ccos_obsd.client import Client

READY_TIMEOUT_S = 60.0
"""Generous: a restart on a large ledger folds every entry into the metrics first."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class BenchDaemon:
    """``python -m ccos_obsd run`` on ``state_dir``, stdout to ``log_path``."""

    def __init__(
        self, state_dir: Path, *, log_level: str = "info", log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.env = env or {}
        self.socket_path = state_dir / "ccos-obsd.sock"
        self.log_level = log_level
        self.log_path = log_path if log_path is not None else state_dir / f"daemon-{log_level}.log"
        self.http = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_seconds = 0.0

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the daemon is not started")
        return self.proc.pid

    def start(self) -> BenchDaemon:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the daemon runs only on a private one
        self.http = f"127.0.0.1:{free_port()}"
        # Embedded defaults only: no config file or CCOS_OBSD_* overrides from the caller's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCOS_OBSD_")}
        env.update(self.env)  # the benchmark's own overrides
        command = [sys.executable, "-m", "ccos_obsd", "run", "--state-dir", str(self.state_dir),
                   "--socket", str(self.socket_path), "--http", self.http, "--log-level", self.log_level]
        started = time.monotonic()
        with open(self.log_path, "ab") as out, open(self.state_dir / "daemon.stderr", "ab") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self._wait_ready(started + READY_TIMEOUT_S)
        self.ready_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                err = (self.state_dir / "daemon.stderr").read_text(errors="replace")
                raise RuntimeError(f"daemon exited with {self.proc.returncode} before it was ready: {err}")
            try:
                with Client(self.socket_path, timeout=5.0) as client:
                    client.ping()
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"daemon not ready within {READY_TIMEOUT_S}s")
            time.sleep(0.02)

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.socket_path, timeout=timeout)

    def rss_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the daemon process, in KiB, from /proc."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
        return values

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon process has used (all its threads), from /proc."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=30) as response:
            body: bytes = response.read()
            return body.decode("utf-8")

    def commit_counts(self) -> tuple[float, float]:
        """(commits, total commit seconds) from ``ccos_commit_duration_seconds``."""
        count = total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith("ccos_commit_duration_seconds_count"):
                count = float(line.split()[-1])
            elif line.startswith("ccos_commit_duration_seconds_sum"):
                total = float(line.split()[-1])
        return count, total

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code

    def __enter__(self) -> BenchDaemon:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
