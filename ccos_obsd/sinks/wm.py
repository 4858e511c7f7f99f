"""The Working Memory sink: derives a WM entry from each ledger entry into the WM store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.metrics.aggregates import Histogram
from ccos_obsd.wm.derive import derive_wm_entries
from ccos_obsd.wm.store import WmStore

WM_INGEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WmSink:
    """Sink type ``wm``: idempotent (an entry delivered twice leaves one WM entry)."""

    def __init__(self, name: str, path: Path, *, max_entries: int = 0, max_tokens: int = 0) -> None:
        self.name = name
        self.path = path
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.ingest_durations = Histogram(WM_INGEST_BUCKETS)
        """``ccos_wm_ingest_duration_seconds``: one observation per delivered batch."""
        self.size = 0
        self._store: WmStore | None = None

    def open(self) -> None:
        self._store = WmStore(self.path)
        self.size = self._store.count()

    def deliver(self, entries: Sequence[StoredEntry]) -> None:
        if self._store is None:
            raise RuntimeError("the WM sink is not open")
        started = time.perf_counter()
        self._store.ingest([wm for entry in entries for wm in derive_wm_entries(entry)])
        if self.max_entries or self.max_tokens:
            self._store.enforce_budgets(self.max_entries or None, self.max_tokens or None)
        self.ingest_durations.observe(time.perf_counter() - started)
        self.size = self._store.count()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
