"""The read-only HTTP side: /metrics, /healthz and the JSON read API, as thin adapters over the op table.

Every route is GET (aiohttp answers 405 to anything else). A read route turns the
path and query string into an op request (strings become the integers and
numbers the op expects), runs the op (``ccos_obsd.ops``: the same parsing and
checks as the socket) and shapes its answer: JSON, NDJSON or text. /metrics is
rendered by the renderer process (``ccos_obsd.metrics.render``).

Who may read what is decided here, in one middleware (``_access``), from the
route table's ``content``/``open`` column and the web config in force
(``HttpAccess.web``, replaced on reload). Content routes return what the agents
logged, so they are refused (401) unless HTTP authentication is configured; with
``basic_auth_users`` set, every route needs a user, as exporter-toolkit does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any, Literal

import structlog
from aiohttp import BasicAuth, hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ccos_obsd.errors import InvalidRequest, RequestError
from ccos_obsd.metrics.render import Renderer
from ccos_obsd.ops import Answer, Ops
from ccos_obsd.webconfig import WebConfig

log = structlog.get_logger("ccos_obsd.http")

OPS_KEY = web.AppKey("ops", Ops)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
RENDER_POOL_KEY = web.AppKey("render_pool", Executor)
RENDERER_KEY = web.AppKey("renderer", object)  # a Renderer (its own process), or None: render on a thread here
CONTENT_ROUTES_KEY = web.AppKey("content_routes", frozenset[str])

Access = Literal["content", "open"]
"""``content``: the route returns ledger or Working Memory content, log lines or entry bytes
(served only to an authenticated client); ``open``: it returns none (served to anyone unless
``basic_auth_users`` is set)."""

REALM = 'Basic realm="ccos-obsd"'

_STATUS = {"not_found": 404, "unavailable": 503, "forbidden": 403, "internal": 500}
"""HTTP status of an error answer's code; every other code is the client's mistake (400)."""

LOG_HEADERS = {"last": "Ccos-Log-Last", "missed": "Ccos-Log-Missed"}
"""The ``logs`` answer's line numbers, as headers beside the NDJSON lines (for ``after``)."""

Shape = Callable[[Answer], web.Response]
Params = Callable[[web.Request], dict[str, Any]]


class HttpAccess:
    """The web config in force (``web``: replaced on reload) and the one bcrypt run at a time."""

    def __init__(self, web_config: WebConfig | None) -> None:
        self.web = web_config
        # One bcrypt run at a time, as exporter-toolkit does: a flood of wrong passwords
        # takes one core, not all, and scrapes with a remembered password skip the queue.
        self._bcrypt = asyncio.Lock()

    def summary(self) -> dict[str, Any]:
        """For the log: TLS, client certificates, users, and who gets the content routes."""
        web_config = self.web
        tls = web_config.tls if web_config is not None else None
        users = len(web_config.users) if web_config is not None else 0
        client_auth = tls.client_auth_type if tls is not None else "NoClientCert"
        content = ("basic_auth" if users else "client_certificate" if client_auth != "NoClientCert"
                   else "refused (set http.web_config)")
        return {"tls": tls is not None, "client_auth": client_auth, "users": users, "content_routes": content}

    async def refusal(self, request: web.Request, content: bool) -> str | None:
        """Why ``request`` is not served (None: it is)."""
        web_config = self.web
        if web_config is not None and web_config.users:
            if await self._password_ok(web_config, request):
                return None
            return "this port needs a user and password from http.web_config's basic_auth_users"
        if not content or _verified_client_cert(request):
            return None
        return (f"{request.path} returns ledger content and is served only with HTTP authentication: set "
                "http.web_config to a web configuration file with basic_auth_users (or client certificates: "
                "tls_server_config.client_auth_type RequireAndVerifyClientCert)")

    async def _password_ok(self, web_config: WebConfig, request: web.Request) -> bool:
        header = request.headers.get(hdrs.AUTHORIZATION)
        if header is None:
            return False
        try:
            credentials = BasicAuth.decode(header, encoding="utf-8")
        except ValueError:
            return False
        passwords, user, password = web_config.passwords, credentials.login, credentials.password
        if passwords.cached(user, password):
            return True
        async with self._bcrypt:
            # Checked again: a request that held the lock may just have passed with this password.
            matches = passwords.cached(user, password) or await asyncio.to_thread(passwords.check, user, password)
        if not matches:
            log.warning("http_bad_password", user=user, path=request.path, remote=request.remote)
        return matches


def _verified_client_cert(request: web.Request) -> bool:
    """Whether the connection's client sent a certificate that the client CA verified."""
    # ssl answers an empty dict for a certificate it did not verify, None for none.
    return request.transport is not None and bool(request.transport.get_extra_info("peercert"))


ACCESS_KEY = web.AppKey("access", HttpAccess)


def build_app(
    ops: Ops, registry: CollectorRegistry, render_pool: Executor, renderer: Renderer | None = None,
    access: HttpAccess | None = None,
) -> web.Application:
    app = web.Application(middlewares=[_access, _errors])
    app[OPS_KEY] = ops
    app[REGISTRY_KEY] = registry
    app[RENDER_POOL_KEY] = render_pool
    app[RENDERER_KEY] = renderer
    app[ACCESS_KEY] = access or HttpAccess(None)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    # Which routes return content (README "HTTP read API" has this table for users).
    read_routes: list[tuple[str, Access, str, Params, Shape]] = [
        ("/v1/logs", "content", "logs", _query(ints=("n", "after")), _ndjson("lines", LOG_HEADERS)),
        ("/v1/entries/{seq}", "content", "get", _path("seq", int), _json("record")),
        ("/v1/actions/{action_id}", "content", "get", _path("action_id", str), _json("record")),
        ("/v1/query", "content", "query", _query(ints=("since_ms", "until_ms", "after_seq", "limit")),
         _ndjson("records")),
        ("/v1/stats", "content", "stats", _query(), _json()),
        ("/v1/checkpoint", "open", "checkpoint", _query(), _text("checkpoint")),
        ("/v1/wm/search", "content", "wm_search", _query(ints=("limit",), numbers=("since", "until")),
         _ndjson("entries")),
        ("/v1/proof/inclusion", "content", "prove_inclusion", _query(ints=("seq",)), _text("proof")),
        ("/v1/proof/consistency", "open", "prove_consistency", _query(ints=("size1", "size2")), _json()),
    ]
    for path, _, op, params, shape in read_routes:
        app.router.add_get(path, _read_route(op, params, shape))
    app[CONTENT_ROUTES_KEY] = frozenset(path for path, access, *_ in read_routes if access == "content")
    return app


async def metrics(request: web.Request) -> web.Response:
    accept = request.headers.get("Accept", "")
    renderer = request.app[RENDERER_KEY]
    loop = asyncio.get_running_loop()
    if isinstance(renderer, Renderer):
        body, content_type = await loop.run_in_executor(request.app[RENDER_POOL_KEY], renderer.render, accept)
    else:
        encoder, content_type = choose_encoder(accept)
        body = await loop.run_in_executor(request.app[RENDER_POOL_KEY], encoder, request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": content_type})


async def healthz(request: web.Request) -> web.Response:
    answer = await request.app[OPS_KEY].call("ping", {})
    return web.json_response({"status": "ok", "entries": answer["head"]})


def _read_route(op: str, params: Params, shape: Shape) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        answer = await request.app[OPS_KEY].call(op, params(request))
        if not answer.get("ok"):
            return _error_response(answer)
        return shape(answer)

    handler.__name__ = f"http_{op}"
    return handler


# --- request: path and query string to op fields


def _path(name: str, kind: type[int] | type[str]) -> Params:
    def params(request: web.Request) -> dict[str, Any]:
        return {name: _typed(name, request.match_info[name], kind)}

    return params


def _query(ints: Iterable[str] = (), numbers: Iterable[str] = ()) -> Params:
    kinds: dict[str, type[int] | type[float]] = {**dict.fromkeys(numbers, float), **dict.fromkeys(ints, int)}

    def params(request: web.Request) -> dict[str, Any]:
        return {key: _typed(key, value, kinds.get(key, str)) for key, value in request.query.items()}

    return params


def _typed(name: str, raw: str, kind: type[int] | type[float] | type[str]) -> Any:
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number of seconds"
        raise InvalidRequest(f"{name} must be {what}", field=name) from None


# --- answer: op answer to HTTP body


def _json(key: str | None = None) -> Shape:
    def shape(answer: Answer) -> web.Response:
        body = answer[key] if key is not None else {k: v for k, v in answer.items() if k != "ok"}
        return web.json_response(body, dumps=_dumps)

    return shape


def _ndjson(key: str, headers: dict[str, str] | None = None) -> Shape:
    """``answer[key]`` one item per line; ``headers`` maps other answer fields to response headers."""

    def shape(answer: Answer) -> web.Response:
        body = "".join(_dumps(item) + "\n" for item in answer[key])
        extra = {header: str(answer[field]) for field, header in (headers or {}).items() if field in answer}
        return web.Response(text=body, content_type="application/x-ndjson", headers=extra)

    return shape


def _text(key: str) -> Shape:
    def shape(answer: Answer) -> web.Response:
        return web.Response(text=answer[key], content_type="text/plain")

    return shape


def _error_response(answer: Answer) -> web.Response:
    status = _STATUS.get(answer["error"]["code"], 400)
    return web.json_response({"ok": False, "error": answer["error"]}, status=status)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@web.middleware
async def _access(request: web.Request, handler: Any) -> web.StreamResponse:
    """401 with a JSON error naming what to configure, for a request ``HttpAccess`` refuses."""
    resource = request.match_info.route.resource
    content = resource is not None and resource.canonical in request.app[CONTENT_ROUTES_KEY]
    refusal = await request.app[ACCESS_KEY].refusal(request, content)
    if refusal is not None:
        body = {"ok": False, "error": {"code": "unauthorized", "message": refusal}}
        return web.json_response(body, status=401, headers={hdrs.WWW_AUTHENTICATE: REALM})
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except RequestError as error:
        return _error_response({"ok": False, "error": error.to_wire()})
