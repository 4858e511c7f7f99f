"""/metrics rendered in a process of its own.

Formatting 20,000 series with ``prometheus_client`` takes a core for about 0.2 s.
On a thread of the daemon it would hold the interpreter lock that whole time,
and an append crosses several threads (socket, writer, signers), each waiting
for the lock at every hand-over: a scrape every second multiplied appends' p99
by twenty. So the daemon hands the render to a child process, the renderer
(``python -m ccos_obsd.metrics.render``): it sends the collector's inputs
(:meth:`LedgerCollector.state` encoded by ``metrics.snapshot.dump_state``, the
encoding of the persisted snapshot, then pickled: about 2 ms) and the scraper's
``Accept`` header, and gets back the encoded body. The exposition is
still ``prometheus_client``'s own encoders over the same families.

Frames on the child's stdin and stdout: one line ``{"accept": ..., "size": N}``
then N bytes of the pickled state; the answer is one line ``{"content_type": ..., "size": N}``
then N bytes of body. If the renderer cannot be started or dies, the daemon starts
a new one at the next scrape, and renders that one scrape on its own thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import threading
from typing import IO, Any

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from ccos_obsd.metrics.collector import LedgerCollector, StateCollector
from ccos_obsd.metrics.snapshot import dump_state, load_state

log = structlog.get_logger("ccos_obsd.metrics.render")


class Renderer:
    """Renders the daemon's registry (its collector and ``process_*``) in the renderer process."""

    def __init__(self, collector: LedgerCollector, registry: CollectorRegistry) -> None:
        self._collector = collector
        self._registry = registry  # the same families, rendered here when the renderer is unavailable
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._lock:
            self._spawn()

    def render(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) for a scraper sending ``accept``. Blocking: call it off the event loop."""
        # pickle: the fastest encoder of this data (1.6 ms for 20,000 series, JSON 8 ms), and
        # the only reader is our own child process, over a pipe nobody else holds.
        state = pickle.dumps(dump_state(self._collector.state()), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            try:
                if self._process is None or self._process.poll() is not None:
                    self._spawn()
                return self._ask(accept, state)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("renderer_failed", error=str(exc), fallback="this scrape renders in the daemon")
                self._kill()
                with contextlib.suppress(OSError):
                    self._spawn()  # ready for the next scrape
        encoder, content_type = choose_encoder(accept)
        return encoder(self._registry), content_type

    def close(self) -> None:
        with self._lock:
            process = self._process
            if process is None:
                return
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
            self._process = None

    def _spawn(self) -> None:
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "ccos_obsd.metrics.render", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def _ask(self, accept: str, state: bytes) -> tuple[bytes, str]:
        process = self._process
        if process is None or process.stdin is None or process.stdout is None:
            raise OSError("no renderer process")
        process.stdin.write(json.dumps({"accept": accept, "size": len(state)}).encode() + b"\n" + state)
        process.stdin.flush()
        header = json.loads(process.stdout.readline() or b"null")
        if not isinstance(header, dict):
            raise OSError(f"the renderer exited (code {process.poll()})")
        body = _read_exactly(process.stdout, int(header["size"]))
        return body, str(header["content_type"])

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise OSError(f"the renderer sent {len(data)} of {size} bytes")
    return data


def render_state(state: dict[str, Any], accept: str, daemon_pid: int) -> tuple[bytes, str]:
    """The exposition of a :func:`dump_state` of the daemon's collector, as the daemon would render it."""
    registry = CollectorRegistry()
    registry.register(StateCollector(load_state(state)))
    registry.register(ProcessCollector(pid=lambda: daemon_pid, registry=None))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def main() -> int:
    os.nice(10)  # a scrape may wait a little; appends should not
    daemon_pid = int(sys.argv[1])
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    while line := requests.readline():
        header = json.loads(line)
        state = pickle.loads(_read_exactly(requests, int(header["size"])))  # noqa: S301 - from our parent
        body, content_type = render_state(state, str(header["accept"]), daemon_pid)
        answers.write(json.dumps({"content_type": content_type, "size": len(body)}).encode() + b"\n" + body)
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
