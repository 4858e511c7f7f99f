"""Binding the ingest socket and the HTTP port: our own, or the ones systemd passed."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import ssl
import stat
from collections.abc import Callable

import structlog
from aiohttp import web

from ccos_obsd.config import Config
from ccos_obsd.errors import StartupError
from ccos_obsd.log import lifecycle_log
from ccos_obsd.systemd import PassedSockets

log = structlog.get_logger("ccos_obsd.daemon")

HTTP_BACKLOG = 128


async def bind_ingest_socket(
    config: Config, passed: PassedSockets, protocol_factory: Callable[[], asyncio.Protocol]
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    if passed.names:
        lifecycle_log().info(
            "sockets_from_systemd", sockets={name: address(getattr(passed, name)) for name in passed.names}
        )
    if passed.http is not None and not config.http.enabled:
        log.warning("http_socket_unused", reason="http.enabled is false")
        passed.http.close()
        passed.http = None
    if passed.ingest is not None:
        # systemd made the socket file with the unit's SocketMode/SocketUser/SocketGroup and
        # keeps it across restarts: serve on it, never chmod, chown or unlink it.
        return await loop.create_unix_server(protocol_factory, sock=passed.ingest, backlog=1024)
    path = config.socket.path
    _remove_stale_socket(path)
    try:
        server = await loop.create_unix_server(protocol_factory, path=str(path), backlog=1024)
    except OSError as exc:
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    # Bound with the process umask; set the configured mode (and group) explicitly.
    os.chmod(path, config.socket.mode)
    if config.socket.group:
        try:
            gid = grp.getgrnam(config.socket.group).gr_gid
            os.chown(path, -1, gid)
        except (KeyError, OSError) as exc:
            server.close()
            raise StartupError(f"cannot give {path} to group {config.socket.group!r}: {exc}") from None
    return server


class HttpListener:
    """The HTTP port: its listening sockets, kept for the daemon's life, each served by an aiohttp site.

    The sockets are bound here (or passed by systemd) rather than by the sites, so
    that a reload with new TLS settings can start sites with the new SSL context on
    the same sockets before stopping the old ones: meanwhile connections wait in
    the backlog (none is refused), and those already open carry on with theirs.
    """

    def __init__(self, runner: web.AppRunner, sockets: list[socket.socket]) -> None:
        self._runner = runner
        self._sockets = sockets
        self._sites: list[web.SockSite] = []
        self._context: ssl.SSLContext | None = None

    @classmethod
    def bind(cls, config: Config, passed: PassedSockets, runner: web.AppRunner) -> HttpListener:
        if passed.http is not None:
            return cls(runner, [passed.http])
        try:
            return cls(runner, _bind_tcp(config.http.host, config.http.port))
        except OSError as exc:
            raise StartupError(f"cannot listen on http {config.http.host}:{config.http.port}: {exc.strerror}") from None

    @property
    def address(self) -> str:
        """The first socket's address as HOST:PORT (the bound port, for port 0)."""
        return address(self._sockets[0])

    async def serve(self, context: ssl.SSLContext | None) -> None:
        """Serve plain HTTP (None) or HTTPS with ``context`` from now on; a no-op for the context in use."""
        if self._sites and context is self._context:
            return
        # Each site owns (and closes when stopped) a duplicate of the socket; ours stays open.
        sites = [web.SockSite(self._runner, sock.dup(), ssl_context=context) for sock in self._sockets]
        for site in sites:
            await site.start()
        old, self._sites, self._context = self._sites, sites, context
        for site in old:
            await site.stop()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


def _bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to, as asyncio's create_server binds them."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(HTTP_BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _remove_stale_socket(path: os.PathLike[str]) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"{os.fspath(path)} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        os.unlink(path)  # left behind by a daemon that died
    else:
        raise StartupError(f"another process is listening on {os.fspath(path)}")
    finally:
        probe.close()


def address(sock: socket.socket | None) -> str:
    """A listening socket's address as logs show it: a path, or HOST:PORT."""
    if sock is None:
        return ""
    name = sock.getsockname()
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else name.decode(errors="replace")
    if isinstance(name, str):
        return name
    host, port = name[:2]
    return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"


def server_address(server: asyncio.AbstractServer) -> str:
    sockets = getattr(server, "sockets", ())
    return address(sockets[0]) if sockets else ""
