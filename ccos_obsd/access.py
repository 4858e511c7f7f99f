"""Who may use the socket: the peer's credentials against the uid and gid allow-lists.

The kernel reports the connecting process's uid, primary gid and pid
(``SO_PEERCRED``) and, on Linux >= 4.13, its supplementary groups
(``SO_PEERGROUPS``), as they were when it called ``connect()``: a client cannot
forge them. With both allow-lists empty everyone who can open the socket is
served; otherwise a peer is served when its uid is listed, or any of its groups
is. Root and the daemon's own uid are always served: they can read the state dir
and the signing key anyway, so refusing them protects nothing.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from ccos_obsd.config import SocketConfig

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


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The socket's allow-lists; replaced whole when the configuration is reloaded."""

    uids: frozenset[int]
    gids: frozenset[int]
    always: frozenset[int]
    """Uids served whatever the lists say: root and the daemon's own."""

    @classmethod
    def from_config(cls, config: SocketConfig) -> AccessPolicy:
        return cls(frozenset(config.allowed_uids), frozenset(config.allowed_gids), frozenset({0, os.geteuid()}))

    @property
    def open(self) -> bool:
        """Whether everyone who can open the socket is served."""
        return not self.uids and not self.gids

    def allows(self, peer: PeerCredentials | None) -> bool:
        if not self.uids and not self.gids:
            return True
        if peer is None:
            return False
        return peer.uid in self.uids or peer.uid in self.always or not self.gids.isdisjoint(peer.groups)
