"""Small helpers every layer may use: errors, log-once, timing, signals. Stdlib and loguru only."""
