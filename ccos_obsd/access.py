"""Who may do what on the socket: the peer's credentials against the role lists.

The kernel reports the connecting process's uid, primary gid and pid
(``SO_PEERCRED``) and, on Linux >= 4.13, its supplementary groups
(``SO_PEERGROUPS``), as they were when it called ``connect()``: a client cannot
forge them.

Each op has a role (``ops.TABLE``): *write* (appends), *read* (everything that
returns ledger content, logs, proofs or the head) or *admin* (key rotation,
backup, replay). Each role has a uid list and a gid list; a peer holds a role when
its uid is listed, or any of its groups is. The roles are independent: an agent
that may append cannot read what other agents did unless it is also given *read*.
With both write lists empty everyone who can open the socket may write (its mode
and group are then the only guard); empty read or admin lists give that role to
nobody else. Root and the daemon's own uid hold every role: they can read the
state dir and the signing key anyway, so refusing them protects nothing.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from ccos_obsd.config import SocketConfig

Role = Literal["write", "read", "admin"]

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
"""Linux's socket option number; Python's socket module does not name it."""
_PEERCRED = struct.Struct("3i")
_GID = struct.Struct("I")
_GROUPS_BUFFER = 256 * _GID.size
_GROUPS_MAX_BUFFER = 65536 * _GID.size  # NGROUPS_MAX


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    uid: int
    gid: int
    pid: int
    groups: frozenset[int]
    """Primary and supplementary gids (only the primary one where SO_PEERGROUPS is missing)."""

    def stamp(self) -> dict[str, int]:
        """What entries record about their sender (DESIGN.md's ``peer``)."""
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid}


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The kernel's view of the process at the other end of a Unix socket, or None."""
    try:
        pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    return PeerCredentials(uid, gid, pid, frozenset((gid, *_peer_groups(sock))))


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    size = _GROUPS_BUFFER
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < _GROUPS_MAX_BUFFER:
                size = _GROUPS_MAX_BUFFER
                continue
            return ()  # kernel without SO_PEERGROUPS: the primary gid still counts
        usable = len(raw) - len(raw) % _GID.size
        return tuple(gid for (gid,) in _GID.iter_unpack(raw[:usable]))


ROLE_KEYS: dict[Role, tuple[str, str]] = {
    "write": ("socket.allowed_uids", "socket.allowed_gids"),
    "read": ("socket.read_uids", "socket.read_gids"),
    "admin": ("socket.admin_uids", "socket.admin_gids"),
}
"""The config keys that list each role's uids and gids."""
ALL_ROLES: frozenset[Role] = frozenset(ROLE_KEYS)


@dataclass(frozen=True, slots=True)
class RoleList:
    uids: frozenset[int]
    gids: frozenset[int]
    open_when_empty: bool
    """Whether empty lists mean everyone (the write role) or nobody beyond root and the daemon's user."""

    def admits(self, peer: PeerCredentials | None) -> bool:
        if not self.uids and not self.gids:
            return self.open_when_empty
        return peer is not None and (peer.uid in self.uids or not self.gids.isdisjoint(peer.groups))


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The socket's role lists; replaced whole when the configuration is reloaded."""

    lists: dict[Role, RoleList]
    always: frozenset[int]
    """Uids that hold every role whatever the lists say: root and the daemon's own."""

    @classmethod
    def from_config(cls, config: SocketConfig) -> AccessPolicy:
        return cls({
            "write": RoleList(frozenset(config.allowed_uids), frozenset(config.allowed_gids), open_when_empty=True),
            "read": RoleList(frozenset(config.read_uids), frozenset(config.read_gids), open_when_empty=False),
            "admin": RoleList(frozenset(config.admin_uids), frozenset(config.admin_gids), open_when_empty=False),
        }, frozenset({0, os.geteuid()}))

    def roles(self, peer: PeerCredentials | None) -> frozenset[Role]:
        """The roles ``peer`` holds (None: credentials unknown, so only what is open to everyone)."""
        if peer is not None and peer.uid in self.always:
            return ALL_ROLES
        return frozenset(role for role, listed in self.lists.items() if listed.admits(peer))
