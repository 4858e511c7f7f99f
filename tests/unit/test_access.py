"""The socket's role lists: configuration and which roles a peer holds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ccos_obsd.access import ALL_ROLES, ROLE_KEYS, AccessPolicy, PeerCredentials, peer_credentials
from ccos_obsd.config import load_config
from ccos_obsd.errors import ConfigError


def policy(**lists: tuple[int, ...]) -> AccessPolicy:
    """A policy from ``allowed_uids=(...)``, ``read_gids=(...)`` and so on, through the config loader."""
    environ = {f"CCOS_OBSD_SOCKET_{key.upper()}": ",".join(map(str, ids)) for key, ids in lists.items()}
    return AccessPolicy.from_config(load_config(environ=environ).socket)


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


def test_every_role_list_parses_and_is_named_with_its_config_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[socket]\nread_uids = [1001]\nadmin_gids = [990]\n", encoding="utf-8")
    socket_config = load_config(path, environ={"CCOS_OBSD_SOCKET_READ_GIDS": "7,8"}).socket
    assert (socket_config.read_uids, socket_config.read_gids) == ((1001,), (7, 8))
    assert (socket_config.admin_uids, socket_config.admin_gids) == ((), (990,))
    assert ROLE_KEYS == {
        "write": ("socket.allowed_uids", "socket.allowed_gids"),
        "read": ("socket.read_uids", "socket.read_gids"),
        "admin": ("socket.admin_uids", "socket.admin_gids"),
    }
    for role, keys in ROLE_KEYS.items():
        for key in keys:
            with pytest.raises(ConfigError) as caught:
                load_config(environ={f"CCOS_OBSD_{key.upper().replace('.', '_')}": "x"})
            assert caught.value.key == key, role


def test_by_default_anyone_may_write_but_only_root_and_the_daemon_user_read_or_administer() -> None:
    default = policy()
    assert default.roles(peer(4001, 4001)) == {"write"}
    assert default.roles(None) == {"write"}
    assert default.roles(peer(0, 0)) == ALL_ROLES
    assert default.roles(peer(os.geteuid(), 100)) == ALL_ROLES


def test_a_listed_uid_or_any_listed_group_holds_the_role() -> None:
    restricted = policy(allowed_uids=(4000,), allowed_gids=(4242,))
    assert restricted.roles(peer(4000, 100)) == {"write"}
    assert restricted.roles(peer(4001, 4242)) == {"write"}
    assert restricted.roles(peer(4001, 100, 7, 4242)) == {"write"}
    assert restricted.roles(peer(4001, 100, 7)) == set()
    assert restricted.roles(None) == set()


def test_the_roles_are_independent() -> None:
    lists = policy(allowed_uids=(4000,), read_uids=(4001,), read_gids=(500,), admin_uids=(4002,))
    assert lists.roles(peer(4000, 100)) == {"write"}
    assert lists.roles(peer(4001, 100)) == {"read"}
    assert lists.roles(peer(4003, 100, 500)) == {"read"}
    assert lists.roles(peer(4002, 100)) == {"admin"}
    assert lists.roles(peer(4002, 100, 500)) == {"read", "admin"}
    both = policy(read_uids=(4001,))  # empty write lists: everyone writes, readers too
    assert both.roles(peer(4001, 100)) == {"write", "read"}


def test_root_and_the_daemons_own_uid_hold_every_role_whatever_the_lists() -> None:
    restricted = policy(allowed_uids=(4000,), read_uids=(4000,), admin_uids=(4000,))
    assert restricted.roles(peer(0, 0)) == ALL_ROLES
    assert restricted.roles(peer(os.geteuid(), 100)) == ALL_ROLES
    assert {"write", "read", "admin"} == ALL_ROLES


def test_credentials_of_a_socket_pair_name_this_process() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        credentials = peer_credentials(left)
    assert credentials is not None
    assert (credentials.uid, credentials.gid, credentials.pid) == (os.geteuid(), os.getegid(), os.getpid())
    assert credentials.gid in credentials.groups
    assert set(os.getgroups()) <= credentials.groups
    assert credentials.stamp() == {"uid": os.geteuid(), "gid": os.getegid(), "pid": os.getpid()}
