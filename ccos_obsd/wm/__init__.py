"""Working Memory: entries derived from the ledger, their store, replay, and the ingestor capability."""
