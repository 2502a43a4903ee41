"""The folder contract shared with agents and other programs: layout, SQLite schema, statuses, inotify. Stdlib only."""
