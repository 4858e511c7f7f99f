"""ccos-obsd: a durable, signed, verifiable Causal Chain daemon for agent runtimes."""

__version__ = "0.1.0"
