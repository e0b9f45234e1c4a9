"""Session-wide guards shared by every test module."""

from __future__ import annotations

import pytest

from shm.segment import list_segments, owner_pid, pid_alive


def _ours_or_orphaned(before: set[str]) -> list[str]:
    import os
    me = os.getpid()
    left = []
    for name in list_segments():
        pid = owner_pid(name)
        if pid == me or (name not in before and pid is not None and not pid_alive(pid)):
            left.append(name)
    return left


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments():
    """After the session, no segment created by this process or its dead children remains.

    Segments of other live processes (a server a developer runs meanwhile) are not ours.
    """
    before = set(list_segments())
    yield
    leaked = _ours_or_orphaned(before)
    assert not leaked, f"shared-memory segments leaked by the test session: {leaked}"
