"""The folder contract shared with agents and other programs.

Layout, SQLite schema, statuses, inotify. Stdlib only."""
