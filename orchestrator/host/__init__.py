"""Synchronous disk work on the host: safe file access, the stores, sessions, attachments."""
