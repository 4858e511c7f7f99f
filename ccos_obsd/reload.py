"""What a reload (SIGHUP) may change in a running daemon.

The daemon re-reads its configuration the way it was first loaded (same file,
same environment, same flags, same precedence) and compares the result with the
running one, key by key. Keys in :data:`RELOADABLE` are read afresh on every
request or batch, so the new value simply replaces the old; every other key is
baked into something built at start-up (the ledger writer, the listening
sockets, the metric aggregates, the sinks' threads...) and keeps its running
value until a restart: the reload names it in ``restart_required``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ccos_obsd.config import Config

RELOADABLE = frozenset({
    "log.level",
    "socket.max_line_bytes",   # connections opened after the reload
    "socket.max_batch",
    "socket.max_connections",
    "socket.max_inflight",     # connections opened after the reload
    "socket.max_depth",
    "socket.allowed_uids",
    "socket.allowed_gids",
    "socket.read_uids",
    "socket.read_gids",
    "socket.admin_uids",
    "socket.admin_gids",
    "ledger.max_pending",
    "actions.allow_custom_types",
    "backup.allow_socket",
    "http.web_config",         # the file is read again on every reload; new TLS settings: new connections
    "redact",                  # compiled with the reloaded config (Daemon._reload) and handed to the ops
})
"""Config keys whose new value takes effect without a restart."""

SINK_RELOADABLE = frozenset({"batch", "max_bytes", "keep", "nats"})
"""A sink's options that its runner reads per batch, or (``nats``: servers, stream, credentials) that the
fresh sink host of a reload connects with. Its type and path, and adding or removing a sink, need a restart
(a sink's thread and cursor are set up at start)."""

# Config fields whose names differ from the key that sets them.
_FIELD_KEYS = {
    "http.host": "http.listen",
    "http.port": "http.listen",
    "http.web": "http.web_config",  # the file's content: a changed file is a changed key
    "checkpoint.interval_s": "checkpoint.interval",
    "metrics.snapshot_interval_s": "metrics.snapshot_interval",
}


@dataclass(frozen=True)
class ReloadPlan:
    config: Config
    """The config to run with: the running one with every reloadable change applied."""
    applied: tuple[str, ...]
    """Keys that changed and took effect."""
    restart_required: tuple[str, ...]
    """Keys that changed but keep their running value until a restart."""


def config_values(config: Config) -> dict[str, Any]:
    """The config as ``{key: value}``, named as in the config file (sinks as ``sinks.NAME.OPTION``)."""
    values: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if section.name == "sinks":
            for sink in value:
                for option in dataclasses.fields(sink):
                    if option.name != "name":
                        values[f"sinks.{sink.name}.{option.name}"] = getattr(sink, option.name)
        elif dataclasses.is_dataclass(value):
            for option in dataclasses.fields(value):
                name = f"{section.name}.{option.name}"
                key = _FIELD_KEYS.get(name, name)
                values[key] = (*values.get(key, ()), getattr(value, option.name))
        else:
            values[section.name] = (value,)
    return values


def plan_reload(running: Config, loaded: Config) -> ReloadPlan:
    """Compare the running config with a freshly loaded one and decide what to apply."""
    before, after = config_values(running), config_values(loaded)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    applied: list[str] = []
    restart: list[str] = []
    config = running
    sinks_reshaped = _sink_shape(running) != _sink_shape(loaded)
    if sinks_reshaped:
        restart.append("sinks")  # one sink more, one less, or one moved: named once
    for key in changed:
        if key.startswith("sinks."):
            if sinks_reshaped:
                continue
            if key.rsplit(".", 1)[1] in SINK_RELOADABLE:
                applied.append(key)
            else:
                restart.append(key)
        elif key == "redact":
            config = dataclasses.replace(config, redact=loaded.redact)
            applied.append(key)
        elif key in RELOADABLE:
            config = _apply_key(config, loaded, key)
            applied.append(key)
        else:
            restart.append(key)
    if not sinks_reshaped and any(key.startswith("sinks.") for key in applied):
        config = dataclasses.replace(config, sinks=loaded.sinks)
    return ReloadPlan(config, tuple(applied), tuple(sorted(restart)))


def _apply_key(config: Config, loaded: Config, key: str) -> Config:
    """``config`` with every field that ``key`` sets taken from ``loaded``."""
    section = key.split(".", 1)[0]
    options = {option.name: getattr(getattr(loaded, section), option.name)
               for option in dataclasses.fields(getattr(config, section))
               if _FIELD_KEYS.get(f"{section}.{option.name}", f"{section}.{option.name}") == key}
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **options)})


def _sink_shape(config: Config) -> list[tuple[str, str, str]]:
    return [(sink.name, sink.type, str(sink.path)) for sink in config.sinks]
