"""The Working Memory sink: derives a WM entry from each ledger entry into the WM store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.wm.derive import derive_wm_entries
from ccos_obsd.wm.store import Budgets, WmStore


class WmSink:
    """Sink type ``wm``: idempotent (an entry delivered twice leaves one WM entry).

    Each delivery is one :meth:`WmStore.ingest` with the budgets, as each chunk of
    a replay is (``wm.replay``): both keep the same entries.
    """

    def __init__(self, name: str, path: Path, budgets: Budgets | None = None) -> None:
        self.name = name
        self.path = path
        self.budgets = budgets
        self.size = 0
        self._store: WmStore | None = None

    def open(self) -> None:
        self._store = WmStore(self.path)
        self.size = self._store.count()

    def deliver(self, entries: Sequence[StoredEntry]) -> None:
        if self._store is None:
            raise RuntimeError("the WM sink is not open")
        self._store.ingest([wm for entry in entries for wm in derive_wm_entries(entry)], self.budgets)
        self.size = self._store.count()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
