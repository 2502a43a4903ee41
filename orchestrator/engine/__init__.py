"""The async engine: per-session state, the worker, the admission gate, delivery, the supervisor."""
