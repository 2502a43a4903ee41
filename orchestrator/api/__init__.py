"""The sidecar's network surface: HTTP API, SSE event stream, metrics, status page."""
