"""The two systemd protocols the daemon speaks, without libsystemd.

- Readiness and status (``sd_notify``): datagrams such as ``READY=1`` or
  ``WATCHDOG=1`` sent to the socket named by ``$NOTIFY_SOCKET`` (a path, or an
  abstract address when it starts with ``@``). Without that variable every
  notification is a no-op, so the daemon runs the same under any supervisor.
- Socket activation (``sd_listen_fds_with_names``): listening sockets passed
  from fd 3 on, described by ``$LISTEN_PID``, ``$LISTEN_FDS`` and
  ``$LISTEN_FDNAMES``.

Both follow systemd's own reading of the variables (sd-daemon.c), including the
checks that they were meant for this process (``LISTEN_PID``, ``WATCHDOG_PID``).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from ccos_obsd.errors import SystemdEnvironmentError

LISTEN_FDS_START = 3
UNKNOWN_FD_NAME = "unknown"
"""The name sd_listen_fds_with_names gives an fd when $LISTEN_FDNAMES does not name it."""


@dataclass(frozen=True)
class ListenFd:
    """One socket passed by the service manager: its fd number and its FileDescriptorName=."""

    fd: int
    name: str


def listen_fds(environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = True) -> list[ListenFd]:
    """The sockets passed to this process, in order; empty when there are none.

    The variables are removed from the environment (unless ``unset_environment``
    is false) whether or not they were meant for this process, so that nothing
    this process starts mistakes them for its own; each fd gets FD_CLOEXEC for
    the same reason.
    """
    env = os.environ if environ is None else environ
    try:
        pid_text = env.get("LISTEN_PID")
        count_text = env.get("LISTEN_FDS")
        names_text = env.get("LISTEN_FDNAMES")
        if pid_text is None or count_text is None:
            return []
        try:
            pid = int(pid_text)
            count = int(count_text)
        except ValueError:
            raise SystemdEnvironmentError(
                f"LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r} are not numbers"
            ) from None
        if pid != os.getpid():
            return []  # meant for a parent that exec'd us without cleaning up
        if count < 0:
            raise SystemdEnvironmentError(f"LISTEN_FDS={count} is negative")
        names = names_text.split(":") if names_text else []
        if names and len(names) != count:
            raise SystemdEnvironmentError(f"LISTEN_FDNAMES has {len(names)} names for {count} fds")
        passed = []
        for i in range(count):
            fd = LISTEN_FDS_START + i
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)  # raises OSError (EBADF) if it was not passed
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            passed.append(ListenFd(fd, names[i] if names and names[i] else UNKNOWN_FD_NAME))
        return passed
    finally:
        if unset_environment:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(name, None)


def notify_address(value: str) -> str | bytes:
    """The address ``$NOTIFY_SOCKET`` names: a path, or an abstract one for a leading ``@``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds within which the manager expects ``WATCHDOG=1``, or None when not asked to ping.

    ``$WATCHDOG_USEC`` sets it; ``$WATCHDOG_PID``, when present, must be this process.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class Notifier:
    """Sends ``sd_notify`` messages; silently does nothing when not run under a manager."""

    def __init__(self, address: str | None) -> None:
        self._address = notify_address(address) if address else None
        self._socket: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``NAME=value`` lines in one datagram, e.g. ``notify(READY=1, STATUS="...")``.

        Returns whether a manager was told. A failure to send is not an error of the
        daemon's work: it returns False and the caller carries on.
        """
        if self._address is None:
            return False
        message = "".join(f"{name}={value}\n" for name, value in fields.items()).encode()
        try:
            if self._socket is None:
                # Non-blocking: a manager that does not read must not stall the event loop;
                # the next status or watchdog message follows anyway.
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(message, self._address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@dataclass
class PassedSockets:
    """The daemon's listening sockets when the service manager passed them.

    The daemon names its sockets ``ingest`` (the Unix socket agents write to) and
    ``http`` (``/metrics`` and the read API), as the units' FileDescriptorName= do.
    An fd with another name (``unknown`` from ``systemd-socket-activate`` without
    ``--fdname``, or a .socket unit's own name when it sets no FileDescriptorName=)
    is taken by its address family: a Unix stream socket is ``ingest``, a TCP one
    is ``http``.
    """

    ingest: socket.socket | None = None
    http: socket.socket | None = None

    @property
    def names(self) -> list[str]:
        return [name for name in ("ingest", "http") if getattr(self, name) is not None]

    @classmethod
    def from_fds(cls, fds: list[ListenFd]) -> PassedSockets:
        """Wrap and check the passed fds; raises ValueError for one the daemon cannot serve on."""
        passed = cls()
        for listen_fd in fds:
            sock = socket.socket(fileno=listen_fd.fd)
            role = listen_fd.name
            if role not in ("ingest", "http"):
                role = "ingest" if sock.family == socket.AF_UNIX else "http"
            wanted = (socket.AF_UNIX,) if role == "ingest" else (socket.AF_INET, socket.AF_INET6)
            problem = None
            if sock.family not in wanted or sock.type != socket.SOCK_STREAM:
                kind = "a Unix stream socket" if role == "ingest" else "a TCP socket"
                problem = f"fd {listen_fd.fd} ({listen_fd.name}) is passed as {role!r} but is not {kind}"
            elif getattr(passed, role) is not None:
                problem = f"fd {listen_fd.fd} ({listen_fd.name}) is a second socket for {role!r}"
            if problem is not None:
                sock.close()
                passed.close()
                raise ValueError(problem)
            setattr(passed, role, sock)
        return passed

    def close(self) -> None:
        for sock in (self.ingest, self.http):
            if sock is not None:
                sock.close()
