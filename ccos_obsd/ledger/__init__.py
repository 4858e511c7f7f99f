"""The Causal Chain ledger: canonical bytes, hashes, signatures, storage."""
