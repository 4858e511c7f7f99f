"""The read-only HTTP side: /metrics, /healthz and a small JSON read API.

Every route is GET (aiohttp answers 405 to anything else). Ledger reads run off
the event loop; /metrics is rendered by the renderer process (``ccos_obsd.render``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ccos_obsd import wm_ops
from ccos_obsd.errors import InvalidRequest, NotFound, RequestError, Unavailable
from ccos_obsd.ledger import proofs, store
from ccos_obsd.ledger.writer import LedgerWriter
from ccos_obsd.log import LogRing
from ccos_obsd.metrics import Aggregates
from ccos_obsd.protocol import snapshot
from ccos_obsd.render import Renderer

ReadFn = Callable[[Callable[[Any], Any]], "asyncio.Future[Any]"]

REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
RENDER_POOL_KEY = web.AppKey("render_pool", Executor)
WRITER_KEY = web.AppKey("writer", LedgerWriter)
RING_KEY = web.AppKey("log_ring", LogRing)
class Reads:
    """Runs a function of a read-only ledger connection off the event loop."""

    def __init__(self, read: ReadFn) -> None:
        self._read = read

    def __call__(self, fn: Callable[[Any], Any]) -> asyncio.Future[Any]:
        return self._read(fn)


READ_KEY = web.AppKey("read", Reads)
AGGREGATES_KEY = web.AppKey("aggregates", Aggregates)


WM_FILE_KEY = web.AppKey("wm_file", object)  # a Path, or None when Working Memory is off
RENDERER_KEY = web.AppKey("renderer", object)  # a Renderer (its own process), or None: render on a thread here


def build_app(
    registry: CollectorRegistry,
    render_pool: Executor,
    writer: LedgerWriter,
    log_ring: LogRing,
    read: ReadFn,
    aggregates: Aggregates,
    wm_file: Path | None = None,
    renderer: Renderer | None = None,
) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[WM_FILE_KEY] = wm_file
    app[RENDERER_KEY] = renderer
    app[REGISTRY_KEY] = registry
    app[RENDER_POOL_KEY] = render_pool
    app[WRITER_KEY] = writer
    app[RING_KEY] = log_ring
    app[READ_KEY] = Reads(read)
    app[AGGREGATES_KEY] = aggregates
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/logs", logs)
    app.router.add_get("/v1/entries/{seq}", entry_by_seq)
    app.router.add_get("/v1/actions/{action_id}", entry_by_action_id)
    app.router.add_get("/v1/query", query)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/v1/checkpoint", checkpoint)
    app.router.add_get("/v1/wm/search", wm_search)
    app.router.add_get("/v1/proof/inclusion", proof_inclusion)
    app.router.add_get("/v1/proof/consistency", proof_consistency)
    return app


async def metrics(request: web.Request) -> web.Response:
    accept = request.headers.get("Accept", "")
    renderer = cast("Renderer | None", request.app[RENDERER_KEY])
    if renderer is None:
        encoder, content_type = choose_encoder(accept)
        body = await asyncio.get_running_loop().run_in_executor(
            request.app[RENDER_POOL_KEY], encoder, request.app[REGISTRY_KEY]
        )
    else:
        body, content_type = await asyncio.get_running_loop().run_in_executor(
            request.app[RENDER_POOL_KEY], renderer.render, accept
        )
    return web.Response(body=body, headers={"Content-Type": content_type})


async def healthz(request: web.Request) -> web.Response:
    writer = request.app[WRITER_KEY]
    return web.json_response({"status": "ok", "entries": writer.head.size})


async def logs(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 50)
    lines = request.app[RING_KEY].recent(n)
    return web.Response(text="".join(line + "\n" for line in lines), content_type="application/x-ndjson")


async def entry_by_seq(request: web.Request) -> web.Response:
    try:
        seq = int(request.match_info["seq"])
    except ValueError:
        return _error(InvalidRequest("seq must be an integer", field="seq"))
    return await _read_one(request, lambda conn: store.get_entry(conn, seq=seq), f"seq {seq}")


async def entry_by_action_id(request: web.Request) -> web.Response:
    action_id = request.match_info["action_id"]
    return await _read_one(request, lambda conn: store.get_entry(conn, action_id=action_id), f"action_id {action_id!r}")


async def _read_one(request: web.Request, fetch: Callable[[Any], store.StoredEntry | None], what: str) -> web.Response:
    entry = await request.app[READ_KEY](fetch)
    if entry is None:
        return _error(NotFound(f"no entry with {what}"))
    return web.json_response(entry.query_record(), dumps=_dumps)


_INT_FILTERS = ("since_ms", "until_ms", "after_seq", "limit")


async def query(request: web.Request) -> web.Response:
    filters: dict[str, Any] = dict(request.query)
    try:
        for key in _INT_FILTERS:
            if key in filters:
                filters[key] = _int_param(request, key, 0)
        entries = await request.app[READ_KEY](lambda conn: store.query_entries(conn, filters))
    except RequestError as error:
        return _error(error)
    body = "".join(json.dumps(e.query_record(), separators=(",", ":")) + "\n" for e in entries)
    return web.Response(text=body, content_type="application/x-ndjson")


async def stats(request: web.Request) -> web.Response:
    snapshot = request.app[AGGREGATES_KEY].snapshot()
    return web.json_response(
        snapshot.stats(capability=request.query.get("capability"), function=request.query.get("function")),
        dumps=_dumps,
    )


async def wm_search(request: web.Request) -> web.Response:
    """``?text=&tags=a,b&since=&until=&plan_id=&intent_id=&session_id=&limit=``: NDJSON, newest first."""
    path = request.app[WM_FILE_KEY]
    if not isinstance(path, Path):
        raise Unavailable("Working Memory is off (wm.enabled = false)")
    filters: dict[str, Any] = dict(request.query)
    for key in ("since", "until"):
        if key in filters:
            try:
                filters[key] = float(filters[key])
            except ValueError:
                raise InvalidRequest(f"{key} must be a number of seconds", field=key) from None
    if "limit" in filters:
        filters["limit"] = _int_param(request, "limit", 50)
    entries = await request.app[READ_KEY](lambda conn: wm_ops.search(path, filters))
    body = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)
    return web.Response(text=body, content_type="application/x-ndjson")


async def checkpoint(request: web.Request) -> web.Response:
    answer = await request.app[READ_KEY](
        lambda conn: snapshot(conn, lambda c: {"note": proofs.latest_checkpoint_note(c)})
    )
    return web.Response(text=answer["note"], content_type="text/plain")


async def proof_inclusion(request: web.Request) -> web.Response:
    """``?seq=N`` or ``?action_id=ID``: the C2SP tlog-proof, as text."""
    seq = _int_param(request, "seq", -1) if "seq" in request.query else None
    action_id = request.query.get("action_id")
    if (seq is None) == (action_id is None):
        raise InvalidRequest("give exactly one of seq or action_id")
    answer = await request.app[READ_KEY](
        lambda conn: snapshot(conn, proofs.inclusion, seq=seq, action_id=action_id)
    )
    return web.Response(text=answer["proof"], content_type="text/plain")


async def proof_consistency(request: web.Request) -> web.Response:
    """``?size1=A&size2=B`` (size2 defaults to the ledger's size): JSON as in the RFC 6962 vectors."""
    size1 = _int_param(request, "size1", 0)
    size2 = _int_param(request, "size2", 0) if "size2" in request.query else None
    answer = await request.app[READ_KEY](
        lambda conn: snapshot(conn, proofs.consistency, size1, size2)
    )
    return web.json_response(answer, dumps=_dumps)


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", field=name) from None


def _error(error: RequestError) -> web.Response:
    status = 404 if isinstance(error, NotFound) else 503 if isinstance(error, Unavailable) else 400
    return web.json_response({"ok": False, "error": error.to_wire()}, status=status)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except RequestError as error:
        return _error(error)
