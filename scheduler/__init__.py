"""Scheduling policy: the balancing methods and the dispatcher that applies them to the load board."""
