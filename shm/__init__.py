"""Shared-memory structures: segments, the load board and the bootstrap table."""
