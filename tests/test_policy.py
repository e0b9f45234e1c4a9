"""Balancing methods as pure functions: no board, no processes.

The invariants on the real board, with dispatchers and simulated schedulers, are in
``test_dispatcher.py``; here each method is checked on plain lists.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from scheduler.policy import (InvalidDpRankError, InvalidLoadBalanceMethod, InvalidRoleError,
                              LoadBalanceMethod, MissingBootstrapRoomError, NoLiveRankError,
                              RankUnavailableError, RotationState, follow_bootstrap_room,
                              prefill_tokens, resolve_method, round_robin, routed_rank,
                              total_requests, total_tokens)
from scheduler.policy import (GUARD_RATIO, GUARD_SLACK, HOT_GUARD_RATIO, HOT_GUARD_SLACK, MISS_WEIGHT,
                             SHARED_DISCOUNT, cache_aware)
from tests.example_helpers import Draws

FAST = settings(max_examples=150, deadline=None)

loads = st.lists(st.integers(0, 6), min_size=1, max_size=8)


def alive_for(n: int):
    return st.lists(st.booleans(), min_size=n, max_size=n).map(tuple)


# ---- resolve_method --------------------------------------------------------------------
@pytest.mark.parametrize("role, cache, expected", [
    ("prefill", True, LoadBalanceMethod.CACHE_AWARE),
    ("prefill", False, LoadBalanceMethod.TOTAL_TOKENS),
    ("decode", True, LoadBalanceMethod.TOTAL_REQUESTS),
    ("mixed", True, LoadBalanceMethod.CACHE_AWARE),
    ("mixed", False, LoadBalanceMethod.PREFILL_TOKENS),
])
def test_auto_resolves_by_role_and_prefix_cache(role, cache, expected):
    assert resolve_method("auto", role, has_prefix_cache=cache) is expected


CONCRETE = [m for m in LoadBalanceMethod if m is not LoadBalanceMethod.AUTO]


@pytest.mark.parametrize("method", CONCRETE)
def test_concrete_methods_resolve_to_themselves(method):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_method(method.value, "mixed") is method
        assert resolve_method(method, "prefill") is method
        if method is not LoadBalanceMethod.CACHE_AWARE:
            assert resolve_method(method, "decode") is method


def test_cache_aware_needs_ranks_that_cache():
    with pytest.raises(InvalidLoadBalanceMethod, match="decode ranks keep no prefix cache"):
        resolve_method("cache_aware", "decode")
    with pytest.raises(InvalidLoadBalanceMethod, match="--disable-radix-cache"):
        resolve_method("cache_aware", "mixed", has_prefix_cache=False)


@pytest.mark.parametrize("old, new", [("shortest_queue", LoadBalanceMethod.TOTAL_REQUESTS),
                                      ("minimum_tokens", LoadBalanceMethod.TOTAL_TOKENS)])
def test_deprecated_names_warn_and_resolve(old, new):
    with pytest.warns(DeprecationWarning, match=new.value):
        assert resolve_method(old, "prefill") is new


def test_unknown_method_lists_valid_names():
    with pytest.raises(InvalidLoadBalanceMethod) as err:
        resolve_method("decode_round_robin", "mixed")
    assert isinstance(err.value, ValueError)
    for name in ("round_robin", "follow_bootstrap_room", "total_requests", "total_tokens", "auto"):
        assert name in str(err.value)


def test_unknown_role_is_named_error():
    with pytest.raises(InvalidRoleError):
        resolve_method("auto", "both")


# ---- least-loaded methods --------------------------------------------------------------
@FAST
@given(data=st.data(), reqs=loads, start=st.integers(0, 9))
def test_total_requests_picks_a_live_minimum(data, reqs, start):
    """total_requests returns a live rank whose load is the minimum over live ranks."""
    alive = data.draw(alive_for(len(reqs)))
    state = RotationState(start)
    if not any(alive):
        with pytest.raises(NoLiveRankError):
            total_requests(reqs, alive, state)
        return
    rank = total_requests(reqs, alive, state)
    assert alive[rank]
    assert reqs[rank] == min(r for r, a in zip(reqs, alive) if a)


@FAST
@given(data=st.data(), toks=loads, start=st.integers(0, 9))
# Ranks 0 and 1 tie on tokens; rank 2, with more tokens, has the fewest requests.
@example(data=Draws([1, 1, 0], (True, True, True)), toks=[0, 0, 1], start=0)
def test_total_tokens_picks_min_tokens_then_min_requests(data, toks, start):
    """total_tokens returns a live rank with the fewest tokens, then the fewest requests."""
    n = len(toks)
    reqs = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    alive = data.draw(alive_for(n))
    state = RotationState(start)
    if not any(alive):
        with pytest.raises(NoLiveRankError):
            total_tokens(toks, reqs, alive, state)
        return
    rank = total_tokens(toks, reqs, alive, state)
    live = [(t, r) for t, r, a in zip(toks, reqs, alive) if a]
    assert alive[rank]
    assert (toks[rank], reqs[rank]) == min(live)


@FAST
@given(data=st.data(), prefill=loads, start=st.integers(0, 9))
def test_prefill_tokens_picks_min_prefill_then_total_tokens(data, prefill, start):
    """prefill_tokens returns a live rank with the fewest prompt tokens waiting for
    prefill, then the fewest tokens, then the fewest requests."""
    n = len(prefill)
    toks = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    reqs = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    alive = data.draw(alive_for(n))
    state = RotationState(start)
    if not any(alive):
        with pytest.raises(NoLiveRankError):
            prefill_tokens(prefill, toks, reqs, alive, state)
        return
    rank = prefill_tokens(prefill, toks, reqs, alive, state)
    live = [(p, t, r) for p, t, r, a in zip(prefill, toks, reqs, alive) if a]
    assert alive[rank]
    assert (prefill[rank], toks[rank], reqs[rank]) == min(live)
    assert state.next_start == rank + 1


@FAST
@given(data=st.data(), toks=loads, start=st.integers(0, 9), zeros=st.booleans(),
       hot=st.booleans())
def test_cache_aware_with_no_cache_anywhere_is_prefill_tokens(data, toks, start, zeros, hot):
    """No rank caches any of the prompt (the summaries say None, or all zeros): the pick
    and the rotation after it are prefill_tokens' exactly (the prediction is the prefill
    queued alone), and so total_tokens' wherever the prefill queues are equal. The
    requests range wide enough for the guard to exclude a rank, which it must not."""
    n = len(toks)
    reqs = data.draw(st.lists(st.integers(0, 30), min_size=n, max_size=n))
    prefill = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    alive = data.draw(alive_for(n))
    cached = [0] * n if zeros else None
    state, expected_state = RotationState(start), RotationState(start)
    if not any(alive):
        with pytest.raises(NoLiveRankError):
            cache_aware(cached, prefill, toks, reqs, alive, state, hot)
        return
    assert cache_aware(cached, prefill, toks, reqs, alive, state, hot) == \
        prefill_tokens(prefill, toks, reqs, alive, expected_state)
    assert state == expected_state
    level = [prefill[0]] * n
    state, expected_state = RotationState(start), RotationState(start)
    assert cache_aware(cached, level, toks, reqs, alive, state, hot) == \
        total_tokens(toks, reqs, alive, expected_state)
    assert state == expected_state


@pytest.mark.parametrize("cached", [None, [0, 0, 0]])
def test_cache_aware_with_no_cache_anywhere_ignores_the_guard(cached):
    """Rank 0 carries 30 requests against a mean of 10 (over the guard, 20) and 2 against
    a mean of 2/3 (over the hot guard), but with nothing cached the pick is
    prefill_tokens': the least prefill queued, rank 0."""
    toks, alive = [0, 0, 0], [True] * 3
    for reqs, hot in (([30, 0, 0], False), ([2, 0, 0], True)):
        expected = prefill_tokens([0, 5, 5], toks, reqs, alive, RotationState())
        assert expected == 0
        assert cache_aware(cached, [0, 5, 5], toks, reqs, alive, RotationState(), hot) == expected


@FAST
@given(data=st.data(), n=st.integers(1, 8), start=st.integers(0, 9), hot=st.booleans())
def test_cache_aware_picks_the_earliest_first_token_among_ranks_not_hot(data, n, start, hot):
    """The pick is live and within the guard (at most max(GUARD_RATIO * mean, mean +
    GUARD_SLACK) live requests; HOT_GUARD_* for a hot prefix), and no other such rank has
    less prefill queued minus MISS_WEIGHT times cached; among those equal, the fewest
    tokens, then requests."""
    cached = data.draw(st.lists(st.sampled_from([0, 64, 128, 512]), min_size=n, max_size=n))
    prefill = data.draw(st.lists(st.integers(0, 700), min_size=n, max_size=n))
    toks = data.draw(st.lists(st.integers(0, 900), min_size=n, max_size=n))
    reqs = data.draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    alive = data.draw(alive_for(n))
    if not any(alive) or not any(cached):
        return  # the no-cache case is the test above
    rank = cache_aware(cached, prefill, toks, reqs, alive, RotationState(start), hot)
    live = [r for r in range(n) if alive[r]]
    mean = sum(reqs[r] for r in live) / len(live)
    ratio, slack = (HOT_GUARD_RATIO, HOT_GUARD_SLACK) if hot else (GUARD_RATIO, GUARD_SLACK)
    ok = [r for r in live if reqs[r] <= max(ratio * mean, mean + slack)]
    assert rank in ok
    key = lambda r: (prefill[r] - MISS_WEIGHT * cached[r], toks[r], reqs[r])  # noqa: E731
    assert key(rank) == min(key(r) for r in ok)


def test_cache_aware_spills_a_hot_prefix():
    """Rank 0 caches the prefix everyone asks for: it takes requests while its first
    tokens come soonest, and once it carries too many more requests than the mean the
    next ones go elsewhere (the least prefill queued), though rank 0 still wins on TTFT."""
    state = RotationState()
    cached, toks = [2048, 0, 0, 0], [0, 0, 0, 0]
    assert cache_aware(cached, [100, 0, 0, 0], toks, [4, 2, 2, 2], [True] * 4, state) == 0
    # 12 requests against a mean of 4.5: over the guard (max(2 * 4.5, 4.5 + 4) = 9).
    assert cache_aware(cached, [100, 0, 50, 0], toks, [12, 2, 2, 2], [True] * 4, state) in (1, 3)
    # 7 against a mean of 3.25: within it, but above the mean (the hot prefix's guard).
    assert cache_aware(cached, [100, 0, 50, 0], toks, [7, 2, 2, 2], [True] * 4, state) == 0
    assert cache_aware(cached, [100, 0, 50, 0], toks, [7, 2, 2, 2], [True] * 4, state,
                       hot=True) in (1, 3)
    # A dead rank with the prefix is never picked.
    assert cache_aware(cached, [0, 5, 0, 0], toks, [0, 0, 0, 0], [False, True, True, True],
                       state) in (2, 3)


@FAST
@given(data=st.data(), n=st.integers(1, 8), level=st.integers(0, 50), start=st.integers(0, 9))
def test_ties_rotate_over_live_ranks(data, n, level, start):
    """On equal loads that never change, successive picks cycle through every live rank
    once before any repeats (a burst onto equal ranks spreads instead of piling up)."""
    alive = data.draw(alive_for(n))
    live = [r for r in range(n) if alive[r]]
    if not live:
        return
    for method in (lambda s: total_requests([level] * n, alive, s),
                   lambda s: total_tokens([level] * n, [level] * n, alive, s),
                   lambda s: prefill_tokens([level] * n, [level] * n, [level] * n, alive, s)):
        state = RotationState(start)
        picks = [method(state) for _ in range(2 * len(live))]
        assert sorted(picks[:len(live)]) == live
        assert picks[len(live):] == picks[:len(live)]


# ---- round_robin (invariant 4) -----------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 6),
       ops=st.lists(st.one_of(st.just(None), st.integers(0, 5)), max_size=80))
def test_round_robin_even_over_live_ranks_with_deaths(n, ops):
    """Invariant 4 (round_robin): dead ranks are never picked; while the live set stays
    the same, per-rank counts over the live ranks differ by <= 1; and across deaths and
    comebacks, ranks alive the whole time still differ by <= 1.

    ``ops``: None is one pick, an integer r toggles rank r % n dead/alive."""
    alive = [True] * n
    state = RotationState()
    total = [0] * n
    epoch = [0] * n
    always_alive = set(range(n))
    for op in ops:
        if op is not None:
            rank = op % n
            alive[rank] = not alive[rank]
            always_alive.discard(rank)
            epoch = [0] * n
            continue
        if not any(alive):
            with pytest.raises(NoLiveRankError):
                round_robin(tuple(alive), state)
            continue
        rank = round_robin(tuple(alive), state)
        assert alive[rank]
        total[rank] += 1
        epoch[rank] += 1
        live_counts = [epoch[r] for r in range(n) if alive[r]]
        assert max(live_counts) - min(live_counts) <= 1
        if always_alive:
            kept = [total[r] for r in always_alive]
            assert max(kept) - min(kept) <= 1


# ---- follow_bootstrap_room and routed_dp_rank (invariant 5) ------------------------------
@FAST
@given(n=st.integers(1, 64), room=st.integers(0, 2**63 - 1))
def test_follow_bootstrap_room_is_room_mod_n(n, room):
    """Invariant 5a: follow_bootstrap_room returns exactly room % n when that rank lives."""
    assert follow_bootstrap_room(room, (True,) * n) == room % n


def test_follow_bootstrap_room_errors():
    with pytest.raises(MissingBootstrapRoomError):
        follow_bootstrap_room(None, (True, True))
    with pytest.raises(RankUnavailableError):
        follow_bootstrap_room(5, (True, False))  # 5 % 2 == 1 is dead: no silent reroute


@FAST
@given(data=st.data(), n=st.integers(1, 16))
def test_routed_rank_obeyed_or_named_error(data, n):
    """Invariant 5b: a routed rank in range and alive is returned as is; out of range
    is InvalidDpRankError; a dead one is RankUnavailableError."""
    alive = data.draw(alive_for(n))
    rank = data.draw(st.integers(-3, n + 3))
    if not 0 <= rank < n:
        with pytest.raises(InvalidDpRankError):
            routed_rank(rank, alive)
    elif not alive[rank]:
        with pytest.raises(RankUnavailableError):
            routed_rank(rank, alive)
    else:
        assert routed_rank(rank, alive) == rank


@pytest.mark.parametrize("bad", ["1", 1.0, True, None])
def test_routed_rank_must_be_an_int(bad):
    with pytest.raises(InvalidDpRankError):
        routed_rank(bad, (True, True))


def test_cache_aware_with_shared_caches_sends_a_hit_past_a_busy_holder():
    """Ranks that copy each other's cached prefixes: a holder prefilling another prompt
    loses the request to an idle rank (which copies the prefix); an idle holder, or one
    whose queue is shorter than the copy's discount, keeps it."""
    cached, toks, reqs, alive = [2048, 0, 0, 0], [0] * 4, [1, 1, 1, 1], [True] * 4
    busy = [2176, 0, 0, 0]  # rank 0 prefills another group's first question
    assert cache_aware(cached, busy, toks, reqs, alive, RotationState()) == 0
    assert cache_aware(cached, busy, toks, reqs, alive, RotationState(), shared=True) in (1, 2, 3)
    assert cache_aware(cached, [0] * 4, toks, reqs, alive, RotationState(), shared=True) == 0
    short = [MISS_WEIGHT * 2048 // SHARED_DISCOUNT - 1, 0, 0, 0]
    assert cache_aware(cached, short, toks, reqs, alive, RotationState(), shared=True) == 0


@FAST
@given(data=st.data(), n=st.integers(1, 8), start=st.integers(0, 9))
def test_cache_aware_with_shared_caches_counts_every_rank_near_the_deepest(data, n, start):
    """With shared caches the pick is cache_aware's over caches raised to the deepest one
    less SHARED_DISCOUNT of the difference."""
    cached = data.draw(st.lists(st.sampled_from([0, 64, 128, 2048]), min_size=n, max_size=n))
    prefill = data.draw(st.lists(st.integers(0, 3000), min_size=n, max_size=n))
    toks = data.draw(st.lists(st.integers(0, 900), min_size=n, max_size=n))
    reqs = data.draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    alive = data.draw(alive_for(n))
    if not any(alive):
        return
    most = max(cached)
    raised = [most - (most - c) // SHARED_DISCOUNT for c in cached]
    state, expected = RotationState(start), RotationState(start)
    assert cache_aware(cached, prefill, toks, reqs, alive, state, shared=True) == \
        cache_aware(raised if most else cached, prefill, toks, reqs, alive, expected)
    assert state == expected
