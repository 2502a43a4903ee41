"""Benchmarks of the orchestrator against real files, real inotify and real SQLite.

Entry point: ``python -m bench [--quick] [--out bench/results/latest.json]``.
See bench/README.md for what each number means.
"""
