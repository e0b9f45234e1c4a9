"""The dispatcher's count of which prefixes its recent requests reused."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.prefix_traffic import HOT_MIN_REQUESTS, HOT_SHARE, PrefixTraffic


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 12), keys=st.lists(st.one_of(st.none(), st.integers(0, 4)),
                                                 max_size=60))
def test_counts_are_those_of_the_last_window_requests(window, keys):
    traffic = PrefixTraffic(window)
    for i, key in enumerate(keys):
        got = traffic.note(key)
        last = Counter(k for k in keys[max(0, i + 1 - window):i + 1] if k is not None)
        assert got == (last[key] if key is not None else 0)
        assert len(traffic) == min(i + 1, window)
        assert all(traffic.count(k) == last[k] for k in range(5))
    assert sum(traffic._counts.values()) == sum(1 for k in keys[-window:] if k is not None)


def test_hot_is_more_than_half_a_rank_share_and_enough_requests():
    traffic = PrefixTraffic(100)
    for i in range(100):
        traffic.note(i % 10 if i % 2 else None)  # keys 1, 3, ... 9: 10 requests each
    assert len(traffic) == 100
    # 10 of 100 requests at 4 ranks: 0.4 of a rank's share (25), under HOT_SHARE.
    assert not traffic.is_hot(10, 4)
    # At 16 ranks a rank's share is 6.25: 10 is 1.6 of it.
    assert traffic.is_hot(10, 16)
    assert not traffic.is_hot(HOT_MIN_REQUESTS - 1, 1000)  # too few, however many ranks
    assert traffic.is_hot(int(HOT_SHARE * 100 / 4) + 1, 4)


def test_clear_forgets_the_window_and_its_counts():
    """After clear no prefix has any request: one noted then counts 1, not 1 plus the
    requests of before."""
    traffic = PrefixTraffic(100)
    for i in range(20):
        traffic.note(7 if i % 2 else None)
    traffic.clear()
    assert len(traffic) == 0 and traffic.count(7) == 0
    assert traffic.note(7) == 1


def test_window_must_hold_something():
    with pytest.raises(ValueError, match="window"):
        PrefixTraffic(0)
