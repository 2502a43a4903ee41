"""bench/: the benchmark's own logic (no runs)."""
