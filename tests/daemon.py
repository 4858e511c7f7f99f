"""Start the real daemon as a process for end-to-end tests.

``DaemonProcess`` runs ``python -m ccos_obsd run`` on a temporary state dir with
its socket there and HTTP on a free loopback port, and waits for the
``daemon_ready`` log line (no sleeps): that line carries the bound HTTP address.
With ``reader=True`` it is given a web config with one user (``READER``), whom
``get`` sends: the routes that return ledger content answer only to a user.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ccos_obsd.client import Client

READY_TIMEOUT_S = 30.0
READER = ("reader", "reader-password")
"""The user and password of ``DaemonProcess(reader=True)``."""


class DaemonProcess:
    def __init__(self, state_dir: Path, *extra_args: str, env: dict[str, str] | None = None,
                 reader: bool = False) -> None:
        self.state_dir = state_dir
        self.socket_path = state_dir / "ccos-obsd.sock"
        self.extra_args = list(extra_args)
        self.http_auth: tuple[str, str] | None = None
        """Sent by ``get`` as basic auth."""
        self.ssl_context: ssl.SSLContext | None = None
        """``get`` speaks HTTPS with this client context (None: plain HTTP)."""
        if reader:
            from tests.tls_helpers import web_config

            user, password = READER
            self.extra_args += ["--web-config", str(web_config(state_dir / "web.yml", users={user: password}))]
            self.http_auth = READER
        self.env = {**os.environ, **(env or {})}
        self.popen_options: dict[str, Any] = {}
        """More ``subprocess.Popen`` arguments: ``cwd``, ``user``, ``umask``..."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: queue.Queue[dict[str, Any] | str] = queue.Queue()
        self.log: list[dict[str, Any] | str] = []
        self.ready: dict[str, Any] = {}
        self.stderr = b""

    @property
    def http(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.ready['http']}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "ccos_obsd", "run", "--state-dir", str(self.state_dir),
                "--socket", str(self.socket_path), "--http", "127.0.0.1:0", *self.extra_args]

    def start(self, *, wait: bool = True) -> DaemonProcess:
        """Start the process; with ``wait`` (default), return once it logged ``daemon_ready``."""
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                                     **self.popen_options)
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> dict[str, Any]:
        self.ready = self.wait_for_event("daemon_ready", READY_TIMEOUT_S)
        return self.ready

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                item: dict[str, Any] | str = json.loads(text)
            except ValueError:
                item = text
            self.lines.put(item)
        self.lines.put("<eof>")

    def wait_for_event(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """Read log lines until one has this event (or the process exits)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {event!r} log line within {timeout}s")
            try:
                item = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.log.append(item)
            if item == "<eof>":
                self.stop(timeout=10)
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode} before {event!r}: "  # type: ignore[union-attr]
                    f"{self.stderr.decode(errors='replace')}"
                )
            if isinstance(item, dict) and item.get("event") == event:
                return item

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket_path, timeout=timeout)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if self.http_auth is not None:
            headers.setdefault("Authorization", basic_auth(*self.http_auth))
        request = urllib.request.Request(self.http + path, headers=headers)  # noqa: S310 - loopback
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.ssl_context) as response:  # noqa: S310
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def metrics(self) -> str:
        status, _, body = self.get("/metrics")
        assert status == 200
        return body.decode("utf-8")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._pump_thread.join(timeout=timeout)
        if self.proc.stderr and not self.proc.stderr.closed:
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()
        if self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def basic_auth(user: str, password: str) -> str:
    """An Authorization header's value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@contextmanager
def running_daemon(state_dir: Path, *extra_args: str, env: dict[str, str] | None = None,
                   reader: bool = False) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(state_dir, *extra_args, env=env, reader=reader).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def run_cli(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run ``ccos-obsd ARGS`` as a process (the installed entry point's module)."""
    return subprocess.run(
        [sys.executable, "-m", "ccos_obsd", *args],
        input=input, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False,
    )
