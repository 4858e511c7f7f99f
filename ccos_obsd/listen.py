"""Binding the ingest socket and the HTTP port: our own, or the ones systemd passed."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import Callable

import structlog
from aiohttp import web

from ccos_obsd.config import Config
from ccos_obsd.errors import StartupError
from ccos_obsd.log import lifecycle_log
from ccos_obsd.systemd import PassedSockets

log = structlog.get_logger("ccos_obsd.daemon")


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


async def bind_http(config: Config, passed: PassedSockets, runner: web.AppRunner) -> str:
    """Start serving ``runner``; answers the bound address as HOST:PORT."""
    site: web.BaseSite
    if passed.http is not None:
        site = web.SockSite(runner, passed.http)
    else:
        site = web.TCPSite(runner, config.http.host, config.http.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on http {config.http.host}:{config.http.port}: {exc.strerror}") from None
    server = site._server  # the bound port is only known after start (port 0 in tests)
    if not isinstance(server, asyncio.Server):
        raise StartupError("http server did not start")
    return address(server.sockets[0])


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
