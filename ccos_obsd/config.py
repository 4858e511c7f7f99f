"""Configuration: one frozen ``Config``, loaded and validated in one place.

Precedence: embedded defaults < TOML file < ``CCOS_OBSD_*`` environment
variables (and CCOS's own names for four of them: ``ENV_ALIASES``) < command-line
flags. Every problem raises ``ConfigError`` naming the
key; only the command line turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ccos_obsd.actions import ACTION_FIELDS, STRING_FIELDS
from ccos_obsd.errors import ConfigError
from ccos_obsd.log import LEVELS
from ccos_obsd.metrics.aggregates import DEFAULT_DURATION_BUCKETS

if TYPE_CHECKING:
    from ccos_obsd.webconfig import WebConfig  # which reads a Config: imported for the type only

ENV_PREFIX = "CCOS_OBSD_"
ENV_CONFIG_FILE = "CCOS_OBSD_CONFIG"
SOCKET_FILE = "ccos-obsd.sock"
WM_FILE = "wm.db"
_MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class SocketConfig:
    path: Path
    mode: int
    group: str
    max_line_bytes: int
    max_batch: int
    max_connections: int
    max_inflight: int
    max_depth: int
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    """The write role: peers allowed to append (both empty: anyone who can open the socket)."""
    read_uids: tuple[int, ...] = ()
    read_gids: tuple[int, ...] = ()
    """The read role (both empty: root and the daemon's own user only)."""
    admin_uids: tuple[int, ...] = ()
    admin_gids: tuple[int, ...] = ()
    """The admin role (both empty: root and the daemon's own user only)."""


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool
    host: str
    port: int
    web_config: Path | None = None
    """``http.web_config``: the exporter-toolkit web configuration file (TLS, basic auth), or None."""
    web: WebConfig | None = None
    """That file's content, read by the daemon only (``webconfig.read_web_config``, at start and
    on every reload); None in the commands that talk to the socket, which never need it."""


@dataclass(frozen=True)
class LedgerConfig:
    max_group: int
    max_pending: int
    verify_tail: int = 1000
    """Entries re-verified at start-up, from the head backwards (0: none)."""


@dataclass(frozen=True)
class SigningConfig:
    key_name: str
    mode: Literal["entry", "checkpoint"]


@dataclass(frozen=True)
class CheckpointConfig:
    interval_s: float


@dataclass(frozen=True)
class MetricsConfig:
    duration_buckets: tuple[float, ...]
    max_label_values: int
    snapshot_interval_s: float
    created_series: bool = False
    max_open_calls: int = 65_536


@dataclass(frozen=True)
class LogConfig:
    level: str
    ring_size: int


@dataclass(frozen=True)
class ActionsConfig:
    allow_custom_types: bool


@dataclass(frozen=True)
class WmConfig:
    enabled: bool
    max_entries: int
    max_tokens: int
    linger_ms: int = 100
    """How long the WM sink may wait for more commits to deliver in one transaction (0 to 100 ms)."""


@dataclass(frozen=True)
class BackupConfig:
    allow_socket: bool
    """Whether the ``backup`` socket op may make the daemon write a copy of its state."""


@dataclass(frozen=True)
class RedactRule:
    """One ``[[redact]]`` table: what it replaces (field paths, or a pattern) and how (see ``ccos_obsd.redact``)."""

    name: str
    paths: tuple[tuple[str, ...], ...] = ()
    """Field paths, split at the dots; ``*`` matches any one key or list index."""
    pattern: re.Pattern[str] | None = None
    """Searched in every string value; only the matched span is replaced."""
    hash: bool = False
    """Replace by ``[redacted:NAME:hmac-sha256:HEX]`` (keyed by ``redact.key``) instead of ``[redacted:NAME]``."""


@dataclass(frozen=True)
class NatsOptions:
    """A ``nats`` sink's JetStream stream: the servers, its names, and its settings when the sink creates it."""

    servers: tuple[str, ...]
    stream: str = "CCOS_LEDGER"
    subject: str = "ccos.ledger"
    replicas: int = 1
    max_age_s: float = 0.0
    """0: entries are kept for ever."""
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        """For the sink host's setup line (:meth:`from_json` reads it back)."""
        return {**dataclasses.asdict(self), "servers": list(self.servers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NatsOptions:
        return cls(**{**data, "servers": tuple(data["servers"])})


@dataclass(frozen=True)
class SinkConfig:
    """One ``[[sinks]]`` table: its type, its name, and the type's options."""

    type: Literal["wm", "jsonl", "nats"]
    name: str
    batch: int
    path: Path
    max_bytes: int = 64 * 2**20
    keep: int = 5
    nats: NatsOptions | None = None


@dataclass(frozen=True)
class Config:
    state_dir: Path
    socket: SocketConfig
    http: HttpConfig
    ledger: LedgerConfig
    signing: SigningConfig
    checkpoint: CheckpointConfig
    metrics: MetricsConfig
    log: LogConfig
    actions: ActionsConfig
    wm: WmConfig
    sinks: tuple[SinkConfig, ...]
    backup: BackupConfig = BackupConfig(allow_socket=False)
    redact: tuple[RedactRule, ...] = ()

    @property
    def wm_sink(self) -> SinkConfig | None:
        """The Working Memory sink (the first of type ``wm``), or None when ``wm.enabled`` is off."""
        return next((sink for sink in self.sinks if sink.type == "wm"), None)

    @property
    def wm_path(self) -> Path | None:
        """The Working Memory store file, or None when ``wm.enabled`` is off."""
        sink = self.wm_sink
        return None if sink is None else sink.path


def default_wm_sink(state_dir: Path) -> SinkConfig:
    """The Working Memory sink when the config names none: ``wm.db`` in the state dir."""
    return SinkConfig(type="wm", name="wm", batch=1000, path=state_dir / WM_FILE)


# --- the keys: name -> (default, parser). Parsers take a value from TOML or from a
# string (environment, flags) and return the typed value or raise ValueError.


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str):
            value = int(value.strip(), 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be true or false")
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _path(value: Any) -> str:
    text = _str(value)
    if "\x00" in text:
        raise ValueError("must not contain NUL")
    return text


def _mode(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip(), 8)
        except ValueError:
            raise ValueError("must be an octal mode such as \"0660\"") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError("must be an octal mode such as \"0660\"")
    if value & 0o007:
        raise ValueError("must not give others access (write access to the socket is write access to the ledger)")
    return value


def _listen(value: Any) -> tuple[str, int]:
    host, sep, port = _str(value).rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9898")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError("port must be a number") from None
    if not 0 <= number <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return host, number


def _ids(value: Any) -> tuple[int, ...]:
    """A list of uids or gids: a TOML array of integers, or "1000,1001" from the environment."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ValueError("must be a list of numeric ids, e.g. [1000, 1001]")
    ids = []
    for item in value:
        try:
            number = int(item) if isinstance(item, str) else item
        except ValueError:
            raise ValueError(f"{item!r} is not a numeric id") from None
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**32 - 1:
            raise ValueError(f"{item!r} is not a numeric id")
        ids.append(number)
    return tuple(sorted(set(ids)))


def _level(value: Any) -> str:
    text = _str(value).lower()
    if text not in LEVELS:
        raise ValueError(f"must be one of {', '.join(LEVELS)}")
    return text


def _key_name(value: Any) -> str:
    text = _str(value)
    if any(c.isspace() or c == "+" for c in text):
        raise ValueError("must not contain spaces or '+'")
    return text


def _signing_mode(value: Any) -> str:
    text = _str(value)
    if text not in ("entry", "checkpoint"):
        raise ValueError('must be "entry" (every entry signed) or "checkpoint" (checkpoints only)')
    return text


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        value = float(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number of seconds")
    if not 0.01 <= value <= 3600:
        raise ValueError("must be between 0.01 and 3600 seconds")
    return float(value)


def _buckets(value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of numbers")
    try:
        bounds = tuple(float(v) for v in value if not isinstance(v, bool))
    except (TypeError, ValueError):
        raise ValueError("must be a list of numbers") from None
    if len(bounds) != len(value) or any(b <= 0 or b != b or b == float("inf") for b in bounds):
        raise ValueError("must be finite positive numbers")
    if list(bounds) != sorted(set(bounds)):
        raise ValueError("must be strictly increasing")
    return bounds


KEYS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "state_dir": ("var", _path),
    "socket.path": ("", _path),
    "socket.mode": ("0660", _mode),
    "socket.group": ("", _str),
    "socket.max_line_bytes": (1_048_576, _int_range(1024, 64 * 1_048_576)),
    "socket.max_batch": (10_000, _int_range(1, 1_000_000)),
    "socket.max_connections": (1024, _int_range(1, 100_000)),
    "socket.max_inflight": (1024, _int_range(1, 1_000_000)),
    "socket.max_depth": (64, _int_range(2, 10_000)),
    "socket.allowed_uids": ([], _ids),
    "socket.allowed_gids": ([], _ids),
    "socket.read_uids": ([], _ids),
    "socket.read_gids": ([], _ids),
    "socket.admin_uids": ([], _ids),
    "socket.admin_gids": ([], _ids),
    "http.enabled": (True, _bool),
    "http.listen": ("127.0.0.1:9898", _listen),
    "http.web_config": ("", _path),
    "ledger.max_group": (4096, _int_range(1, 1_000_000)),
    "ledger.max_pending": (200_000, _int_range(1, 100_000_000)),
    "ledger.verify_tail": (1000, _int_range(0, 2**62)),
    "signing.key_name": ("", _key_name),
    "signing.mode": ("entry", _signing_mode),
    "checkpoint.interval": (1.0, _seconds),
    "metrics.duration_buckets": (list(DEFAULT_DURATION_BUCKETS), _buckets),
    "metrics.max_label_values": (1000, _int_range(1, 1_000_000)),
    "metrics.max_open_calls": (65_536, _int_range(1, 100_000_000)),
    "metrics.snapshot_interval": (30.0, _seconds),
    "metrics.created_series": (False, _bool),
    "log.level": ("info", _level),
    "log.ring_size": (256, _int_range(1, 1_000_000)),
    "actions.allow_custom_types": (False, _bool),
    "wm.enabled": (True, _bool),
    "wm.max_entries": (0, _int_range(0, 2**62)),
    "wm.max_tokens": (0, _int_range(0, 2**62)),
    "wm.linger_ms": (100, _int_range(0, 100)),
    "backup.allow_socket": (False, _bool),
}

_SINK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SINK_OPTIONS = {"wm": {"type", "name", "batch", "path"},
                 "jsonl": {"type", "name", "batch", "path", "max_bytes", "keep"},
                 "nats": {"type", "name", "batch", "servers", "stream", "subject", "replicas", "max_age",
                          "creds_file", "tls_ca", "tls_cert", "tls_key"}}


ENV_ALIASES = {
    "CCOS_WM_MAX_ENTRIES": "wm.max_entries",
    "CCOS_WM_MAX_TOKENS": "wm.max_tokens",
    "CCOS_ENABLE_WM_INGESTOR": "wm.enabled",
    "CCOS_LOG_BUFFER_CAPACITY": "log.ring_size",
}
"""CCOS's environment switches, read as these keys, so a CCOS deployment's settings carry over."""


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def load_config(
    file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from defaults, ``file``, ``environ`` and ``overrides`` (flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {key: default for key, (default, _) in KEYS.items()}
    raw: dict[str, Any] = {}
    raw_sinks: list[Any] = []
    raw_redact: Any = []
    if file is not None:
        document = _read_toml(file)
        raw_sinks = document.pop("sinks", [])
        raw_redact = document.pop("redact", [])
        raw.update(document)
    raw.update(_from_environ(environ))
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key, value in raw.items():
        if key not in KEYS:
            raise ConfigError(key, "unknown key")
        values[key] = value
    parsed: dict[str, Any] = {}
    for key, value in values.items():
        try:
            parsed[key] = KEYS[key][1](value)
        except ValueError as exc:
            raise ConfigError(key, f"{exc} (got {value!r})") from None
    return _build(parsed, raw_sinks, raw_redact)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {file}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {file}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{file} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if key in ("sinks", "redact"):  # arrays of tables, validated on their own
            flat[key] = value
        elif isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    return flat


def _from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    by_env = {env_name(key): key for key in KEYS}
    # CCOS's names first: the CCOS_OBSD_* name of the same key, read next, wins.
    found = {key: environ[name] for name, key in ENV_ALIASES.items() if name in environ}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        key = by_env.get(name)
        if key is None:
            raise ConfigError(name, "unknown environment variable")
        found[key] = value
    return found


def tables_of(raw: Any, key: str, *, known: Collection[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each table of the array of tables ``[[key]]`` with its name for errors (``key[N]``).

    With ``known``, an option outside it raises ``ConfigError`` naming ``key[N].option``.
    """
    if not isinstance(raw, list):
        raise ConfigError(key, f"must be an array of tables ([[{key}]])")
    for i, table in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table")
        if known is not None:
            for option in table:
                if option not in known:
                    raise ConfigError(f"{where}.{option}", f"unknown option (known: {', '.join(sorted(known))})")
        yield where, table


def _sinks(raw: Any, state_dir: Path, wm_enabled: bool) -> tuple[SinkConfig, ...]:
    sinks: list[SinkConfig] = []
    for where, table in tables_of(raw, "sinks"):
        kind = table.get("type")
        if kind not in _SINK_OPTIONS:
            raise ConfigError(f"{where}.type", f"must be one of {', '.join(sorted(_SINK_OPTIONS))} (got {kind!r})")
        for option in table:
            if option not in _SINK_OPTIONS[kind]:
                raise ConfigError(f"{where}.{option}", f"unknown option for a {kind} sink")
        name = table.get("name", kind)
        if not isinstance(name, str) or not _SINK_NAME.fullmatch(name):
            raise ConfigError(f"{where}.name", "must be 1-64 letters, digits, '_' or '-'")
        if any(s.name == name for s in sinks):
            raise ConfigError(f"{where}.name", f"another sink is named {name!r}")
        try:
            batch = _int_range(1, 100_000)(table.get("batch", 1000))
            max_bytes = _int_range(4096, 2**40)(table.get("max_bytes", 64 * 2**20))
            keep = _int_range(0, 1000)(table.get("keep", 5))
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
        default_path = state_dir / (WM_FILE if kind == "wm" else f"{name}.jsonl")
        if kind == "jsonl" and "path" not in table:
            raise ConfigError(f"{where}.path", "a jsonl sink needs a path")
        try:
            path = Path(_path(table.get("path", str(default_path)))).expanduser()
        except ValueError as exc:
            raise ConfigError(f"{where}.path", str(exc)) from None
        if kind == "wm" and not wm_enabled:
            continue
        nats = _nats_options(table, where) if kind == "nats" else None
        sinks.append(SinkConfig(type=kind, name=name, batch=batch, path=path, max_bytes=max_bytes, keep=keep,
                                nats=nats))
    if wm_enabled and not any(s.type == "wm" for s in sinks):
        sinks.insert(0, default_wm_sink(state_dir))
    return tuple(sinks)


_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _nats_options(table: dict[str, Any], where: str) -> NatsOptions:
    """The keys of a ``type = "nats"`` sink, each checked (ConfigError names the one that is wrong)."""
    servers = table.get("servers")
    if (not isinstance(servers, list) or not servers
            or not all(isinstance(url, str) and re.fullmatch(r"(nats|tls)://\S+", url) for url in servers)):
        raise ConfigError(f"{where}.servers", 'must be a non-empty list of "nats://HOST:PORT" (or tls://) URLs')
    stream = table.get("stream", "CCOS_LEDGER")
    if not isinstance(stream, str) or not _STREAM_NAME.fullmatch(stream):
        raise ConfigError(f"{where}.stream", "must be 1-255 letters, digits, '_' or '-'")
    subject = table.get("subject", "ccos.ledger")
    if not isinstance(subject, str) or len(subject) > 200 or not _SUBJECT.fullmatch(subject):
        raise ConfigError(f"{where}.subject", "must be dot-separated tokens of letters, digits, '_' or '-'"
                          " (no wildcards)")
    try:
        replicas = _int_range(1, 5)(table.get("replicas", 1))
    except ValueError as exc:
        raise ConfigError(f"{where}.replicas", str(exc)) from None
    max_age = table.get("max_age", 0)
    if isinstance(max_age, bool) or not isinstance(max_age, int | float) or not 0 <= max_age < 2**33:
        raise ConfigError(f"{where}.max_age", "must be a number of seconds >= 0 (0: kept for ever)")
    files: dict[str, str | None] = {}
    for key in ("creds_file", "tls_ca", "tls_cert", "tls_key"):
        try:
            files[key] = None if key not in table else str(Path(_path(table[key])).expanduser())
        except ValueError as exc:
            raise ConfigError(f"{where}.{key}", str(exc)) from None
    if (files["tls_cert"] is None) != (files["tls_key"] is None):
        raise ConfigError(f"{where}.{'tls_key' if files['tls_key'] is None else 'tls_cert'}",
                          "tls_cert and tls_key go together (the client certificate and its key)")
    return NatsOptions(servers=tuple(servers), stream=stream, subject=subject, replicas=replicas,
                       max_age_s=float(max_age), **files)


_RULE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RULE_OPTIONS = frozenset({"name", "paths", "pattern", "hash"})
_WHOLE_FIELDS = STRING_FIELDS - {"action_id"}
"""Top-level fields a path rule may replace whole: a placeholder string is still a valid value there
(not action_id: one placeholder for many ids would make distinct actions collide)."""


def _redact_rules(raw: Any) -> tuple[RedactRule, ...]:
    """The ``[[redact]]`` tables, checked; a bad one raises ``ConfigError`` naming ``redact[N].option``."""
    rules: list[RedactRule] = []
    for where, table in tables_of(raw, "redact", known=_RULE_OPTIONS):
        name = table.get("name")
        if not isinstance(name, str) or not _RULE_NAME.fullmatch(name):
            raise ConfigError(f"{where}.name", "must be 1-64 letters, digits, '_', '.' or '-'")
        if any(rule.name == name for rule in rules):
            raise ConfigError(f"{where}.name", f"another rule is named {name!r}")
        if ("paths" in table) == ("pattern" in table):
            raise ConfigError(where, f"rule {name!r} needs either paths or pattern (not both)")
        hashed = table.get("hash", False)
        if not isinstance(hashed, bool):
            raise ConfigError(f"{where}.hash", f"rule {name!r}: must be true or false")
        if "pattern" in table:
            try:
                pattern = _redact_pattern(table["pattern"])
            except ValueError as exc:
                raise ConfigError(f"{where}.pattern", f"rule {name!r}: {exc}") from None
            rules.append(RedactRule(name=name, pattern=pattern, hash=hashed))
            continue
        try:
            paths = _redact_paths(table["paths"])
        except ValueError as exc:
            raise ConfigError(f"{where}.paths", f"rule {name!r}: {exc}") from None
        rules.append(RedactRule(name=name, paths=paths, hash=hashed))
    return tuple(rules)


def _redact_pattern(value: Any) -> re.Pattern[str]:
    try:
        pattern = re.compile(_str(value))
    except re.error as exc:
        raise ValueError(f"the pattern does not compile: {exc}") from None
    if pattern.search("") is not None:
        raise ValueError("the pattern matches the empty string (it would redact between every character)")
    return pattern


def _redact_paths(value: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('must be a non-empty list of field paths, e.g. ["metadata.api_key", "arguments.*"]')
    paths = []
    for item in value:
        segments = tuple(_str(item).split("."))
        if "" in segments:
            raise ValueError(f"{item!r} has an empty segment")
        if "**" in segments:
            raise ValueError(f"{item!r}: there is no '**' (a pattern rule finds a value anywhere)")
        if segments[0] != "*" and segments[0] not in ACTION_FIELDS:
            raise ValueError(f"{item!r} does not start with an action field or '*'")
        if len(segments) == 1 and segments[0] not in _WHOLE_FIELDS:
            raise ValueError(f"{item!r} would replace a whole {segments[0]!r} field by a string, which makes "
                             "the action invalid: name a path inside it, e.g. metadata.api_key")
        paths.append(segments)
    return tuple(paths)


def _build(v: dict[str, Any], raw_sinks: Any = (), raw_redact: Any = ()) -> Config:
    state_dir = Path(v["state_dir"]).expanduser()
    socket_path = Path(v["socket.path"]).expanduser() if v["socket.path"] else state_dir / SOCKET_FILE
    if len(os.fsencode(socket_path)) > _MAX_UNIX_PATH:
        raise ConfigError("socket.path", f"{socket_path} is longer than {_MAX_UNIX_PATH} bytes")
    host, port = v["http.listen"]
    return Config(
        state_dir=state_dir,
        socket=SocketConfig(
            path=socket_path,
            mode=v["socket.mode"],
            group=v["socket.group"],
            max_line_bytes=v["socket.max_line_bytes"],
            max_batch=v["socket.max_batch"],
            max_connections=v["socket.max_connections"],
            max_inflight=v["socket.max_inflight"],
            max_depth=v["socket.max_depth"],
            allowed_uids=v["socket.allowed_uids"],
            allowed_gids=v["socket.allowed_gids"],
            read_uids=v["socket.read_uids"],
            read_gids=v["socket.read_gids"],
            admin_uids=v["socket.admin_uids"],
            admin_gids=v["socket.admin_gids"],
        ),
        http=HttpConfig(enabled=v["http.enabled"], host=host, port=port,
                        web_config=Path(v["http.web_config"]).expanduser() if v["http.web_config"] else None),
        ledger=LedgerConfig(max_group=v["ledger.max_group"], max_pending=v["ledger.max_pending"],
                            verify_tail=v["ledger.verify_tail"]),
        signing=SigningConfig(key_name=v["signing.key_name"], mode=v["signing.mode"]),
        checkpoint=CheckpointConfig(interval_s=v["checkpoint.interval"]),
        metrics=MetricsConfig(
            duration_buckets=v["metrics.duration_buckets"],
            max_label_values=v["metrics.max_label_values"],
            snapshot_interval_s=v["metrics.snapshot_interval"],
            created_series=v["metrics.created_series"],
            max_open_calls=v["metrics.max_open_calls"],
        ),
        log=LogConfig(level=v["log.level"], ring_size=v["log.ring_size"]),
        actions=ActionsConfig(allow_custom_types=v["actions.allow_custom_types"]),
        wm=WmConfig(enabled=v["wm.enabled"], max_entries=v["wm.max_entries"], max_tokens=v["wm.max_tokens"],
                     linger_ms=v["wm.linger_ms"]),
        sinks=_sinks(list(raw_sinks), state_dir, v["wm.enabled"]),
        backup=BackupConfig(allow_socket=v["backup.allow_socket"]),
        redact=_redact_rules(raw_redact),
    )


def prepare_paths(config: Config, *, socket_dir: bool = True) -> None:
    """Create the state dir (mode 0700) and the socket's directory, or say which key is unusable.

    ``socket_dir=False`` when the socket was passed ready-made (systemd socket activation).
    """
    directories = [("state_dir", config.state_dir, 0o700)]
    if socket_dir:
        directories.append(("socket.path", config.socket.path.parent, 0o755))
    for key, directory, mode in directories:
        try:
            directory.mkdir(mode=mode, parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(key, f"{directory} exists and is not a directory") from None
        except OSError as exc:
            raise ConfigError(key, f"cannot create {directory}: {exc.strerror}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(key, f"{directory} is not writable")
