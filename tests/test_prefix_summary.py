"""The prefix-cache summary (``shm.prefix_summary``) and its keys (``scheduler.prefix_hash``).

The property tests drive one summary with a plain-Python model of what each rank's
radix cache holds (every cached token prefix, so a path's evictable tail is known) and
check that a probe reports, per rank, exactly the longest full-block prefix the rank
holds, or less (never more) when the table is too small to keep every key.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.prefix_hash import BLOCK_LEN, block_keys, chain_hashes, first_hash, summary_key
from shm.prefix_summary import HEADER_LEN, L_WRITER_PID, LINE, WAYS, PrefixSummary, buckets_for
from shm.segment import ShmError, ShmLayoutError, new_launch_id

NUM_RANKS = 3
# Token segments that paths are made of: shared beginnings of many lengths, some
# ending mid-block, so prefixes diverge inside blocks and on block boundaries.
_rng = random.Random(7)
SEGMENTS = [tuple(_rng.randrange(50_000) for _ in range(n))
            for n in (64, 64, 40, 100, 1, 63, 128, 17)]


@pytest.fixture
def summary():
    with PrefixSummary.create(NUM_RANKS, 64, new_launch_id()) as s:
        yield s


def test_keys_are_the_same_in_another_process():
    tokens = list(range(1000, 1000 + 5 * BLOCK_LEN + 7))
    code = ("import sys; from scheduler.prefix_hash import block_keys; "
            f"print(block_keys(list(range(1000, {1000 + 5 * BLOCK_LEN + 7}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.getcwd(), env={**os.environ, "PYTHONHASHSEED": "random"})
    assert eval(out.stdout) == block_keys(tokens)


def test_keys_chain_the_whole_prefix():
    a = tuple(range(3 * BLOCK_LEN))
    b = (a[0] + 1,) + a[1:]  # differs only in the first token
    ka, kb = block_keys(a), block_keys(b)
    assert len(ka) == 3 and all(x != y for x, y in zip(ka, kb))
    assert block_keys(a + (5,) * 10) == ka  # a partial last block has no key
    assert block_keys(a, 2) == ka[2:]
    assert summary_key(first_hash(list(a))) == ka[0] == summary_key(chain_hashes(a, 1, [])[0])
    assert all(0 < k < 1 << 64 for k in ka)


def test_digests_chain_the_whole_prefix():
    """A block's digest stands for the whole prefix up to it (a copier compares them to
    prove it copies its own prompt's KV): two prompts that share block 1 but not block 0
    have different digests for block 1."""
    from scheduler.prefix_hash import prefix_digests
    a = list(range(2 * BLOCK_LEN))
    b = [a[0] + 1] + a[1:]
    da, db = prefix_digests(a, 2), prefix_digests(b, 2)
    assert da[0] != db[0] and da[1] != db[1]
    assert prefix_digests(a, 2, start=1) == da[1:]


def test_probe_reports_each_ranks_longest_block_prefix(summary):
    prompt = SEGMENTS[6] + SEGMENTS[3] + SEGMENTS[0]  # 292 tokens: 4 full blocks
    w0, w2 = summary.writer(0), summary.writer(2)
    assert summary.cached_tokens(prompt) is None
    w0.on_cached(prompt[:100], 0)  # one full block, and 36 tokens of the next
    w2.on_cached(prompt, 0)
    assert summary.cached_tokens(prompt) == [64, 0, 256]
    assert summary.cached_tokens(prompt[:200]) == [64, 0, 192]
    assert summary.cached_tokens(prompt[:63]) is None  # no full block to look up
    w0.on_cached(prompt[:150], 100)  # block 1 becomes full
    assert summary.cached_tokens(prompt)[0] == 128
    w2.on_evicted(prompt, 130)  # blocks 2 and 3 go, 0 and 1 stay
    assert summary.cached_tokens(prompt) == [128, 0, 128]
    w2.on_flush()
    assert summary.cached_tokens(prompt) == [128, 0, 0]
    assert summary.num_keys(0) == 2 and summary.num_keys(2) == 0


def test_a_key_spread_over_two_cells_is_no_match(summary):
    """``held_by_other`` searches a bucket's row as bytes: a key whose 8 bytes are the
    tail of one cell and the head of the next is not a key any rank holds."""
    key = summary_key(first_hash(list(SEGMENTS[0])))
    raw = key.to_bytes(8, "little")
    row = summary._table[summary.bucket_of(key)]
    row[0] = int.from_bytes(b"\x01" * 4 + raw[:4], "little")  # rank 0, way 0
    row[1] = int.from_bytes(raw[4:] + b"\x01" * 4, "little")  # rank 0, way 1
    assert not summary.any_holds(key) and summary.cached_tokens(list(SEGMENTS[0])) is None
    row[2] = key  # rank 1, way 0: a real match
    assert summary.any_holds(key) and not summary.held_by_other(1, key)


def test_held_by_other_looks_past_a_ranks_own_cells(summary):
    prompt = SEGMENTS[6] + SEGMENTS[3]  # 228 tokens: 3 full blocks
    key = block_keys(prompt)[2]
    summary.writer(1).on_cached(prompt, 0)
    assert summary.any_holds(key) and summary.held_by_other(0, key)
    assert not summary.held_by_other(1, key)  # rank 1 is the only holder
    summary.writer(2).on_cached(prompt, 0)
    assert summary.held_by_other(1, key)
    summary.writer(2).on_flush()
    summary.writer(1).on_evicted(prompt, 150)
    assert not summary.any_holds(key) and not summary.held_by_other(0, key)


def test_a_full_bucket_understates_never_overstates():
    with PrefixSummary.create(1, 1, new_launch_id()) as s:  # one bucket: WAYS keys at most
        w = s.writer(0)
        prompt = tuple(range(3 * WAYS * BLOCK_LEN))
        w.on_cached(prompt, 0)
        assert s.num_keys(0) == WAYS and s.num_dropped(0) == 2 * WAYS
        assert s.cached_tokens(prompt) == [WAYS * BLOCK_LEN]
        w.on_evicted(prompt, WAYS * BLOCK_LEN // 2)
        assert s.cached_tokens(prompt) == [WAYS * BLOCK_LEN // 2]


def test_attach_writer_ownership_and_sizing(summary):
    other = PrefixSummary.attach(summary.name)
    try:
        assert (other.num_ranks, other.num_buckets) == (NUM_RANKS, 64)
        summary.writer(1).on_cached(SEGMENTS[0] * 2, 0)
        assert other.cached_tokens(SEGMENTS[0] * 2) == [0, 128, 0]
    finally:
        other.close()
    summary.cells[HEADER_LEN + 1 * LINE + L_WRITER_PID] = 1  # rank 1 held by init: alive
    with pytest.raises(ShmError, match="held by live pid 1"):
        summary.writer(1)
    with pytest.raises(ValueError):
        summary.writer(NUM_RANKS)
    assert buckets_for(1 << 20) == 16384 and buckets_for(0) == 64
    with pytest.raises(ValueError):
        PrefixSummary.create(2, 48, new_launch_id())


def test_attach_refuses_another_layout():
    from shm.board import LoadBoard
    with LoadBoard.create(2, launch_id=new_launch_id()) as board:
        with pytest.raises(ShmLayoutError):
            PrefixSummary.attach(board.name)


# ---- the property: the summary against a model of every rank's cache ---------------------
def _longest_held(held: set[tuple], prompt: tuple) -> int:
    n = 0
    while n < len(prompt) and prompt[:n + 1] in held:
        n += 1
    return n


class SummaryAgainstModel(RuleBasedStateMachine):
    """Rules are what a radix cache does: cache a path past what it shares with the
    cache, evict the unshared tail of a leaf path, flush."""

    def __init__(self):
        super().__init__()
        self.summary = PrefixSummary.create(NUM_RANKS, self.num_buckets, new_launch_id())
        self.writers = [self.summary.writer(r) for r in range(NUM_RANKS)]
        self.held: list[set[tuple]] = [set() for _ in range(NUM_RANKS)]  # token prefixes

    num_buckets = 1024

    @rule(rank=st.integers(0, NUM_RANKS - 1),
          parts=st.lists(st.integers(0, len(SEGMENTS) - 1), min_size=1, max_size=5),
          cut=st.integers(0, 40))
    def cache(self, rank, parts, cut):
        path = sum((SEGMENTS[i] for i in parts), ())
        path = path[:max(1, len(path) - cut)]
        start = _longest_held(self.held[rank], path)
        if start == len(path):
            return
        self.writers[rank].on_cached(path, start)
        self.held[rank].update(path[:n] for n in range(start + 1, len(path) + 1))

    @precondition(lambda self: any(self.held))
    @rule(data=st.data())
    def evict(self, data):
        rank = data.draw(st.sampled_from([r for r in range(NUM_RANKS) if self.held[r]]))
        held = self.held[rank]
        children: dict[tuple, int] = {}
        for p in held:
            children[p[:-1]] = children.get(p[:-1], 0) + 1
        leaf = data.draw(st.sampled_from(sorted(p for p in held if p not in children)))
        # The tail that may go: back to the last prefix another path also extends.
        first = len(leaf) - 1
        while first > 0 and children[leaf[:first]] == 1:
            first -= 1
        start = data.draw(st.integers(first, len(leaf) - 1))
        self.writers[rank].on_evicted(leaf, start)
        held.difference_update(leaf[:n] for n in range(start + 1, len(leaf) + 1))

    @rule(rank=st.integers(0, NUM_RANKS - 1))
    def flush(self, rank):
        self.writers[rank].on_flush()
        self.held[rank].clear()

    @invariant()
    def probes_match_the_model(self):
        prompts = {p for held in self.held for p in held if len(p) % BLOCK_LEN == 0}
        prompts |= {p + SEGMENTS[4] for p in list(prompts)[:5]}
        prompts.add(SEGMENTS[0] + SEGMENTS[2] + SEGMENTS[6])
        for prompt in prompts:
            got = self.summary.cached_tokens(prompt) or [0] * NUM_RANKS
            for rank in range(NUM_RANKS):
                want = _longest_held(self.held[rank], prompt) // BLOCK_LEN * BLOCK_LEN
                self.check(rank, got[rank], want)

    def check(self, rank, got, want):
        assert got <= want, f"rank {rank}: summary says {got} cached tokens, cache holds {want}"
        if self.summary.num_dropped(rank) == 0:  # every key it was given is in its table
            assert got == want, f"rank {rank}: summary says {got} cached tokens, cache holds {want}"

    def teardown(self):
        del self.writers
        self.summary.close()


class TinySummaryAgainstModel(SummaryAgainstModel):
    """One bucket per rank: most keys are dropped; a probe may understate, never overstate."""

    num_buckets = 1


_settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestSummaryAgainstModel = SummaryAgainstModel.TestCase
TestSummaryAgainstModel.settings = _settings
TestTinySummaryAgainstModel = TinySummaryAgainstModel.TestCase
TestTinySummaryAgainstModel.settings = _settings


@given(st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=5 * BLOCK_LEN))
@settings(max_examples=50, deadline=None)
def test_an_empty_summary_reports_nothing(prompt):
    with PrefixSummary.create(2, 64, new_launch_id()) as s:
        assert s.cached_tokens(prompt) is None


def test_a_summary_with_slot_records_closes_while_its_writer_lives():
    """A rank's writer can outlive the close (its scheduler referenced from an exception's
    traceback at shutdown): it keeps no view of the segment, so the unmap succeeds."""
    with PrefixSummary.create(2, 64, new_launch_id(), slot_records=True) as owner:
        ranks_view = PrefixSummary.attach(owner.name)
        writer = ranks_view.writer(0)
        prompt = list(range(3 * BLOCK_LEN))
        writer.on_cached(prompt, 0, slots=list(range(len(prompt))))
        assert owner.cached_tokens(prompt) == [3 * BLOCK_LEN, 0]
        ranks_view.close()  # raised BufferError while the writer held a records view
        del writer


@pytest.mark.parametrize("how", ["evict", "flush"])
def test_a_copier_that_sees_the_eviction_count_move_finds_no_freed_slots(how):
    """The owner withdraws an evicted block's key before it bumps ``evictions``: a
    copier whose first read of the count sees the bump must not find the block (its
    slots are free, and the next forward pass rewrites them with no further bump to
    warn the copier: ``scheduler.prefix_share``)."""
    from scheduler.prefix_hash import prefix_digests
    with PrefixSummary.create(2, 64, new_launch_id(), slot_records=True) as summary:
        writer = summary.writer(0)
        prompt = list(range(3 * BLOCK_LEN))
        writer.on_cached(prompt, 0, slots=list(range(len(prompt))))
        hashes = chain_hashes(tuple(prompt), 3, [])
        digests = prefix_digests(prompt, 3)
        assert len(summary.block_slots(0, hashes, digests, 0, 3)) == 3
        seen = []
        bump = writer._bump_evictions

        def copier_reads_at_the_bump():  # what a copier finds just after the count moves
            bump()
            seen.append(len(summary.block_slots(0, hashes, digests, 0, 3)))

        writer._bump_evictions = copier_reads_at_the_bump
        if how == "evict":
            writer.on_evicted(prompt, BLOCK_LEN)  # blocks 1 and 2 go
            assert seen == [1]
        else:
            writer.on_flush()
            assert seen == [0]
        del writer


def test_a_flush_withdraws_the_stashed_keys_too():
    """Keys whose table bucket was full live in the rank's stash, beside their slot
    records: a flush withdraws them with the table's, or a copier would still find a
    flushed block's slots (and copy whatever reuses them)."""
    from scheduler.prefix_hash import prefix_digests
    with PrefixSummary.create(2, 64, new_launch_id(), slot_records=True) as summary:
        writer = summary.writer(0)
        prompt = list(range(200 * BLOCK_LEN))  # 200 keys for 128 table cells
        writer.on_cached(prompt, 0, slots=list(range(len(prompt))))
        hashes = chain_hashes(tuple(prompt), 200, [])
        digests = prefix_digests(prompt, 200)
        stashed = summary._stash[0].copy()
        assert stashed.any()
        found = summary.block_slots(0, hashes, digests, 0, 200)
        assert found and all(list(s) == list(range(j * BLOCK_LEN, (j + 1) * BLOCK_LEN))
                             for j, s in enumerate(found))
        writer.on_flush()
        assert not summary._stash[0].any() and not summary._table.any()
        assert summary.block_slots(0, hashes, digests, 0, 200) == []
        del writer
