"""Python clients for the daemon's socket: blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

Both speak the NDJSON protocol of docs/protocol.md. The helpers (``append``,
``get``, ``ingest``, ...) raise :class:`~ccos_obsd.errors.RemoteError` on an error answer;
``request`` returns the raw answer. ``Client.pipeline`` sends many lines and
yields their answers in order, reading and writing at once so neither side
stalls.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from ccos_obsd.errors import RemoteError
from ccos_obsd.wm.capability import CAPABILITY as INGESTOR

IngestMode = Literal["single", "batch", "replay"]

Answer = dict[str, Any]
_READ_LIMIT = 64 * 1024 * 1024


def _encode(request: dict[str, Any]) -> bytes:
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _checked(answer: Answer) -> Answer:
    if not answer.get("ok"):
        raise RemoteError.from_answer(answer)
    return answer


def _ingest_request(mode: IngestMode, records: Any) -> dict[str, Any]:
    """A call of the ingestor capability: ``records`` is one record (single), a list (batch), None (replay)."""
    args = [mode] if records is None else [mode, records]
    return {"op": "call", "capability": INGESTOR, "args": args}


def answers_expected(line: bytes) -> bool:
    """Whether the daemon answers this line (blank lines get no answer)."""
    return bool(line.strip())


class Client:
    """A blocking connection to the daemon."""

    def __init__(self, path: str | Path, *, timeout: float | None = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_answer(self) -> Answer:
        line = self._file.readline(_READ_LIMIT)
        if not line:
            raise ConnectionError("the daemon closed the connection")
        answer: Answer = json.loads(line)
        return answer

    def request(self, request: dict[str, Any]) -> Answer:
        self._sock.sendall(_encode(request))
        return self._read_answer()

    def pipeline(self, lines: Iterable[bytes]) -> Iterator[Answer]:
        """Send raw request lines (newline added when missing); yield each answer in order."""
        expected = 0
        done = threading.Event()
        counted = threading.Condition()
        failure: list[BaseException] = []

        def send() -> None:
            nonlocal expected
            try:
                for line in lines:
                    if not line.endswith(b"\n"):
                        line += b"\n"
                    # Count before sending: the reader must keep reading while this
                    # send blocks, or a daemon that waits for us to read stalls both.
                    if answers_expected(line):
                        with counted:
                            expected += 1
                            counted.notify()
                    self._sock.sendall(line)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the reading thread
                failure.append(exc)
            finally:
                with counted:
                    done.set()
                    counted.notify()

        sender = threading.Thread(target=send, name="ccos-client-send", daemon=True)
        sender.start()
        received = 0
        while True:
            with counted:
                while received >= expected and not done.is_set():
                    counted.wait()
                if received >= expected and done.is_set():
                    break
            yield self._read_answer()
            received += 1
        sender.join()
        if failure:
            raise failure[0]

    def append(self, action: dict[str, Any]) -> Answer:
        return _checked(self.request({"op": "append", "action": action}))

    def append_batch(self, actions: list[dict[str, Any]]) -> list[Answer]:
        results: list[Answer] = _checked(self.request({"op": "append_batch", "actions": actions}))["results"]
        return results

    def get(self, *, seq: int | None = None, action_id: str | None = None) -> Answer:
        request: dict[str, Any] = {"op": "get"}
        if seq is not None:
            request["seq"] = seq
        if action_id is not None:
            request["action_id"] = action_id
        record: Answer = _checked(self.request(request))["record"]
        return record

    def query(self, **filters: Any) -> list[Answer]:
        records: list[Answer] = _checked(self.request({"op": "query", **filters}))["records"]
        return records

    def ping(self) -> int:
        head: int = _checked(self.request({"op": "ping"}))["head"]
        return head

    def stats(self, **filters: str) -> Answer:
        return _checked(self.request({"op": "stats", **filters}))

    def logs(self, n: int = 50) -> list[Answer]:
        lines: list[Answer] = _checked(self.request({"op": "logs", "n": n}))["lines"]
        return lines

    def ingest(self, mode: IngestMode, records: Any = None) -> Answer:
        """Call ``observability.ingestor:v1.ingest``; answers its result (``mode``, ``ingested``, ``errors``)."""
        result: Answer = _checked(self.request(_ingest_request(mode, records)))["result"]
        return result


class AsyncClient:
    """An asyncio connection to the daemon; requests may be pipelined with ``send``/``receive``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str | Path) -> AsyncClient:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=_READ_LIMIT)
        return cls(reader, writer)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, request: dict[str, Any]) -> None:
        """Write one request without waiting for its answer (pipelining)."""
        self._writer.write(_encode(request))
        await self._writer.drain()

    async def receive(self) -> Answer:
        line = await self._reader.readline()
        if not line:
            raise ConnectionError("the daemon closed the connection")
        answer: Answer = json.loads(line)
        return answer

    async def request(self, request: dict[str, Any]) -> Answer:
        async with self._lock:
            await self.send(request)
            return await self.receive()

    async def append(self, action: dict[str, Any]) -> Answer:
        return _checked(await self.request({"op": "append", "action": action}))

    async def append_batch(self, actions: list[dict[str, Any]]) -> list[Answer]:
        results: list[Answer] = _checked(await self.request({"op": "append_batch", "actions": actions}))["results"]
        return results

    async def get(self, *, seq: int | None = None, action_id: str | None = None) -> Answer:
        request: dict[str, Any] = {"op": "get"}
        if seq is not None:
            request["seq"] = seq
        if action_id is not None:
            request["action_id"] = action_id
        record: Answer = _checked(await self.request(request))["record"]
        return record

    async def query(self, **filters: Any) -> list[Answer]:
        records: list[Answer] = _checked(await self.request({"op": "query", **filters}))["records"]
        return records

    async def ping(self) -> int:
        head: int = _checked(await self.request({"op": "ping"}))["head"]
        return head

    async def ingest(self, mode: IngestMode, records: Any = None) -> Answer:
        """Call ``observability.ingestor:v1.ingest``; answers its result (see ``Client.ingest``)."""
        result: Answer = _checked(await self.request(_ingest_request(mode, records)))["result"]
        return result
