"""Roles and disaggregation modes, as types: defined here once, compared everywhere.

Both are ``StrEnum``s: a member equals its string (``Role.PREFILL == "prefill"``), hashes
as it, formats as it and is encoded as it in JSON, so flags, ``/server_info`` and the
messages keep SGLang's words while the code names the members.

- ``DisaggregationMode`` (``--disaggregation-mode``): what a server runs. ``null``:
  mixed ranks; ``prefill``/``decode``: one half of a PD pair (two servers, a gateway in
  front); ``pd``: both halves behind this one server.
- ``Role``: what a group of ranks does, and the server's role per mode. A rank is
  ``mixed``, ``prefill`` or ``decode`` (``RANK_ROLES``); ``pd`` is a server's role only
  (its front door drives a prefill and a decode group).
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"
    PD = "pd"


RANK_ROLES = (Role.MIXED, Role.PREFILL, Role.DECODE)


def rank_name(role: Role, dp_rank: int) -> str:
    """How logs name a rank: ``rank 1``, or ``prefill rank 1`` / ``decode rank 1``."""
    return f"rank {dp_rank}" if role == Role.MIXED else f"{role} rank {dp_rank}"


class DisaggregationMode(StrEnum):
    NULL = "null"
    PREFILL = "prefill"
    DECODE = "decode"
    PD = "pd"

    @property
    def role(self) -> Role:
        """The server's role in this mode."""
        return Role.MIXED if self is DisaggregationMode.NULL else Role(self.value)

    @property
    def rank_roles(self) -> tuple[Role, ...]:
        """The rank groups this mode runs (pd: both, behind one front door)."""
        if self is DisaggregationMode.PD:
            return (Role.PREFILL, Role.DECODE)
        return (self.role,)
