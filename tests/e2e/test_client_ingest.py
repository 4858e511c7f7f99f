"""``Client.ingest`` and ``AsyncClient.ingest`` against the real daemon: SEP-024's capability, called as CCOS does."""

from __future__ import annotations

from typing import Any

import pytest

from ccos_obsd.client import AsyncClient, Client
from ccos_obsd.errors import RemoteError
from ccos_obsd.wm.capability import CAPABILITY
from tests.daemon import DaemonProcess


def core(result: dict[str, Any]) -> dict[str, Any]:
    """SEP-024's fields of an ingest result (the daemon may add its own beside them)."""
    return {key: result[key] for key in ("mode", "ingested", "errors")}


def recorded_calls(client: Client) -> list[dict[str, Any]]:
    """The ledger's record of each ingestor call: (call, result) entries."""
    return [record["entry"] for record in client.query(function_name=CAPABILITY, limit=1000)]


def test_ingest_single_and_batch_answer_the_result_and_are_recorded(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        single = client.ingest("single", {"summary": "fetched the page", "plan_id": "p1"})
        assert core(single) == {"mode": "single", "ingested": 1, "errors": []}
        batch = client.ingest("batch", [{"summary": "one"}, {"summary": ""}, {"summary": "three"}])
        assert core(batch) == {"mode": "batch", "ingested": 2,
                         "errors": [{"index": 1, "reason": "summary must be a non-empty string"}]}
        entries = recorded_calls(client)
    assert [e["action_type"] for e in entries] == ["CapabilityCall", "CapabilityResult"] * 2
    assert entries[0]["arguments"][0] == "single" and entries[0]["arguments"][1][0]["summary"] == "fetched the page"
    assert [r["summary"] for r in entries[2]["arguments"][1]] == ["one", "three"]


def test_ingest_replay_rebuilds_working_memory(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        client.ingest("single", {"summary": "kept"})
        replayed = client.ingest("replay")
    assert replayed["mode"] == "replay" and replayed["errors"] == []
    assert replayed["scanned_actions"] >= 2 and replayed["ingested"] >= 1


def test_ingest_raises_the_error_answer(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        with pytest.raises(RemoteError) as bad_record:
            client.ingest("single", {"summary": 5})
        assert (bad_record.value.code, bad_record.value.field) == ("invalid_request", "args")
        with pytest.raises(RemoteError) as no_record:
            client.ingest("single")
        assert no_record.value.code == "invalid_request"
        with pytest.raises(RemoteError) as bad_mode:
            client.ingest("explode", [])  # type: ignore[arg-type]
        assert "mode" in bad_mode.value.message
        assert recorded_calls(client) == []  # nothing recorded for a refused call


async def test_async_ingest_answers_the_result_and_raises_the_error_answer(daemon: DaemonProcess) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as chain:
        assert core(await chain.ingest("batch", [{"summary": "a"}, {"summary": "b"}])) == {
            "mode": "batch", "ingested": 2, "errors": []}
        replayed = await chain.ingest("replay")
        assert replayed["mode"] == "replay" and replayed["ingested"] >= 2  # WM entries derived from the ledger
        with pytest.raises(RemoteError) as refused:
            await chain.ingest("batch", {"summary": "not a list"})
        assert refused.value.code == "invalid_request"
        assert len(await chain.query(function_name=CAPABILITY)) == 4
