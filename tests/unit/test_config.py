"""Configuration: defaults < TOML file < CCOS_OBSD_* environment (and CCOS's aliases) < overrides (flags).

Every problem is a ConfigError whose ``key`` names the offending key (or variable).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from ccos_obsd.config import ENV_ALIASES, KEYS, default_wm_sink, env_name, load_config
from ccos_obsd.errors import ConfigError

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "ccos-obsd.toml"


@pytest.fixture
def write_toml(tmp_path: Path) -> Any:
    def write(text: str) -> Path:
        path = tmp_path / "ccos-obsd.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def config_error(**kwargs: Any) -> ConfigError:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)
    return caught.value


# --- defaults


def test_defaults() -> None:
    config = load_config(environ={})
    assert config.state_dir == Path("var")
    assert config.socket.path == Path("var") / "ccos-obsd.sock"
    assert config.socket.mode == 0o660
    assert config.socket.group == ""
    assert config.socket.max_line_bytes == 1_048_576
    assert config.socket.max_batch == 10_000
    assert config.socket.max_connections == 1024
    assert config.socket.max_inflight == 1024
    assert config.socket.max_depth == 64
    assert config.http.enabled is True
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9898)
    assert config.ledger.max_group == 4096
    assert config.ledger.max_pending == 200_000
    assert config.signing.key_name == ""
    assert config.metrics.duration_buckets == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    assert config.log.level == "info"
    assert config.log.ring_size == 256
    assert config.actions.allow_custom_types is False


def test_config_is_frozen() -> None:
    config = load_config(environ={})
    with pytest.raises(AttributeError):
        config.state_dir = Path("/elsewhere")  # type: ignore[misc]


def test_shipped_config_file_loads_and_equals_the_embedded_defaults() -> None:
    assert load_config(SHIPPED_CONFIG, environ={}) == load_config(environ={})


def test_shipped_config_file_shows_every_key() -> None:
    document = tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    shown = {
        f"{section}.{key}" if isinstance(table, dict) else section
        for section, table in document.items()
        for key in (table if isinstance(table, dict) else [None])
    }
    assert shown == set(KEYS)


# --- precedence


def test_file_overrides_defaults(write_toml: Any, tmp_path: Path) -> None:
    path = write_toml(
        f"""
        state_dir = "{tmp_path / 'state'}"
        [socket]
        mode = "0640"
        max_batch = 50
        [http]
        listen = "[::1]:9000"
        enabled = false
        [metrics]
        duration_buckets = [0.5, 1, 2]
        [actions]
        allow_custom_types = true
        """
    )
    config = load_config(path, environ={})
    assert config.state_dir == tmp_path / "state"
    assert config.socket.path == tmp_path / "state" / "ccos-obsd.sock"
    assert config.socket.mode == 0o640
    assert config.socket.max_batch == 50
    assert (config.http.host, config.http.port, config.http.enabled) == ("::1", 9000, False)
    assert config.metrics.duration_buckets == (0.5, 1.0, 2.0)
    assert config.actions.allow_custom_types is True
    assert config.socket.max_connections == 1024  # untouched keys keep their default


def test_environment_overrides_file(write_toml: Any) -> None:
    path = write_toml("[socket]\nmax_batch = 50\n[log]\nlevel = 'debug'\n")
    environ = {"CCOS_OBSD_SOCKET_MAX_BATCH": "60", "CCOS_OBSD_HTTP_ENABLED": "no"}
    config = load_config(path, environ=environ)
    assert config.socket.max_batch == 60
    assert config.http.enabled is False
    assert config.log.level == "debug"


def test_overrides_beat_environment(write_toml: Any) -> None:
    path = write_toml("state_dir = 'from-file'\n")
    config = load_config(
        path,
        environ={"CCOS_OBSD_STATE_DIR": "from-env", "CCOS_OBSD_HTTP_LISTEN": "127.0.0.1:1"},
        overrides={"state_dir": "from-flag", "http.listen": None},
    )
    assert config.state_dir == Path("from-flag")
    # A flag left unset (None) does not override anything.
    assert config.http.port == 1


def test_environment_variable_names() -> None:
    assert env_name("socket.max_batch") == "CCOS_OBSD_SOCKET_MAX_BATCH"
    assert env_name("state_dir") == "CCOS_OBSD_STATE_DIR"


@pytest.mark.parametrize(
    ("key", "text", "attribute", "expected"),
    [
        ("socket.mode", "0640", ("socket", "mode"), 0o640),
        ("socket.max_depth", "100", ("socket", "max_depth"), 100),
        ("http.enabled", "false", ("http", "enabled"), False),
        ("http.enabled", "1", ("http", "enabled"), True),
        ("metrics.duration_buckets", "0.1, 1,10", ("metrics", "duration_buckets"), (0.1, 1.0, 10.0)),
        ("log.level", "WARNING", ("log", "level"), "warning"),
        ("actions.allow_custom_types", "yes", ("actions", "allow_custom_types"), True),
        ("signing.key_name", "host/obsd", ("signing", "key_name"), "host/obsd"),
    ],
)
def test_every_key_can_come_from_its_environment_variable(
    key: str, text: str, attribute: tuple[str, str], expected: Any
) -> None:
    config = load_config(environ={env_name(key): text})
    section, name = attribute
    assert getattr(getattr(config, section), name) == expected


def test_config_file_variable_and_foreign_variables_are_not_keys() -> None:
    environ = {"CCOS_OBSD_CONFIG": "/etc/ccos-obsd.toml", "CCOS_OTHER": "x", "PATH": "/bin"}
    assert load_config(environ=environ) == load_config(environ={})


# --- CCOS's own environment switches


@pytest.mark.parametrize(("alias", "text", "read"), [
    ("CCOS_WM_MAX_ENTRIES", "100", lambda c: c.wm.max_entries == 100),
    ("CCOS_WM_MAX_TOKENS", "5000", lambda c: c.wm.max_tokens == 5000),
    ("CCOS_ENABLE_WM_INGESTOR", "false", lambda c: c.wm.enabled is False and c.wm_sink is None),
    ("CCOS_LOG_BUFFER_CAPACITY", "1024", lambda c: c.log.ring_size == 1024),
])
def test_a_ccos_environment_switch_sets_its_key(alias: str, text: str, read: Any) -> None:
    assert read(load_config(environ={alias: text}))


def test_each_ccos_switch_is_an_alias_of_one_key() -> None:
    assert ENV_ALIASES == {"CCOS_WM_MAX_ENTRIES": "wm.max_entries", "CCOS_WM_MAX_TOKENS": "wm.max_tokens",
                           "CCOS_ENABLE_WM_INGESTOR": "wm.enabled", "CCOS_LOG_BUFFER_CAPACITY": "log.ring_size"}


@pytest.mark.parametrize(("alias", "key"), sorted(ENV_ALIASES.items()))
def test_the_ccos_obsd_variable_wins_over_the_ccos_alias(alias: str, key: str) -> None:
    ours, theirs = ("no", "yes") if key == "wm.enabled" else ("7", "9")
    both = load_config(environ={alias: theirs, env_name(key): ours})
    assert both == load_config(environ={env_name(key): ours})
    assert both != load_config(environ={alias: theirs})


def test_the_file_and_flags_rank_around_the_aliases(write_toml: Any) -> None:
    path = write_toml("[wm]\nmax_entries = 10\nenabled = false\n")
    from_environ = load_config(path, environ={"CCOS_WM_MAX_ENTRIES": "20", "CCOS_ENABLE_WM_INGESTOR": "1"})
    assert (from_environ.wm.max_entries, from_environ.wm.enabled) == (20, True)
    overridden = load_config(path, environ={"CCOS_WM_MAX_ENTRIES": "20"}, overrides={"wm.max_entries": "30"})
    assert overridden.wm.max_entries == 30


def test_a_bad_alias_value_names_its_key() -> None:
    error = config_error(environ={"CCOS_LOG_BUFFER_CAPACITY": "lots"})
    assert error.key == "log.ring_size"
    assert "'lots'" in str(error)


def test_explicit_socket_path(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"socket.path": str(tmp_path / "s.sock")})
    assert config.socket.path == tmp_path / "s.sock"


# --- errors name the key


def test_unknown_key_in_file(write_toml: Any) -> None:
    assert config_error(file=write_toml("[socket]\nmax_lines = 5\n")).key == "socket.max_lines"
    assert config_error(file=write_toml("[bogus]\nx = 1\n")).key == "bogus.x"
    assert config_error(file=write_toml("verbose = true\n")).key == "verbose"


def test_unknown_environment_variable() -> None:
    assert config_error(environ={"CCOS_OBSD_SOCKET_MAXBATCH": "5"}).key == "CCOS_OBSD_SOCKET_MAXBATCH"


def test_unknown_override() -> None:
    assert config_error(overrides={"socket.nope": 1}).key == "socket.nope"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[socket]\nmax_batch = '10x'", "socket.max_batch"),
        ("[socket]\nmax_batch = 1.5", "socket.max_batch"),
        ("[socket]\nmax_batch = true", "socket.max_batch"),
        ("[socket]\nmax_batch = 0", "socket.max_batch"),
        ("[socket]\nmax_line_bytes = 10", "socket.max_line_bytes"),
        ("[socket]\ngroup = 5", "socket.group"),
        ("[http]\nenabled = 'maybe'", "http.enabled"),
        ("[http]\nenabled = 1", "http.enabled"),
        ("[log]\nlevel = 'loud'", "log.level"),
        ("[signing]\nkey_name = 'has space'", "signing.key_name"),
        ("[signing]\nkey_name = 'a+b'", "signing.key_name"),
        ("[metrics]\nduration_buckets = []", "metrics.duration_buckets"),
        ("[metrics]\nduration_buckets = [1, 0.5]", "metrics.duration_buckets"),
        ("[metrics]\nduration_buckets = [0.5, 0.5]", "metrics.duration_buckets"),
        ("[metrics]\nduration_buckets = [0, 1]", "metrics.duration_buckets"),
        ("[metrics]\nduration_buckets = [1, inf]", "metrics.duration_buckets"),
        ("[metrics]\nduration_buckets = [1, nan]", "metrics.duration_buckets"),
        ("[metrics]\nduration_buckets = [1, true]", "metrics.duration_buckets"),
        ("[metrics]\nduration_buckets = ['a']", "metrics.duration_buckets"),
        ("state_dir = 1", "state_dir"),
        ("[actions]\nallow_custom_types = 'sometimes'", "actions.allow_custom_types"),
    ],
)
def test_wrong_type_or_value_in_file(write_toml: Any, toml: str, key: str) -> None:
    error = config_error(file=write_toml(toml + "\n"))
    assert error.key == key
    assert key in str(error)


@pytest.mark.parametrize("mode", ["0666", "0664", "0661", "0777", "0o667", "7"])
def test_socket_mode_giving_others_access_is_refused(mode: str) -> None:
    error = config_error(environ={"CCOS_OBSD_SOCKET_MODE": mode})
    assert error.key == "socket.mode"
    assert "others" in error.problem


@pytest.mark.parametrize("mode", ["rw-rw----", "0999", "01660", ""])
def test_socket_mode_must_be_an_octal_permission(mode: str) -> None:
    assert config_error(environ={"CCOS_OBSD_SOCKET_MODE": mode}).key == "socket.mode"


def test_socket_mode_from_toml_integer(write_toml: Any) -> None:
    assert load_config(write_toml("[socket]\nmode = 0o600\n"), environ={}).socket.mode == 0o600
    # 660 decimal is not 0o660: it is out of range for a permission.
    assert config_error(file=write_toml("[socket]\nmode = 660\n")).key == "socket.mode"


@pytest.mark.parametrize(
    "listen", ["127.0.0.1", "localhost:", ":9898", "127.0.0.1:http", "127.0.0.1:65536", "127.0.0.1:-1", ""]
)
def test_bad_http_listen(listen: str) -> None:
    assert config_error(overrides={"http.listen": listen}).key == "http.listen"


def test_socket_path_longer_than_a_unix_socket_allows() -> None:
    assert config_error(overrides={"socket.path": "/tmp/" + "x" * 120}).key == "socket.path"
    assert config_error(overrides={"state_dir": "/tmp/" + "x" * 120}).key == "socket.path"


def test_missing_or_invalid_file_names_the_config_option(tmp_path: Path, write_toml: Any) -> None:
    assert config_error(file=tmp_path / "absent.toml").key == "--config"
    assert config_error(file=write_toml("[socket\n")).key == "--config"


def test_error_message_says_what_was_given() -> None:
    error = config_error(environ={"CCOS_OBSD_SOCKET_MAX_BATCH": "lots"})
    assert error.key == "socket.max_batch"
    assert str(error).startswith("config socket.max_batch:")
    assert "'lots'" in str(error)


# --- where Working Memory lives


def test_working_memory_is_a_wm_sink_in_the_state_dir_by_default(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"state_dir": str(tmp_path)})
    assert config.wm_sink == default_wm_sink(tmp_path)
    assert config.wm_sink is not None and config.wm_sink.name == "wm"
    assert config.wm_path == tmp_path / "wm.db"


def test_a_configured_wm_sink_names_the_working_memory_file(write_toml: Any, tmp_path: Path) -> None:
    path = write_toml(
        f"""
        state_dir = "{tmp_path}"
        [[sinks]]
        type = "jsonl"
        name = "audit"
        path = "{tmp_path / 'audit.jsonl'}"
        [[sinks]]
        type = "wm"
        name = "memory"
        path = "{tmp_path / 'elsewhere.db'}"
        """
    )
    config = load_config(path, environ={})
    assert config.wm_sink is not None and config.wm_sink.name == "memory"
    assert config.wm_path == tmp_path / "elsewhere.db"


def test_with_working_memory_off_there_is_no_wm_sink_or_path() -> None:
    config = load_config(environ={"CCOS_OBSD_WM_ENABLED": "false"})
    assert config.wm_sink is None
    assert config.wm_path is None
