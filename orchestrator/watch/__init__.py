"""Seeing activity: the host's inotify watch of the session folders."""
