"""Explicit hypothesis examples for tests that draw through ``st.data()``."""

from __future__ import annotations


class Draws:
    """Stands in for ``st.data()`` in an ``@example``: each ``draw`` returns the next of
    the given values, whatever the strategy, so a case a mutant once slipped through is
    run on every run, not only when the search happens on it."""

    def __init__(self, *values):
        self._values = iter(values)

    def draw(self, strategy, label=None):
        return next(self._values)
