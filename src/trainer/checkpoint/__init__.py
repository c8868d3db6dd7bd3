"""Checkpoint files: atomic I/O, the background writer, naming, retention, resume."""
