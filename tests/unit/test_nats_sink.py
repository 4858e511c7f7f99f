"""The nats sink's keys, subjects and stream settings (the sink against real servers: tests/e2e/test_nats_sink.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.js.api import StorageType, StreamConfig

from ccos_obsd.config import NatsOptions, load_config
from ccos_obsd.errors import ConfigError
from ccos_obsd.sinks.nats import (
    DUPLICATE_WINDOW_S,
    checkpoint_cursor_name,
    stream_differences,
    subject_origin,
    wanted_stream,
)


def nats_sink(tmp_path: Path, body: str) -> Any:
    path = tmp_path / "ccos-obsd.toml"
    path.write_text(f'[[sinks]]\ntype = "nats"\n{body}\n', encoding="utf-8")
    config = load_config(path, environ={})
    return next(sink for sink in config.sinks if sink.type == "nats")


def config_error(tmp_path: Path, body: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        nats_sink(tmp_path, body)
    return caught.value


def test_defaults(tmp_path: Path) -> None:
    sink = nats_sink(tmp_path, 'servers = ["nats://127.0.0.1:4222"]')
    assert sink.name == "nats"
    assert sink.nats == NatsOptions(servers=("nats://127.0.0.1:4222",), stream="CCOS_LEDGER", subject="ccos.ledger",
                                    replicas=1, max_age_s=0.0)


def test_every_key(tmp_path: Path) -> None:
    sink = nats_sink(tmp_path, """
        name = "fleet"
        servers = ["tls://a:4222", "tls://b:4222"]
        stream = "FLEET"
        subject = "acme.ledger"
        replicas = 3
        max_age = 2592000
        creds_file = "/etc/ccos-obsd/nats.creds"
        tls_ca = "/etc/ccos-obsd/ca.pem"
        tls_cert = "/etc/ccos-obsd/client.pem"
        tls_key = "/etc/ccos-obsd/client-key.pem"
    """)
    assert sink.name == "fleet"
    assert sink.nats == NatsOptions(
        servers=("tls://a:4222", "tls://b:4222"), stream="FLEET", subject="acme.ledger", replicas=3,
        max_age_s=2592000.0, creds_file="/etc/ccos-obsd/nats.creds", tls_ca="/etc/ccos-obsd/ca.pem",
        tls_cert="/etc/ccos-obsd/client.pem", tls_key="/etc/ccos-obsd/client-key.pem",
    )
    assert NatsOptions.from_json(sink.nats.to_json()) == sink.nats


@pytest.mark.parametrize(("body", "key"), [
    ("", "sinks[0].servers"),
    ("servers = []", "sinks[0].servers"),
    ('servers = ["http://x:4222"]', "sinks[0].servers"),
    ('servers = "nats://x:4222"', "sinks[0].servers"),
    ('servers = ["nats://x:4222"]\nstream = "A.B"', "sinks[0].stream"),
    ('servers = ["nats://x:4222"]\nsubject = "ccos.>"', "sinks[0].subject"),
    ('servers = ["nats://x:4222"]\nsubject = "ccos..ledger"', "sinks[0].subject"),
    ('servers = ["nats://x:4222"]\nreplicas = 0', "sinks[0].replicas"),
    ('servers = ["nats://x:4222"]\nreplicas = 6', "sinks[0].replicas"),
    ('servers = ["nats://x:4222"]\nmax_age = -1', "sinks[0].max_age"),
    ('servers = ["nats://x:4222"]\nmax_age = "1d"', "sinks[0].max_age"),
    ('servers = ["nats://x:4222"]\ntls_cert = "/c.pem"', "sinks[0].tls_key"),
    ('servers = ["nats://x:4222"]\ntls_key = "/k.pem"', "sinks[0].tls_cert"),
    ('servers = ["nats://x:4222"]\ncreds_file = 1', "sinks[0].creds_file"),
    ('servers = ["nats://x:4222"]\npath = "/x"', "sinks[0].path"),
])
def test_a_bad_key_is_named(tmp_path: Path, body: str, key: str) -> None:
    assert config_error(tmp_path, body).key == key


def test_the_origin_becomes_one_subject_token() -> None:
    assert subject_origin("host-1.example/ccos-obsd") == "host-1_example_ccos-obsd"
    assert subject_origin("a b*c>d_e-f") == "a_b_c_d_e-f"
    assert subject_origin("héllo") == "h_llo"


def test_the_checkpoint_cursor_cannot_be_a_sink_name() -> None:
    assert checkpoint_cursor_name("nats") == "nats:checkpoints"


def test_the_stream_created_when_missing() -> None:
    want = wanted_stream(NatsOptions(servers=("nats://x:4222",), replicas=3, max_age_s=3600))
    assert want.subjects == ["ccos.ledger.>"]
    assert want.storage == StorageType.FILE
    assert want.num_replicas == 3
    assert want.duplicate_window == DUPLICATE_WINDOW_S >= 120
    assert want.max_age == 3600


def test_an_existing_stream_names_each_setting_that_differs() -> None:
    want = wanted_stream(NatsOptions(servers=("nats://x:4222",), replicas=3))
    same = StreamConfig(name="CCOS_LEDGER", subjects=["other.>", "ccos.ledger.>"], storage=StorageType.FILE,
                        num_replicas=3, duplicate_window=DUPLICATE_WINDOW_S, max_age=0.0)
    assert stream_differences(want, same) == {}
    other = StreamConfig(name="CCOS_LEDGER", subjects=["ccos.>"], storage=StorageType.MEMORY, num_replicas=1,
                         duplicate_window=60.0, max_age=86400.0)
    assert set(stream_differences(want, other)) == {"subjects", "storage", "replicas", "duplicate_window", "max_age"}


def test_a_reload_applies_changed_nats_options(tmp_path: Path) -> None:
    from ccos_obsd.reload import plan_reload

    running = load_config(_write(tmp_path, "a.toml", 'servers = ["nats://a:4222"]'), environ={})
    loaded = load_config(_write(tmp_path, "b.toml", 'servers = ["nats://b:4222"]\nreplicas = 3'), environ={})
    plan = plan_reload(running, loaded)
    assert plan.applied == ("sinks.nats.nats",)
    assert plan.restart_required == ()
    assert plan.config.sinks == loaded.sinks


def _write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f'[[sinks]]\ntype = "nats"\n{body}\n', encoding="utf-8")
    return path
