"""The socket's allow-lists: configuration and the admission rule."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ccos_obsd.access import AccessPolicy, PeerCredentials, peer_credentials
from ccos_obsd.config import load_config
from ccos_obsd.errors import ConfigError


def policy(uids: tuple[int, ...] = (), gids: tuple[int, ...] = ()) -> AccessPolicy:
    socket_config = load_config(environ={
        "CCOS_OBSD_SOCKET_ALLOWED_UIDS": ",".join(map(str, uids)),
        "CCOS_OBSD_SOCKET_ALLOWED_GIDS": ",".join(map(str, gids)),
    }).socket
    return AccessPolicy.from_config(socket_config)


def peer(uid: int, gid: int, *groups: int) -> PeerCredentials:
    return PeerCredentials(uid, gid, 1234, frozenset((gid, *groups)))


def test_the_lists_default_to_empty_and_parse_from_toml_and_environment(tmp_path: Path) -> None:
    assert load_config(environ={}).socket.allowed_uids == ()
    config = load_config(environ={"CCOS_OBSD_SOCKET_ALLOWED_UIDS": " 1001, 1000,1001 "})
    assert config.socket.allowed_uids == (1000, 1001)
    path = tmp_path / "c.toml"
    path.write_text("[socket]\nallowed_gids = [990, 4242]\n", encoding="utf-8")
    assert load_config(path, environ={}).socket.allowed_gids == (990, 4242)


@pytest.mark.parametrize("value", ["root", "1000,x", "-1", "4294967295", "1.5"])
def test_a_bad_id_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"CCOS_OBSD_SOCKET_ALLOWED_GIDS": value})
    assert caught.value.key == "socket.allowed_gids"


def test_a_toml_list_of_strings_or_a_scalar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[socket]\nallowed_uids = 1000\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.key == "socket.allowed_uids"


def test_empty_lists_admit_everyone_even_without_credentials() -> None:
    open_policy = policy()
    assert open_policy.open
    assert open_policy.allows(peer(4001, 4001)) and open_policy.allows(None)


def test_a_listed_uid_or_any_listed_group_admits() -> None:
    restricted = policy(uids=(4000,), gids=(4242,))
    assert not restricted.open
    assert restricted.allows(peer(4000, 100))
    assert restricted.allows(peer(4001, 4242))
    assert restricted.allows(peer(4001, 100, 7, 4242))
    assert not restricted.allows(peer(4001, 100, 7))
    assert not restricted.allows(None)


def test_root_and_the_daemons_own_uid_are_always_admitted() -> None:
    restricted = policy(uids=(4000,))
    assert restricted.allows(peer(0, 0))
    assert restricted.allows(peer(os.geteuid(), 100))


def test_credentials_of_a_socket_pair_name_this_process() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        credentials = peer_credentials(left)
    assert credentials is not None
    assert (credentials.uid, credentials.gid, credentials.pid) == (os.geteuid(), os.getegid(), os.getpid())
    assert credentials.gid in credentials.groups
    assert set(os.getgroups()) <= credentials.groups
    assert credentials.stamp() == {"uid": os.geteuid(), "gid": os.getegid(), "pid": os.getpid()}
