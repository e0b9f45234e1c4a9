"""Session-wide guards shared by every test module."""

from __future__ import annotations

import os
import secrets

# Before anything imports shm.segment: every segment this run creates, in this process,
# its rank processes or the servers it starts (they inherit the environment), is named
# under a prefix of its own, so the leak check below sees exactly the run's segments and
# never another engine's on the same machine.
os.environ["DPSERVE_SHM_PREFIX"] = f"dpserve-test-{os.getpid()}-{secrets.token_hex(2)}"

import pytest  # noqa: E402

from shm.segment import NAME_PREFIX, list_segments  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments():
    """After the session, no segment created by the run remains, whoever created it
    (this process, a rank, a server subprocess) and whether or not it still runs."""
    assert NAME_PREFIX.startswith("dpserve-test-"), "shm.segment was imported before conftest"
    yield
    leaked = list_segments(NAME_PREFIX)
    assert not leaked, f"shared-memory segments leaked by the test session: {leaked}"
