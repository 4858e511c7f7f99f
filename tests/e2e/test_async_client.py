"""The asyncio client against the real daemon."""

from __future__ import annotations

import pytest

from ccos_obsd.client import AsyncClient
from ccos_obsd.errors import RemoteError
from tests.daemon import DaemonProcess


async def test_async_client_appends_reads_and_pipelines(daemon: DaemonProcess) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as chain:
        first = await chain.append({"action_type": "PlanStarted", "plan_id": "p1", "action_id": "a-1"})
        assert first["seq"] == 0
        results = await chain.append_batch(
            [{"action_type": "PlanStepStarted", "plan_id": "p1"}, {"action_type": "Nope"}]
        )
        assert results[0]["ok"] is True and results[0]["seq"] == 1
        assert results[1]["error"]["code"] == "invalid_action"
        assert (await chain.get(action_id="a-1"))["entry"]["plan_id"] == "p1"
        assert [r["seq"] for r in await chain.query(plan_id="p1")] == [0, 1]
        assert await chain.ping() == 2
        for n in range(3):
            await chain.send({"id": n, "op": "ping"})
        assert [(await chain.receive())["id"] for _ in range(3)] == [0, 1, 2]


async def test_async_client_raises_remote_errors(daemon: DaemonProcess) -> None:
    async with await AsyncClient.connect(daemon.socket_path) as chain:
        await chain.append({"action_type": "PlanStarted", "action_id": "same", "cost": 1})
        with pytest.raises(RemoteError) as caught:
            await chain.append({"action_type": "PlanStarted", "action_id": "same", "cost": 2})
        assert caught.value.code == "conflict"
        with pytest.raises(RemoteError) as missing:
            await chain.get(seq=99)
        assert missing.value.code == "not_found"
