"""Sinks: consumers that pull committed entries from the ledger, each from its own cursor."""
