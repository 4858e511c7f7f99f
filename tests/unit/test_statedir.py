"""The state dir's privacy check at start-up: what is checked, what is allowed, what names the path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccos_obsd.config import Config, load_config, prepare_paths
from ccos_obsd.errors import StartupError
from ccos_obsd.statedir import check_private

OTHER_UID = 4000


def config_for(state_dir: Path, **environ: str) -> Config:
    return load_config(environ=environ, overrides={"state_dir": str(state_dir)})


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory


def refusal(config: Config) -> str:
    with pytest.raises(StartupError) as caught:
        check_private(config)
    return str(caught.value)


def test_a_state_dir_made_by_prepare_paths_passes_under_any_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        config = config_for(tmp_path / "fresh" / "nested")
        prepare_paths(config)
    finally:
        os.umask(previous)
    assert (config.state_dir.stat().st_mode & 0o777) == 0o700
    check_private(config)


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o740, 0o720, 0o702, 0o704, 0o777])
def test_a_state_dir_group_or_others_can_list_or_change_is_refused(state_dir: Path, mode: int) -> None:
    state_dir.chmod(mode)
    message = refusal(config_for(state_dir))
    assert message == (f"{state_dir} has mode {mode:04o}: group or others can read or change it "
                       f"(chmod go-rw {state_dir})")


@pytest.mark.parametrize("mode", [0o700, 0o710, 0o711, 0o500])
def test_search_permission_alone_is_allowed_so_a_socket_inside_stays_reachable(state_dir: Path, mode: int) -> None:
    state_dir.chmod(mode)
    try:
        check_private(config_for(state_dir))
    finally:
        state_dir.chmod(0o700)


@pytest.mark.parametrize("name", [
    "ledger.db", "ledger.db-wal", "ledger.db-shm", "wm.db", "wm.db-wal", "wm.db-shm",
    "signing.key", "redact.key", "signing.key.new", "old-keys.bak",
])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_a_database_or_key_file_with_any_group_or_other_bit_is_refused(state_dir: Path, name: str, mode: int) -> None:
    path = state_dir / name
    path.write_bytes(b"")
    path.chmod(mode)
    message = refusal(config_for(state_dir))
    assert message == f"{path} has mode {mode:04o}: group or others can access it (chmod go-rwx {path})"


def test_private_files_and_other_files_pass(state_dir: Path) -> None:
    for name in ("ledger.db", "ledger.db-wal", "wm.db", "signing.key", "redact.key"):
        (state_dir / name).write_bytes(b"")
        (state_dir / name).chmod(0o600)
    (state_dir / "readonly.key").write_bytes(b"")
    (state_dir / "readonly.key").chmod(0o400)
    (state_dir / "notes.txt").write_bytes(b"")
    (state_dir / "notes.txt").chmod(0o644)  # not a database, no "key" in its name: not checked
    (state_dir / "keys").mkdir(mode=0o755)  # a directory: not a key file
    check_private(config_for(state_dir))


def test_working_memory_kept_outside_the_state_dir_is_checked_where_it_is(state_dir: Path, tmp_path: Path) -> None:
    wm = tmp_path / "elsewhere" / "recall.db"
    wm.parent.mkdir()
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'[[sinks]]\ntype = "wm"\nname = "wm"\npath = "{wm}"\n', encoding="utf-8")
    config = load_config(config_file, environ={}, overrides={"state_dir": str(state_dir)})
    assert config.wm_path == wm
    Path(f"{wm}-shm").write_bytes(b"")
    Path(f"{wm}-shm").chmod(0o644)
    assert refusal(config).startswith(f"{wm}-shm has mode 0644")
    Path(f"{wm}-shm").chmod(0o600)
    check_private(config)


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a file to another uid: needs root")
@pytest.mark.parametrize("name", [None, "ledger.db", "signing.key"])
def test_a_state_dir_or_file_owned_by_another_user_is_refused(state_dir: Path, name: str | None) -> None:
    path = state_dir if name is None else state_dir / name
    if name is not None:
        path.write_bytes(b"")
        path.chmod(0o600)
    os.chown(path, OTHER_UID, OTHER_UID)
    message = refusal(config_for(state_dir))
    assert message == (f"{path} is owned by uid {OTHER_UID}, who can read it: it must belong to the "
                       f"daemon's user (uid {os.geteuid()}) or root")
