"""PD disaggregation: outputs equal non-PD token for token, and nothing leaks.

In-process (``tests.pd_local.LocalPD``): real schedulers, boards, route and
hand-off tables and KV segments in shared memory, stepped in one thread; the real tiny
model for equality, the zero-cost simulated executor for the 1,000-request leak run.
The real servers (front door and prefill + decode pair) are in ``test_pd_server.py``.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.pd_helpers import NUM_PROMPTS, greedy, make_workload, non_pd_outputs, real_executor
from tests.pd_local import LocalPD, sim_executor_factory

PREFILL_METHODS = ["round_robin", "follow_bootstrap_room", "total_requests", "total_tokens"]


@pytest.fixture(scope="module")
def workload():
    return make_workload()


@pytest.fixture(scope="module")
def reference(workload):
    return non_pd_outputs(workload)


@pytest.mark.parametrize("prefill_method", PREFILL_METHODS)
def test_pd_greedy_outputs_equal_non_pd(workload, reference, prefill_method):
    """Every prefill method; half the requests name their prefill rank
    (``disagg_prefill_dp_rank``), the others resolve it through the tables; a third
    reach decode one step before prefill (a gateway's race)."""
    with LocalPD(2, 2, real_executor, prefill_method=prefill_method,
                 chunked_prefill_size=128) as pd:
        prefill_ranks = set()
        for i, (rid, ids, n) in enumerate(workload):
            p, _ = pd.submit(rid, ids, greedy(n), room=(i * 7919) ^ 0x5DEECE66D,
                             explicit_prefill_rank=i % 2 == 0, decode_first=i % 3 == 0)
            prefill_ranks.add(p)
            if i % 10 == 9:
                pd.step()  # arrivals spread over steps
        pd.run()
        for rid, ids, n in workload:
            assert pd.output_ids(rid) == reference[rid], rid
            assert pd.finish_reason(rid) == {"type": "length", "length": n}
            first = pd.prefill_outputs[rid]
            assert first[-1].finish_reason == {"type": "length", "length": 1}
        assert prefill_ranks == {0, 1}
        resolved = [ns for s in pd.schedulers["decode"] for ns in s.pd.resolve_ns]
        assert len(resolved) == NUM_PROMPTS // 2  # the ones without an explicit rank
        assert all(v == 0 for v in pd.leftovers().values()), pd.leftovers()


def test_prefill_balances_by_tokens_not_room(workload):
    """total_tokens spreads prompt tokens over prefill ranks (rooms are all even here:
    follow_bootstrap_room would put everything on rank 0)."""
    with LocalPD(2, 1, sim_executor_factory("instant"), prefill_method="total_tokens") as pd:
        tokens = [0, 0]
        for i, (rid, ids, n) in enumerate(workload[:20]):
            p, _ = pd.submit(rid, ids, greedy(n), room=2 * i)
            tokens[p] += len(ids)
        assert min(tokens) > 0.3 * sum(tokens)
        pd.run()


def _drain(pd: LocalPD, timeout_s: float) -> dict:
    """Step until everything is back to zero (orphans need their timeouts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pd.step()
        left = pd.leftovers()
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.005)


def test_thousand_requests_with_aborts_and_orphans_leave_nothing_behind():
    """1,000 requests on 2 prefill + 3 decode simulated ranks: normal ones, decode
    aborted mid-stream, decode aborted while parked, prefill aborted before its
    hand-off, decode orphans (prefill never comes) and prefill orphans (decode never
    comes). Afterwards every pool, board count, held KV and table entry is zero."""
    rng = random.Random(3)
    # The bootstrap timeout is two bounds at once: how long an orphan decode waits for
    # its room, and how long a prefill rank holds a handed-off KV for decode. The second
    # is what an "ok" request needs: decode must claim its KV within it. At 0.4 s a
    # loaded machine once failed this test (an "ok" request ended by a timeout): these
    # ranks are stepped in one thread, a step of five ranks over a 1,000-request backlog
    # can take tens of ms, and decode admits in arrival order, so a KV handed off a few
    # slow steps before its decode rank had room expired (the claim needs 0.1 s left).
    # So the bound is seconds, far above any step, and the orphans' expiry (what the
    # drain waits for) follows from it. The waiting timeout ends only requests that would
    # otherwise succeed (a placed room's KV wait while prefill is queued): no test wait
    # depends on it, so it is far out of reach.
    bootstrap_s = 3.0
    waiting_s = 100 * bootstrap_s
    with LocalPD(2, 3, sim_executor_factory("instant", 1 << 15), prefill_method="round_robin",
                 bootstrap_timeout_s=bootstrap_s, waiting_timeout_s=waiting_s,
                 chunked_prefill_size=256, max_running_requests=64) as pd:
        kinds: dict[str, str] = {}
        streaming: set[str] = set()
        for i in range(1000):
            rid = f"q{i}"
            kind = rng.choices(["ok", "abort_decode", "abort_parked", "abort_prefill",
                                "orphan_decode", "orphan_prefill"], [70, 8, 5, 5, 6, 6])[0]
            kinds[rid] = kind
            pd.submit(rid, [rng.randrange(3, 259) for _ in range(rng.randint(1, 120))],
                      greedy(rng.randint(2, 12)), room=rng.getrandbits(63),
                      prefill=kind != "orphan_decode", decode=kind != "orphan_prefill",
                      explicit_prefill_rank=rng.random() < 0.3)
            if kind == "abort_parked":
                pd.abort(rid, prefill=False)  # before the decode rank could start it
            elif kind == "abort_prefill":
                pd.abort(rid, decode=False)  # arrives with the prefill: before its hand-off
            if i % 7 == 0:
                pd.step()
            if kind == "abort_decode":
                streaming.add(rid)
            for victim in [r for r in streaming if len(pd.outputs[r]) >= 2]:
                streaming.discard(victim)
                if pd.finish_reason(victim) is None:
                    pd.abort(victim)
                    kinds[victim] = "aborted_mid_stream"
        # Orphans expire bootstrap_s after their arrival or hand-off; the margin is for
        # a loaded machine (the drain returns as soon as everything is back to zero).
        left = _drain(pd, 2 * bootstrap_s + 30)
        assert not any(left.values()), left
        by_kind: dict[str, list[dict]] = {}
        for rid, kind in kinds.items():
            if kind != "orphan_prefill":
                by_kind.setdefault(kind, []).append(pd.finish_reason(rid))
        assert all(r["type"] == "length" for r in by_kind["ok"]), \
            [r for r in by_kind["ok"] if r["type"] != "length"][:3]
        assert by_kind.get("aborted_mid_stream"), "no request was aborted mid-stream"
        assert all(r["type"] == "abort" for r in by_kind["aborted_mid_stream"])
        assert all("no prefill placed it" in r["message"] for r in by_kind["orphan_decode"])
        assert all("failed the request" in r["message"] or "aborted" in r["message"]
                   for r in by_kind["abort_prefill"])
        freed = [s.pd for s in pd.schedulers["prefill"]]
        assert sum(f.num_freed_expired for f in freed) >= kinds_count(kinds, "orphan_prefill")


def kinds_count(kinds: dict, kind: str) -> int:
    return sum(1 for k in kinds.values() if k == kind)


def test_real_model_leak_run_with_aborts_and_orphans():
    rng = random.Random(5)
    with LocalPD(1, 2, real_executor, bootstrap_timeout_s=0.5, waiting_timeout_s=0.5,
                 chunked_prefill_size=64) as pd:
        for i in range(40):
            kind = ("ok", "ok", "abort", "orphan_decode", "orphan_prefill")[i % 5]
            pd.submit(f"m{i}", [rng.randrange(3, 259) for _ in range(rng.randint(1, 90))],
                      greedy(rng.randint(2, 10)), room=10_000 + i,
                      prefill=kind != "orphan_decode", decode=kind != "orphan_prefill")
            if kind == "abort":
                pd.step()
                pd.abort(f"m{i}")
        left = _drain(pd, 10)
        assert not any(left.values()), left


def test_decode_rank_retracts_and_recomputes_when_its_pool_runs_out(caplog):
    """A decode rank whose requests decode past their reservation (4 new tokens each)
    in a 700-token pool retracts the newest and computes them again itself: outputs
    still equal non-PD greedy, and nothing is left."""
    import dataclasses
    import logging

    from scheduler.process import make_executor
    rng = random.Random(5)
    workload = [(f"d{i}", [rng.randrange(3, 259) for _ in range(rng.randint(60, 100))], 40)
                for i in range(6)]
    reference = non_pd_outputs(workload)

    def small_pool(cfg):
        return make_executor(dataclasses.replace(cfg, executor="real", max_total_tokens=700,
                                                 device="cpu"))

    with caplog.at_level(logging.INFO, logger="scheduler.scheduler"), \
            LocalPD(1, 1, small_pool, chunked_prefill_size=128,
                    clip_max_new_tokens_estimation=4) as pd:
        for i, (rid, ids, n) in enumerate(workload):
            pd.submit(rid, ids, greedy(n), room=1000 + i)
        pd.run()
        for rid, _, n in workload:
            assert pd.output_ids(rid) == reference[rid], rid
            assert pd.finish_reason(rid) == {"type": "length", "length": n}
        assert pd.schedulers["decode"][0].num_retracted > 0, caplog.text
        assert all(v == 0 for v in pd.leftovers().values()), pd.leftovers()


def test_a_retracted_decode_request_is_not_overtaken_by_later_hand_offs(monkeypatch):
    """A decode rank short of KV (600 slots, 4 new tokens reserved per request) under a
    steady arrival of requests (more than it serves, not so many that prefill's hand-off
    arena overflows): a retracted request goes back in before any request that arrived
    after it is admitted (new hand-offs used to take the room it waited for, and
    one waited 1,700 steps while 123 later requests finished)."""
    from engine.sampling import SamplingParams
    from scheduler.scheduler import Scheduler
    step, retracted, overtaken = [0], {}, []
    original_retract, original_admit = Scheduler._retract, Scheduler._admit_transferred

    def retract(self, req):
        retracted[req.rid] = step[0]
        original_retract(self, req)

    def admit(self, req):
        ok = original_admit(self, req)
        if ok:  # a new hand-off admitted while an earlier request waits retracted
            overtaken.extend(r.rid for r in self.waiting
                             if int(r.rid[1:]) < int(req.rid[1:]))
        return ok

    monkeypatch.setattr(Scheduler, "_retract", retract)
    monkeypatch.setattr(Scheduler, "_admit_transferred", admit)
    params = SamplingParams(max_new_tokens=80, temperature=0.0, ignore_eos=True)
    with LocalPD(1, 1, sim_executor_factory("instant", 600),
                 clip_max_new_tokens_estimation=4) as pd:
        i = 0
        while step[0] < 200 or pd.busy:
            if step[0] < 200 and step[0] % 6 == 0:
                pd.submit(f"a{i}", list(range(1, 41)), params, room=5000 + i)
                i += 1
            pd.step()
            step[0] += 1
            assert step[0] < 5000
        assert retracted and not overtaken, overtaken
        for k in range(i):
            assert pd.finish_reason(f"a{k}") == {"type": "length", "length": 80}
        assert all(v == 0 for v in pd.leftovers().values()), pd.leftovers()
