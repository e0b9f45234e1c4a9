"""scheduler.pending_prefix: the dispatcher's memory of where a prompt nobody cached went."""

from __future__ import annotations

from scheduler import pending_prefix
from scheduler.pending_prefix import PendingPrefixes
from scheduler.prefix_hash import BLOCK_LEN

S = 1_000_000_000  # ns


def test_a_prompt_beginning_alike_finds_the_whole_blocks_it_shares_at_that_rank():
    p = PendingPrefixes(ttl_s=10)
    sent = list(range(3 * BLOCK_LEN + 10))
    p.note(sent, 2, now_ns=0)
    assert p.cached_tokens(sent[:2 * BLOCK_LEN] + [-1] * 90, 4, now_ns=S) == [0, 0, 2 * BLOCK_LEN, 0]
    assert p.cached_tokens(sent, 4, now_ns=S) == [0, 0, 3 * BLOCK_LEN, 0]
    assert p.cached_tokens(tuple(sent[:BLOCK_LEN + 5]), 4, now_ns=S) == [0, 0, BLOCK_LEN, 0]
    assert p.cached_tokens([-1] + sent[1:], 4, now_ns=S) is None  # another first block
    assert p.cached_tokens(sent[:BLOCK_LEN - 1], 4, now_ns=S) is None  # no whole block


def test_entries_expire_and_the_memory_is_bounded(monkeypatch):
    p = PendingPrefixes(ttl_s=1)
    p.note(list(range(BLOCK_LEN)), 0, now_ns=0)
    assert p.cached_tokens(list(range(BLOCK_LEN)), 2, now_ns=S) == [BLOCK_LEN, 0]
    assert p.cached_tokens(list(range(BLOCK_LEN)), 2, now_ns=S + 1) is None and len(p) == 0
    monkeypatch.setattr(pending_prefix, "PENDING_MAX", 3)
    prompts = [[i] * BLOCK_LEN for i in range(5)]
    for i, prompt in enumerate(prompts):
        p.note(prompt, i % 2, now_ns=0)
    assert len(p) == 3  # the oldest went first
    assert p.cached_tokens(prompts[0], 2, now_ns=0) is None
    assert p.cached_tokens(prompts[4], 2, now_ns=0) == [BLOCK_LEN, 0]
    monkeypatch.setattr(pending_prefix, "PENDING_MAX_TOKENS", 2 * BLOCK_LEN)
    p.note([9] * BLOCK_LEN, 1, now_ns=0)
    assert len(p) == 2 and p._num_tokens == 2 * BLOCK_LEN
    assert PendingPrefixes(ttl_s=0).cached_tokens(prompts[4], 2, 0) is None
    off = PendingPrefixes(ttl_s=0)
    off.note(prompts[4], 1, now_ns=0)
    assert len(off) == 0


def test_a_prompt_nobody_asks_for_again_is_let_go_when_it_expires():
    """Prompts that are never looked up (unique ones) go at their expiry, at the next
    note, not only when the caps push them out (a soak test saw the API process hold
    its last 4,096 prompts for good)."""
    p = PendingPrefixes(ttl_s=1)
    for i in range(3):
        p.note([i] * BLOCK_LEN, 0, now_ns=i)
    p.note([7] * BLOCK_LEN, 1, now_ns=S + 2)  # the first two have expired
    assert len(p) == 2 and p._num_tokens == 2 * BLOCK_LEN
    assert p.cached_tokens([2] * BLOCK_LEN, 2, now_ns=S + 2) == [BLOCK_LEN, 0]


def test_a_prompt_over_the_token_cap_is_not_kept(monkeypatch):
    monkeypatch.setattr(pending_prefix, "PENDING_MAX_TOKENS", 4 * BLOCK_LEN)
    p = PendingPrefixes(ttl_s=1)
    p.note(list(range(5 * BLOCK_LEN)), 0, now_ns=1)  # raised StopIteration
    assert len(p) == 0 and p._num_tokens == 0


def test_the_shared_blocks_are_counted_wherever_the_prompts_part():
    p = PendingPrefixes()
    sent = list(range(5000, 5000 + 7 * BLOCK_LEN + 3))
    p.note(sent, 1, now_ns=0)
    for k in range(1, 8):
        for cut in (k * BLOCK_LEN, k * BLOCK_LEN + 17):  # the first differing token
            if cut >= len(sent):
                continue
            other = sent[:cut] + [-1] + sent[cut + 1:]
            assert p.cached_tokens(other, 2, now_ns=0) == [0, cut // BLOCK_LEN * BLOCK_LEN]
            assert p.cached_tokens(tuple(other), 2, now_ns=0) == [0, cut // BLOCK_LEN * BLOCK_LEN]
    assert p.cached_tokens(sent + [1] * 200, 2, now_ns=0) == [0, 7 * BLOCK_LEN]


def test_prefix_key_is_the_key_the_summaries_will_have():
    """The key of the shared blocks of a pending prompt is the chained hash the ranks
    publish for that prefix, and the same whichever depth was asked first."""
    from scheduler.prefix_hash import chain_hashes, first_hash

    sent = list(range(10, 10 + 5 * BLOCK_LEN))
    pending = PendingPrefixes()
    pending.note(sent, 1, 0)
    first = first_hash(sent)
    expected = chain_hashes(tuple(sent), 5, [])
    assert pending.prefix_key(first, 3) == expected[2]
    assert pending.prefix_key(first, 5) == expected[4]
    assert pending.prefix_key(first, 1) == expected[0] == first


def test_clear_forgets_prompts_and_their_tokens():
    """After clear the memory holds nothing and its token bound starts again from 0: a
    prompt noted then is remembered (the bound does not count what was cleared)."""
    prompt = list(range(10, 10 + 2 * BLOCK_LEN))
    pending = PendingPrefixes()
    for _ in range(pending_prefix.PENDING_MAX_TOKENS // len(prompt) + 2):
        pending.clear()
        pending.note(prompt, 2, 0)
    assert len(pending) == 1
    assert pending.cached_tokens(prompt, 4, 1)[2] == len(prompt)
    pending.clear()
    assert len(pending) == 0 and pending.cached_tokens(prompt, 4, 1) is None


def test_a_prompt_noted_again_replaces_its_entry_and_its_tokens():
    """The same prompt sent three times is one entry, counted once against the token
    bound: each note takes the replaced entry's tokens off before adding its own."""
    prompt = list(range(10, 10 + 3 * BLOCK_LEN))
    p = PendingPrefixes(ttl_s=10)
    for rank in range(3):
        p.note(prompt, rank, now_ns=rank)
    assert len(p) == 1 and p._num_tokens == len(prompt)
    assert p.cached_tokens(prompt, 4, now_ns=3) == [0, 0, len(prompt), 0]


def test_forget_ranks_drops_the_prompts_sent_there():
    p = PendingPrefixes(ttl_s=10)
    for i in range(4):
        p.note([i] * BLOCK_LEN, i % 2, now_ns=i)
    p.forget_ranks({1})
    assert len(p) == 2 and p._num_tokens == 2 * BLOCK_LEN
    assert p.cached_tokens([0] * BLOCK_LEN, 2, now_ns=5) == [BLOCK_LEN, 0]
    assert p.cached_tokens([1] * BLOCK_LEN, 2, now_ns=5) is None
