"""cache_aware through the real front door: rank processes publish what their prefix
caches hold into the summary segment, and the dispatcher sends a prompt to the rank
that holds its prefix (simulated executor, so this tests the plumbing, not a model)."""

from __future__ import annotations

import random

import pytest

from server.args import InvalidServerArgs, ServerArgs, resolve_args
from shm.segment import list_segments
from tests.test_server_app import GREEDY, make_args, serve

SYSTEM = [random.Random(3).randrange(3, 250) for _ in range(300)]


def generate(client, input_ids: list[int]) -> dict:
    resp = client.post("/generate", json={"input_ids": input_ids, "sampling_params": {
        **GREEDY, "max_new_tokens": 2}})
    assert resp.status_code == 200, resp.text
    return resp.json()["meta_info"]


def test_prompts_sharing_a_prefix_go_where_it_is_cached(tmp_path):
    args = make_args(tmp_path, dp_size=4, load_balance_method="cache_aware")
    with serve(args) as (procs, client):
        assert procs.summary is not None and procs.summary.name in list_segments()
        first = generate(client, SYSTEM + [7, 8, 9])
        home = first["dp_rank"]
        assert first["cached_tokens"] == 0
        # Requests run one at a time, so every rank is idle when the next one arrives:
        # only the cache tells rank `home` apart.
        for q in range(10, 16):
            meta = generate(client, SYSTEM + [q, q + 1])
            assert meta["dp_rank"] == home
            assert meta["cached_tokens"] >= len(SYSTEM)
        assert procs.summary.cached_tokens(SYSTEM)[home] == len(SYSTEM) // 64 * 64
        # A prompt nobody holds: prefill_tokens over idle ranks, which rotates.
        ranks = {generate(client, [r % 240 + 3] * 100)["dp_rank"] for r in range(8)}
        assert len(ranks) > 1
        name = procs.summary.name
    assert name not in list_segments()  # the launcher unlinked it


def test_decode_ranks_refuse_cache_aware():
    """Decode ranks keep no prefix cache: asking them to balance by it is refused at
    start-up, before anything is spawned."""
    with pytest.raises(InvalidServerArgs, match="decode ranks keep no prefix cache"):
        resolve_args(ServerArgs(model_path="tiny", executor="sim", disaggregation_mode="pd",
                                decode_load_balance_method="cache_aware"))
