"""The configuration: records, loading, rendering, agent groups.

Imports only contract and support."""
