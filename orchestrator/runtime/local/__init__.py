"""Agents as local process groups."""
