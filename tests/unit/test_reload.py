"""What a reload applies at once and what waits for a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccos_obsd.config import KEYS, Config, load_config
from ccos_obsd.reload import RELOADABLE, config_values, plan_reload

BASE = {"state_dir": "/srv/ccos", "wm.enabled": "false"}


def config(**overrides: Any) -> Config:
    return load_config(environ={}, overrides={**BASE, **overrides})


def with_sinks(path: Path, sinks: str, **overrides: Any) -> Config:
    path.write_text(sinks)
    return load_config(path, environ={}, overrides={**BASE, **overrides})


def test_every_config_value_is_named_by_its_key() -> None:
    # A new Config field must map to the key that sets it, or reloads would report it wrongly.
    # ([[redact]] is an array of tables, like [[sinks]]: one value, named "redact".)
    assert set(config_values(config())) == set(KEYS) | {"redact"}
    assert set(KEYS) | {"redact"} >= RELOADABLE


def test_nothing_changed_nothing_to_do() -> None:
    plan = plan_reload(config(), config())
    assert plan.applied == ()
    assert plan.restart_required == ()


def test_reloadable_keys_are_applied_the_others_wait_for_a_restart() -> None:
    running = config()
    loaded = config(**{"log.level": "warning", "socket.max_batch": 7, "ledger.max_pending": 10,
                       "socket.allowed_uids": "1000", "ledger.max_group": 5, "http.listen": "127.0.0.1:1",
                       "checkpoint.interval": 9})
    plan = plan_reload(running, loaded)
    assert plan.applied == ("ledger.max_pending", "log.level", "socket.allowed_uids", "socket.max_batch")
    assert plan.restart_required == ("checkpoint.interval", "http.listen", "ledger.max_group")
    assert plan.config.log.level == "warning"
    assert plan.config.socket.max_batch == 7
    assert plan.config.socket.allowed_uids == (1000,)
    assert plan.config.ledger.max_pending == 10
    # Keys needing a restart keep their running values.
    assert plan.config.ledger.max_group == running.ledger.max_group
    assert plan.config.http == running.http
    assert plan.config.checkpoint == running.checkpoint


def test_a_sink_option_is_applied(tmp_path: Path) -> None:
    base = '[[sinks]]\ntype = "jsonl"\nname = "audit"\npath = "/x/a.jsonl"\n'
    running = with_sinks(tmp_path / "a.toml", base)
    loaded = with_sinks(tmp_path / "b.toml", base + "batch = 10\nkeep = 2\n")
    plan = plan_reload(running, loaded)
    assert plan.applied == ("sinks.audit.batch", "sinks.audit.keep")
    assert plan.restart_required == ()
    assert plan.config.sinks[0].batch == 10
    assert plan.config.sinks[0].keep == 2


def test_adding_or_moving_a_sink_needs_a_restart(tmp_path: Path) -> None:
    base = '[[sinks]]\ntype = "jsonl"\nname = "audit"\npath = "/x/a.jsonl"\n'
    running = with_sinks(tmp_path / "a.toml", base)
    added = with_sinks(tmp_path / "b.toml", base + '[[sinks]]\ntype = "jsonl"\nname = "two"\npath = "/x/b.jsonl"\n')
    moved = with_sinks(tmp_path / "c.toml", base.replace("a.jsonl", "moved.jsonl") + "batch = 10\n")
    for loaded in (added, moved):
        plan = plan_reload(running, loaded)
        assert plan.applied == ()
        assert plan.restart_required == ("sinks",)
        assert plan.config.sinks == running.sinks


def test_turning_working_memory_on_needs_a_restart() -> None:
    plan = plan_reload(config(), config(**{"wm.enabled": "true"}))
    assert plan.restart_required == ("sinks", "wm.enabled")
    assert plan.config.sinks == ()
