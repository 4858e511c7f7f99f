"""Benchmarks of ccos-obsd: ``python -m bench`` (or ``make bench``); see docs/performance.md."""
