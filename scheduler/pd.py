"""Prefill/decode disaggregation on one node: configuration, shared names, tables.

The pieces (each its own module):
- **route table** (``shm.bootstrap``, one region per prefill dispatcher): the prefill
  dispatcher inserts ``room -> prefill rank`` (PLACED) when it dispatches, removes it
  when the prefill request finishes, marks it FAILED if the prefill fails in the API.
  This is what tells decode the prefill rank, with zero network hops.
- **hand-off table** (same layout, one region per prefill *rank*, claims per decode
  rank): when prefill rank p has the prompt's KV and the first token it inserts
  ``room -> KV_READY`` (kv_location, kv_len, first_token) into region p, or FAILED if
  the request was aborted or refused. Decode claims, copies, releases; p frees its
  KV once released or at the deadline (``scheduler.pd_prefill``).
- **KV segments** (``shm.kv_segment``): each prefill rank's KV pool and slot-list
  arena, created by that rank (``kv_segment_factory``, handed to its executor); decode
  ranks map them (``scheduler.pd_decode``).
- **roles** (``scheduler.pd_role``): what a rank's scheduler calls; ``PrefillSender``
  (``scheduler.pd_prefill``) on a prefill rank, ``DecodeReceiver``
  (``scheduler.pd_decode``) on a decode rank, the null ``MixedRole`` elsewhere.

Why the KV-ready state is not in the route table: the route table's regions belong
to the dispatchers (single writer per cell), and routing "KV ready" through the
dispatcher would put a pipe hop and the API's event loop on every request's TTFT
(measured here, rank pipe to an idle asyncio reader: 42 us median, 93 us p99; an API
busy streaming adds its backlog), and make the API tell the rank when to free its KV.
The rank owns its KV, so it owns the cells that describe it: one region each.
Decode told ``disagg_prefill_dp_rank`` reads region p directly and never needs the
route table; otherwise the route lookup costs about a microsecond.

Ordering that makes the two tables race-free for decode: a prefill rank inserts its
hand-off entry *before* it reports the request finished, and the dispatcher removes
the route entry only *after* that report. So a decode that misses the route entry
then finds the hand-off entry (``lookup`` over every region), or neither exists yet
(prefill not dispatched: wait), or the room is gone for good (released/expired). A
prefill that ends without a hand-off (aborted on its rank, e.g. its region was full)
leaves its route entry FAILED for a linger, not removed, so decode fails it at once
(503). A decode that saw the route entry once and then finds neither knows the
hand-off was written and is gone: if it never saw that entry itself, another request
with the same room claimed it (400, the room was reused); if it saw it, it expired.

Names: segments are ``segment_name(kind, launch_id)``; the tables are created by the
launcher in ``--disaggregation-mode pd`` and by the prefill server in two-server mode
(launch id ``pd<bootstrap port>``, found by ``shm.segment.find_segment``); each
prefill rank's KV segment carries that rank's pid, which decode reads from the
hand-off region header (``BootstrapTable.region_writer_pid``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scheduler.roles import Role

if TYPE_CHECKING:
    from shm.kv_segment import KVSegment

ROUTE_KIND = "route"
HANDOFF_KIND = "handoff"
DEFAULT_ROUTE_SLOTS = 1 << 14  # rooms in flight between dispatch and prefill done
DEFAULT_HANDOFF_SLOTS = 1 << 12  # per prefill rank: KV held for decode at once
DEFAULT_BOOTSTRAP_TIMEOUT_S = 300.0  # SGLang's SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT
DEFAULT_WAITING_TIMEOUT_S = 300.0  # SGLang's SGLANG_DISAGGREGATION_WAITING_TIMEOUT
DEFAULT_STALE_AFTER_S = 10.0  # the server's --stale-after-s default
# How long decode waits for a prefill rank to publish a failure once the room's route
# is gone with no hand-off (an API that aborts a prefill removes its route first; the
# rank writes FAILED at its next step, well within this).
ROUTE_GONE_GRACE_NS = 1_000_000_000


class PDError(RuntimeError):
    """A PD set-up problem (missing tables, mismatched sizes)."""


@dataclass(frozen=True)
class PDConfig:
    """What a PD rank needs to find the shared tables and its peers.

    ``bootstrap_timeout_s``: decode fails a request whose room no prefill placed within
    this long of its arrival; prefill frees a hand-off no decode claimed within this
    long. ``waiting_timeout_s``: decode fails a placed request whose KV is not ready
    within this long of its arrival (a slow prefill queue). ``stale_after_s``: decode
    fails a request waiting on a prefill rank that has not stepped for this long (frozen
    or stuck), as the API fails a plain rank's requests (``--stale-after-s``).
    """

    launch_id: str
    route_table: str
    handoff_table: str
    bootstrap_timeout_s: float = DEFAULT_BOOTSTRAP_TIMEOUT_S
    waiting_timeout_s: float = DEFAULT_WAITING_TIMEOUT_S
    stale_after_s: float = DEFAULT_STALE_AFTER_S

    def __post_init__(self) -> None:
        if min(self.bootstrap_timeout_s, self.waiting_timeout_s, self.stale_after_s) <= 0:
            raise ValueError("PD timeouts must be positive")


def prompt_hash(input_ids: list[int]) -> int:
    """Which request a hand-off is for: a 64-bit hash of the prompt's token ids (and so of
    its length), written by the prefill rank into its hand-off entry and checked by
    decode before it claims the KV. A ``bootstrap_room`` is not a secret; this keeps one
    request from taking another's KV with it (it needs the other's exact prompt too)."""
    digest = hashlib.blake2b(array("q", input_ids).tobytes(), digest_size=8,
                             person=b"dpserve-pd").digest()
    return int.from_bytes(digest, "little", signed=True)


def kv_segment_kind(prefill_rank: int) -> str:
    return f"kv-p{prefill_rank}"


def shared_kv_kind(rank: int) -> str:
    """The KV segment of a mixed rank whose peers copy its cached prefixes."""
    return f"kv-m{rank}"


def shared_launch_id(bootstrap_port: int) -> str:
    """The launch id two PD servers on one node share (``--disaggregation-bootstrap-port``)."""
    return f"pd{bootstrap_port}"


def create_tables(launch_id: str, num_prefill_ranks: int, num_decode_ranks: int,
                  num_prefill_dispatchers: int = 1, route_slots: int = DEFAULT_ROUTE_SLOTS,
                  handoff_slots: int = DEFAULT_HANDOFF_SLOTS):
    """Create (as owner) the route and hand-off tables; returns ``(route, handoff)``."""
    from shm.bootstrap import BootstrapTable
    route = BootstrapTable.create(num_prefill_dispatchers, route_slots, launch_id,
                                  kind=ROUTE_KIND, num_decode_ranks=0)
    try:
        handoff = BootstrapTable.create(num_prefill_ranks, handoff_slots, launch_id,
                                        kind=HANDOFF_KIND, num_decode_ranks=num_decode_ranks)
    except BaseException:
        route.close()
        raise
    return route, handoff


def attach_tables(route_name: str, handoff_name: str):
    """Attach (never unlink) the route and hand-off tables; returns ``(route, handoff)``."""
    from shm.bootstrap import BootstrapTable
    route = BootstrapTable.attach(route_name)
    try:
        return route, BootstrapTable.attach(handoff_name)
    except BaseException:
        route.close()
        raise


def shares_mixed_pool(cfg) -> bool:
    """A mixed rank whose peers copy its cached prefixes (``scheduler.prefix_share``)."""
    return bool(cfg.cross_rank_prefix_cache and cfg.role == Role.MIXED
                and cfg.prefix_summary_name)


def peer_kv_segment_name(cfg) -> Callable[[int, int], str]:
    """The name of peer rank ``r``'s KV segment (created by process ``pid``) for a rank
    that copies its peers' cached prefixes: the mixed ranks' shared pools, or on a PD
    prefill rank its fellow prefill ranks' (the segments decode reads)."""
    from shm.segment import launch_id_of, segment_name

    if cfg.role == Role.PREFILL:
        launch = cfg.pd.launch_id
        return lambda r, pid: segment_name(kv_segment_kind(r), launch, pid)
    return mixed_kv_segment_name(launch_id_of(cfg.prefix_summary_name))


def mixed_kv_segment_name(launch_id: str) -> Callable[[int, int], str]:
    """The name of mixed rank ``r``'s shared KV segment (process ``pid``) in a launch."""
    from shm.segment import segment_name

    return lambda r, pid: segment_name(shared_kv_kind(r), launch_id, pid)


def kv_segment_factory(cfg) -> Callable[[int, int], KVSegment] | None:
    """How a PD prefill rank, or a mixed rank sharing its prefix cache
    (``--enable-cross-rank-prefix-cache``), creates its KV segment; None for any other.

    The executor calls the factory with ``(capacity, token_bytes)`` once it knows its
    pool's size (bytes per token 0: the simulated executor keeps no KV data, only the
    hand-off arena). The executor owns the segment: it unlinks it at ``close()``.
    Decode ranks find it by this name (``scheduler.pd_peers``), peers of a mixed rank by
    theirs (``scheduler.prefix_share``).
    """
    from shm.kv_segment import KVSegment
    from shm.segment import launch_id_of, segment_name

    if shares_mixed_pool(cfg):
        # Peers copy cached prefixes out of it (scheduler.prefix_share); named like the
        # summary's launch.
        name = segment_name(shared_kv_kind(cfg.dp_rank), launch_id_of(cfg.prefix_summary_name))
        return lambda capacity, token_bytes: KVSegment.create(name, capacity, token_bytes)
    if cfg.pd is None or cfg.role != Role.PREFILL:
        return None
    name = segment_name(kv_segment_kind(cfg.dp_rank), cfg.pd.launch_id)
    return lambda capacity, token_bytes: KVSegment.create(name, capacity, token_bytes)
