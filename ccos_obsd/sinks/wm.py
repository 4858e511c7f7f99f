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

    The sink keeps its own cursor (``owns_cursor``): the store moves it in the
    transaction that adds the delivered entries, so after any crash it names
    exactly what the store holds and delivery resumes right after it. That is
    why the store need not fsync each delivery (``durable=False``): a power loss
    can only take entries and their cursor back together, and the ledger delivers
    them again. The ledger's ``sink_cursors`` row for this sink is a mirror the
    runner refreshes now and then (see :class:`~ccos_obsd.sinks.base.SinkRunner`).
    """

    owns_cursor = True

    def __init__(self, name: str, path: Path, budgets: Budgets | None = None) -> None:
        self.name = name
        self.path = path
        self.budgets = budgets
        self.size = 0
        self._store: WmStore | None = None

    def open(self) -> None:
        self._store = WmStore(self.path, durable=False)
        self.size = self._store.count()

    def cursor(self) -> int | None:
        """The next seq the store is to be given, as it says (None: it never recorded one)."""
        if self._store is None:
            raise RuntimeError("the WM sink is not open")
        return self._store.cursor()

    def deliver(self, entries: Sequence[StoredEntry]) -> None:
        if self._store is None:
            raise RuntimeError("the WM sink is not open")
        self._store.ingest([wm for entry in entries for wm in derive_wm_entries(entry)], self.budgets,
                           next_seq=entries[-1].seq + 1 if entries else None)
        self.size = self._store.count()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
