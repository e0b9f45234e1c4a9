"""Shared by the PD tests: a mixed-length workload and its non-PD greedy outputs."""

from __future__ import annotations

import dataclasses
import random

from engine.sampling import SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.messages import GenerateReq
from scheduler.scheduler import Scheduler
from shm.board import LoadBoard
from shm.segment import new_launch_id

NUM_PROMPTS = 50


def real_executor(cfg):
    from scheduler.process import make_executor
    return make_executor(dataclasses.replace(cfg, executor="real", max_total_tokens=8192,
                                             device="cpu"))


def greedy(max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)


def make_workload(seed: int = 11) -> list[tuple[str, list[int], int]]:
    """50 (rid, prompt ids, max_new_tokens): 1 to 300 prompt tokens (several chunks)."""
    rng = random.Random(seed)
    lengths = [1, 2, 300] + [rng.choice([rng.randint(3, 40), rng.randint(41, 250)])
                             for _ in range(NUM_PROMPTS - 3)]
    return [(f"r{i}", [rng.randrange(3, 259) for _ in range(n)], rng.randint(1, 8))
            for i, n in enumerate(lengths)]


def non_pd_outputs(workload) -> dict[str, list[int]]:
    """The same requests on one mixed rank, in-process: the reference outputs."""
    board = LoadBoard.create(1, 1, new_launch_id())
    try:
        cfg = SchedulerConfig(dp_rank=0, board_name=board.name, chunked_prefill_size=128)
        executor = real_executor(cfg)
        sent = []
        sched = Scheduler(cfg, executor, board.rank_writer(0), sent.append, executor.tokenizer)
        sched.step([GenerateReq(rid=rid, input_ids=ids, sampling_params=greedy(n), dispatcher_id=0,
                                counted_tokens=len(ids)) for rid, ids, n in workload])
        for _ in range(10_000):
            if not sched.has_work:
                break
            sched.step([])
        out: dict[str, list[int]] = {}
        for batch in sent:
            for o in batch.outputs:
                out.setdefault(o.rid, []).extend(o.new_token_ids)
        return out
    finally:
        board.close()
