"""Agents as Docker containers (docker-py behind one blocking-call wrapper)."""
