"""Ledger databases written by a real writer, for tests that read them in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ccos_obsd.actions import validate_action
from ccos_obsd.ledger.keys import SigningKey
from ccos_obsd.ledger.writer import LedgerWriter


def write_actions(db: Path, actions: Sequence[Mapping[str, Any]]) -> None:
    """Append ``actions`` to the ledger at ``db`` (created if missing) in one group."""

    async def fill() -> None:
        writer = LedgerWriter(db, SigningKey.generate("test/ccos-obsd"), asyncio.get_running_loop())
        writer.start()
        await writer.submit([validate_action(dict(a)) for a in actions], None)
        await asyncio.get_running_loop().run_in_executor(None, writer.close)

    asyncio.run(fill())


def write_ledger(db: Path, count: int) -> None:
    """``count`` PlanStarted entries."""
    write_actions(db, [{"action_type": "PlanStarted", "plan_id": f"p{n}"} for n in range(count)])
