"""Metrics: pure aggregates, their one encoding and snapshot, the Prometheus collector, the renderer."""
