"""Cached prefixes shared across ranks (``--enable-cross-rank-prefix-cache``): a rank copies
the KV of what a peer caches instead of computing it, the outputs equal a rank that
computed everything, a copy the peer's eviction could have spoilt is dropped, nothing
is left held; the slot records and eviction count of the summary; the server flag.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.sampling import SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.messages import GenerateReq
from scheduler.prefix_hash import BLOCK_LEN, chain_hashes, prefix_digests, summary_key
from scheduler.prefix_share import PrefixImporter
from scheduler.scheduler import Scheduler
from server.args import InvalidServerArgs, ServerArgs, validate_args
from shm.board import LoadBoard
from shm.prefix_summary import PrefixSummary, buckets_for
from shm.segment import launch_id_of, list_segments, new_launch_id
from tests.board_helpers import read_effective

FOREVER = 1 << 62
POOL = 4096


class Ranks:
    """``n`` in-process ranks of one launch (real tiny model, CPU) sharing their caches."""

    def __init__(self, n: int = 2, share: bool = True, executor: str = "real"):
        launch = new_launch_id()
        self.board = LoadBoard.create(n, 1, launch)
        self.summary = PrefixSummary.create(n, buckets_for(POOL), launch, slot_records=share)
        from scheduler.process import make_executor
        self.sent: list = []
        self.scheds: list[Scheduler] = []
        try:
            for r in range(n):
                cfg = SchedulerConfig(
                    dp_rank=r, board_name=self.board.name, executor=executor, device="cpu",
                    max_total_tokens=POOL, chunked_prefill_size=64, sim_profile="instant",
                    prefix_summary_name=self.summary.name, cross_rank_prefix_cache=share)
                ex = make_executor(cfg)
                importer = PrefixImporter(self.summary, r) if share else None
                self.scheds.append(Scheduler(
                    cfg, ex, self.board.rank_writer(r), self.sent.append, ex.tokenizer,
                    cache_observer=self.summary.writer(r), prefix_importer=importer))
            self.dispatcher = self.board.dispatcher_writer(0)
        except BaseException:
            self._release()
            raise

    def send(self, rank: int, rid: str, prompt: list[int], max_new: int = 6) -> None:
        self.dispatcher.bump(rank, len(prompt))
        self.scheds[rank].step([GenerateReq(
            rid=rid, input_ids=prompt, sampling_params=SamplingParams(
                temperature=0.0, max_new_tokens=max_new), dispatcher_id=0,
            counted_tokens=len(prompt))])
        for _ in range(10_000):
            if not self.scheds[rank].has_work:
                return
            self.scheds[rank].step([])
        raise AssertionError("the rank did not go idle")

    def output(self, rid: str) -> tuple[list[int], int]:
        ids, cached = [], None
        for batch in self.sent:
            for o in getattr(batch, "outputs", ()):
                if o.rid == rid:
                    ids += o.new_token_ids
                    cached = o.cached_tokens
        return ids, cached

    def close(self) -> None:
        try:
            for s in self.scheds:
                assert s.num_kv_in_use == 0
                assert s.cache.flush()
                assert s.executor.kv.num_used == 0
            assert read_effective(self.board, FOREVER)[:2] == ([0] * len(self.scheds),) * 2
        finally:
            self._release()

    def _release(self) -> None:
        for s in self.scheds:
            s.close()
        self.summary.close()
        self.board.close()


def _prompt(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, 250, n).tolist()


@pytest.mark.parametrize("executor", ["real", "sim"])
def test_a_rank_copies_what_a_peer_caches_and_answers_as_if_it_computed_it(executor):
    system = _prompt(1, 300)
    first, second = system + _prompt(2, 20), system + _prompt(3, 25)
    ranks = Ranks(executor=executor)
    alone = Ranks(share=False, executor=executor)
    try:
        ranks.send(0, "a", first)
        ranks.send(1, "b", second)  # rank 1 has never seen the system prompt
        ids, cached = ranks.output("b")
        assert cached == 256  # the full blocks rank 0 caches: 4 of 64 tokens
        importer = ranks.scheds[1].prefix_importer
        assert (importer.num_copied_tokens, importer.num_dropped) == (256, 0)
        # Cached as a copy that rank 0 still holds: the first to go when rank 1 evicts.
        cache1 = ranks.scheds[1].cache
        copy = cache1.match_prefix(system[:256])[1]
        assert copy.copy_key is not None and cache1.held_elsewhere(copy.copy_key)
        alone.send(1, "b", second)  # the same prompt computed whole
        assert ids == alone.output("b")[0] and alone.output("b")[1] == 0
        # The copy is rank 1's own cache now: the same prompt again copies nothing.
        ranks.send(1, "c", second)
        assert ranks.output("c")[1] == len(second) - 1
        assert importer.num_copied_tokens == 256
        assert copy.copy_key is None  # reused here: rank 1's own, evicted as any entry
        # And rank 1 publishes what it copied: rank 0, flushed, copies it back.
        assert ranks.scheds[0].cache.flush()
        ranks.send(0, "d", first)
        assert ranks.output("d")[1] == 256
        if executor == "real":  # simulated tokens differ by request id
            assert ranks.output("d")[0] == ranks.output("a")[0]
    finally:
        ranks.close()
        alone.close()


def test_a_copy_the_peer_could_have_overwritten_is_dropped_and_the_prompt_computed():
    system = _prompt(4, 200)
    ranks = Ranks()
    try:
        ranks.send(0, "a", system + [7, 8, 9])
        rank1 = ranks.scheds[1]
        copy = rank1.executor.copy_prefix

        def evict_meanwhile(peer, src, dst):  # rank 0 lets slots go during the copy
            copy(peer, src, dst)
            ranks.scheds[0].cache.evict(1)
        rank1.executor.copy_prefix = evict_meanwhile
        ranks.send(1, "b", system + [10, 11])
        assert rank1.prefix_importer.num_dropped == 1
        assert rank1.prefix_importer.num_copied_tokens == 0
        ids, cached = ranks.output("b")
        assert cached == 0
        ranks.scheds[0].cache.flush()
        ranks.send(0, "ref", system + [10, 11])  # computed whole on rank 0
        assert ids == ranks.output("ref")[0]
    finally:
        ranks.close()


def test_slot_records_and_the_eviction_count():
    launch = new_launch_id()
    with PrefixSummary.create(2, 64, launch, slot_records=True) as summary:
        w = summary.writer(1)
        tokens = list(range(3, 3 + 3 * BLOCK_LEN))
        slots = list(range(1000, 1000 + len(tokens)))
        w.on_cached(tokens, 0, slots=slots)
        cached, hashes = summary.lookup(tokens)
        assert cached == [0, 3 * BLOCK_LEN]
        digests = prefix_digests(tokens, 3)
        records = summary.block_slots(1, hashes, digests[1:], 1, 3)
        assert np.concatenate(records).tolist() == slots[BLOCK_LEN:]
        assert summary.block_slots(0, hashes, digests, 0, 3) == []  # rank 0 holds none
        before = summary.evictions(1)
        w.on_evicted(tokens, 2 * BLOCK_LEN + 5)  # part of block 2 goes
        assert summary.evictions(1) == before + 1
        assert len(summary.block_slots(1, hashes, digests, 0, 3)) == 2
        other = list(range(500, 500 + BLOCK_LEN))
        w.on_cached(other, 0)  # published without slots: never copied
        assert summary.block_slots(1, summary.lookup(other)[1], prefix_digests(other, 1),
                                   0, 1) == []
        w.close()
    with PrefixSummary.create(1, 64, new_launch_id()) as plain:
        assert plain.records is None
        with pytest.raises(ValueError, match="no slot records"):
            plain.block_slots(0, [1], [b""], 0, 1)
        with pytest.raises(ValueError, match="no slot records"):
            PrefixImporter(plain, 0)


def test_no_segment_is_left_behind():
    before = set(list_segments())
    Ranks().close()
    assert set(list_segments()) == before


def test_the_flag_is_refused_where_it_cannot_work():
    for kw in ({"disable_radix_cache": True}, {"disaggregation_mode": "decode"}):
        with pytest.raises(InvalidServerArgs, match="cross-rank-prefix-cache"):
            validate_args(ServerArgs(enable_cross_rank_prefix_cache=True, **kw))
    for mode in ("pd", "prefill"):  # prefill ranks cache prefixes, and may share them
        validate_args(ServerArgs(enable_cross_rank_prefix_cache=True, disaggregation_mode=mode))
    from server.ranks import scheduler_configs
    args = ServerArgs(enable_cross_rank_prefix_cache=True, device="cuda", dp_size=2)
    from scheduler.roles import Role
    from server.placement import LaunchPlan, RankPlan
    plan = LaunchPlan(ranks={Role.MIXED: tuple(RankPlan(f"cuda:{i}", 64) for i in range(2))})
    with pytest.raises(InvalidServerArgs, match="CUDA IPC"):
        scheduler_configs(args, "board", plan=plan)


def test_a_served_prompt_reuses_another_ranks_cache_and_leaves_no_segment(tmp_path):
    """``python -m engine.serve --enable-cross-rank-prefix-cache`` with two CPU ranks: a
    prompt sent to rank 0 and then to rank 1 comes back from rank 1 with rank 0's full
    blocks cached and the same greedy text; each rank's KV segment goes at shutdown."""
    import httpx

    from tests.server_helpers import ServerProcess

    prompt = _prompt(5, 400)
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    with ServerProcess("--device", "cpu", "--dp-size", "2", "--enable-cross-rank-prefix-cache",
                       "--decode-log-interval", "1", log_path=tmp_path / "server.log") as server:
        launch = launch_id_of(server.segments()[0])
        segments = [s for s in list_segments() if f".{launch}.kv-m" in s]  # the ranks' own
        assert len(segments) == 2
        answers = [httpx.post(server.url + "/generate", json={**body, "routed_dp_rank": r},
                              timeout=60).json() for r in (0, 1)]
        deadline = time.monotonic() + 20  # the figures travel beside the outputs
        while True:
            states = httpx.get(server.url + "/server_info", timeout=10).json()["internal_states"]
            if states[1]["copied_prefix_tokens"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert [a["meta_info"]["cached_tokens"] for a in answers] == [0, 384]
    # Each rank reports what it copied (with its periodic figures, every decode batch here).
    assert [s["copied_prefix_tokens"] for s in states] == [0, 384]
    assert [s["dropped_prefix_copies"] for s in states] == [0, 0]
    assert answers[0]["text"] == answers[1]["text"]
    assert segments and not set(segments) & set(list_segments())


@pytest.mark.parametrize("api_servers", ["1", "2"])
def test_a_dead_ranks_cache_is_not_copied(tmp_path, api_servers):
    """Rank 0 caches a prompt and is killed: the same prompt then runs on rank 1 as a
    miss (rank 0's summary is withdrawn when it is marked dead). Its KV segment is
    unlinked then, and rank 1, which had mapped it to copy another prompt, unmaps it
    (both stayed until shutdown: a whole KV pool held by a dead rank). With several API
    processes too (they mark it dead; the summary was not withdrawn there either)."""
    import os
    import signal

    import httpx

    from tests.server_helpers import ServerProcess

    prompt = _prompt(7, 300)
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    copied = {"input_ids": _prompt(8, 300), "sampling_params": {"max_new_tokens": 1}}
    with ServerProcess("--device", "cpu", "--dp-size", "2", "--enable-cross-rank-prefix-cache",
                       "--api-server-count", api_servers,
                       log_path=tmp_path / "server.log") as server:
        first = httpx.post(server.url + "/generate", json={**body, "routed_dp_rank": 0},
                           timeout=60).json()
        for rank in (0, 1):  # rank 1 copies this one from rank 0: it maps rank 0's pool
            reply = httpx.post(server.url + "/generate", json={**copied, "routed_dp_rank": rank},
                               timeout=60).json()
        assert reply["meta_info"]["cached_tokens"] > 0, reply["meta_info"]
        ranks = httpx.get(server.url + "/server_info", timeout=10).json()["ranks"]
        victim, peer = (next(r["pid"] for r in ranks if r["dp_rank"] == d) for d in (0, 1))
        pool = f".{victim}."  # segment names carry their creator's pid
        assert pool in open(f"/proc/{peer}/maps").read()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(server.url + "/health", timeout=10).json()["dead_ranks"] != [0]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        again = httpx.post(server.url + "/generate", json=body, timeout=60).json()
        assert not [s for s in list_segments() if pool in s]
        assert pool not in open(f"/proc/{peer}/maps").read()
    assert again["meta_info"]["dp_rank"] == 1
    assert again["meta_info"]["cached_tokens"] == 0, again["meta_info"]
    assert again["text"] == first["text"]


def test_pd_prefill_ranks_share_their_caches_and_decode_answers_the_same(tmp_path):
    """``--disaggregation-mode pd --enable-cross-rank-prefix-cache``, two CPU prefill
    ranks and one decode rank: a prompt sent through prefill rank 0 and then through
    prefill rank 1 is prefilled there from rank 0's cached blocks (copied out of the
    segment decode reads rank 0's hand-offs from), and decode answers it with the same
    greedy text; the prefill ranks report what they copied."""
    import httpx

    from tests.server_helpers import ServerProcess

    prompt = _prompt(6, 400)
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    with ServerProcess("--device", "cpu", "--disaggregation-mode", "pd", "--prefill-dp-size",
                       "2", "--decode-dp-size", "1", "--enable-cross-rank-prefix-cache",
                       "--decode-log-interval", "1", log_path=tmp_path / "server.log") as server:
        launch = launch_id_of(server.segments()[0])
        answers = [httpx.post(server.url + "/generate", json={
            **body, "disagg_prefill_dp_rank": r}, timeout=60).json() for r in (0, 1)]
        deadline = time.monotonic() + 20  # the figures travel beside the outputs
        while True:
            states = httpx.get(server.url + "/server_info", timeout=10).json()["internal_states"]
            prefill = [s for s in states if s["disaggregation_mode"] == "prefill"]
            if prefill[1]["copied_prefix_tokens"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        segments = [s for s in list_segments() if f".{launch}." in s]
    assert [a["meta_info"]["cached_tokens"] for a in answers] == [0, 384], answers
    assert [s["copied_prefix_tokens"] for s in prefill] == [0, 384]
    assert [s["dropped_prefix_copies"] for s in prefill] == [0, 0]
    assert answers[0]["text"] == answers[1]["text"]
    assert segments and not set(segments) & set(list_segments())


def test_a_prefill_server_shares_its_ranks_caches_beside_a_decode_server(tmp_path):
    """Two servers, as a gateway pairs them (``--disaggregation-mode prefill`` with the
    flag, and ``decode``): prefill rank 1 copies rank 0's cached blocks, and the decode
    server answers the prompt from either with the same text."""
    import concurrent.futures
    import random

    import httpx

    from tests.server_helpers import ServerProcess

    port = random.randint(20_000, 60_000)  # names the shared tables; no socket
    pair = ["--disaggregation-bootstrap-port", str(port), "--dp-size", "2", "--device", "cpu"]
    decode = ServerProcess("--disaggregation-mode", "decode", *pair,
                           log_path=tmp_path / "decode.log")
    prefill = ServerProcess("--disaggregation-mode", "prefill", "--enable-cross-rank-prefix-cache",
                            *pair, log_path=tmp_path / "prefill.log")
    prompt = _prompt(7, 400)
    answers = []
    try:
        decode.start()
        prefill.start()
        prefill.wait_healthy(90)
        decode.wait_healthy(90)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for r in (0, 1):
                body = {"input_ids": prompt, "routed_dp_rank": r, "bootstrap_port": port,
                        "bootstrap_host": "127.0.0.1", "bootstrap_room": 1000 + r,
                        "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
                to_decode = pool.submit(httpx.post, decode.url + "/generate", json=body,
                                        timeout=60)
                httpx.post(prefill.url + "/generate", json=body, timeout=60)
                answers.append(to_decode.result().json())
        deadline = time.monotonic() + 20
        while True:
            states = httpx.get(prefill.url + "/server_info", timeout=10).json()["internal_states"]
            if states[1]["copied_prefix_tokens"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        try:
            decode.stop()
        finally:
            prefill.stop()
    assert [a["meta_info"]["cached_tokens"] for a in answers] == [0, 384], answers
    assert [s["copied_prefix_tokens"] for s in states] == [0, 384]
    assert answers[0]["output_ids"] == answers[1]["output_ids"]
    assert not prefill.segments() and not decode.segments()


def test_keys_of_a_full_bucket_keep_their_records_in_the_stash():
    """One table bucket (two ways per rank): the third and later blocks of a prompt go to
    the rank's stash (eight ways), so a copy still finds every block's slots; past that
    a key is dropped and the copy stops before it."""
    with PrefixSummary.create(2, 1, new_launch_id(), slot_records=True) as summary:
        w = summary.writer(0)
        tokens = list(range(3, 3 + 11 * BLOCK_LEN))
        slots = list(range(len(tokens)))
        w.on_cached(tokens, 0, slots=slots)
        assert (summary.num_keys(0), summary.num_dropped(0)) == (10, 1)
        hashes, digests = chain_hashes(tuple(tokens), 11, []), prefix_digests(tokens, 11)
        records = summary.block_slots(0, hashes, digests, 0, 11)
        assert np.concatenate(records).tolist() == slots[:10 * BLOCK_LEN]
        w.on_evicted(tokens, 9 * BLOCK_LEN)  # blocks 9 and 10 go (10 was never there)
        assert len(summary.block_slots(0, hashes, digests, 0, 11)) == 9
        w.on_flush()
        assert summary.block_slots(0, hashes, digests, 0, 11) == []
        w.close()


def test_a_key_collision_never_copies_another_prompts_kv():
    """The summary keys are fast hashes a client could make collide: a record published
    under a prompt's key but computed for other tokens (its digest says so) is not
    copied; the rank computes the prompt."""
    victim = _prompt(6, 200)
    crafted = _prompt(7, 200)
    ranks = Ranks()
    try:
        writer = ranks.summary.writer(0)  # rank 0's region, as if its cache held `crafted`
        key = summary_key(chain_hashes(tuple(victim), 1, [])[0])
        writer._insert(key, list(range(BLOCK_LEN)), prefix_digests(crafted, 1)[0])
        ranks.send(1, "v", victim)
        assert ranks.output("v")[1] == 0
        assert ranks.scheds[1].prefix_importer.num_copied_tokens == 0
        writer.on_flush()
    finally:
        ranks.close()
