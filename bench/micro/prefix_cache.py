"""Time to first token with a prefix cache hit, and with the prefix copied from another
rank's cache, against the cache off, in one run.

    python -m bench.micro.prefix_cache [--json PATH] [--rounds 7] [--model-path tiny]

The workload of SGLang's generated-shared-prefix benchmark, one request at a time: a
2,048-token system prompt plus a 128-token question, greedy, one output token. With the
cache on, an earlier request with the same system prompt (another question) has run to
completion, so the measured request reuses its 2,048 tokens and computes its question
only; with the cache off (``disable_radix_cache``) it computes all 2,176. The real rank
scheduler and model executor run in this process (one torch thread, CPU), over a real
board; TTFT is from handing the request to the scheduler to its first output token.

"Copied": two ranks sharing their caches (``--enable-cross-rank-prefix-cache``): the
earlier request ran on rank 0, the measured one goes to rank 1, which finds the system
prompt in rank 0's summary, copies its KV out of rank 0's shared pool and computes the
question; its TTFT includes the lookup and the copy.

The built-in tiny model has a 2,048-token context, too short for this prompt; the bench
runs its weights (the same seed) with the context raised to 4,096 (rotary embeddings
have no weights to stretch). Rounds alternate cache on and off so background load hits
both alike; the figure is the ratio of the medians, with each round's ratio listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time

from bench.cli import DefaultsHelpFormatter, positive_int, writable_file
from scheduler.config import SchedulerConfig
from scheduler.messages import GenerateReq
from scheduler.scheduler import Scheduler
from shm.board import LoadBoard
from shm.segment import new_launch_id

SYSTEM_LEN, QUESTION_LEN = 2048, 128
TARGET_RATIO = 0.15


def tiny_long_context_executor(context_len: int = 4096, pool_tokens: int = 16384,
                               new_kv_segment=None):
    """``new_kv_segment``: as for ``ModelExecutor.from_config`` (a pool peers copy from)."""
    import torch

    from engine.config import tiny_model_config
    from engine.device import configure_worker_threads
    from engine.executor import ModelExecutor
    from engine.kv_cache import KVPool
    from engine.loader import empty_model
    from engine.runner import ModelRunner
    from engine.tiny import init_tiny_weights
    from engine.tokenizer import Tokenizer

    configure_worker_threads("cpu")
    config = dataclasses.replace(tiny_model_config(), max_position_embeddings=context_len)
    model = empty_model(config, "cpu", torch.float32)
    init_tiny_weights(model)
    model.reset_rope()
    model.requires_grad_(False)
    segment = None
    if new_kv_segment is not None:
        from engine.kv_transfer import create_kv_segment
        segment = create_kv_segment(new_kv_segment, config, pool_tokens, torch.float32, "cpu")
    pool = KVPool.for_model(config, pool_tokens,
                            buffer=segment.kv_buf if segment is not None else None)
    runner = ModelRunner(config, "cpu", pool, model, random_seed=0)
    return ModelExecutor(runner, context_len, Tokenizer.load("tiny"), segment)


def checkpoint_executor(model_path: str, pool_tokens: int = 16384, cfg_kw=None):
    from scheduler.process import make_executor
    return make_executor(SchedulerConfig(dp_rank=0, board_name="unused", executor="real",
                                         device="cpu", model_path=model_path,
                                         max_total_tokens=pool_tokens, **(cfg_kw or {})))


class PeerPair:
    """Two ranks sharing their caches: ``warm`` runs on rank 0, ``ttft`` on rank 1."""

    def __init__(self, make_executor):
        from scheduler.pd import kv_segment_factory
        from scheduler.prefix_share import PrefixImporter
        from shm.prefix_summary import PrefixSummary, buckets_for

        launch = new_launch_id()
        self.board = LoadBoard.create(2, 1, launch)
        self.summary = PrefixSummary.create(2, buckets_for(16384), launch, slot_records=True)
        self.ranks: list[OneRank] = []
        for r in range(2):
            cfg = SchedulerConfig(dp_rank=r, board_name=self.board.name,
                                  prefix_summary_name=self.summary.name,
                                  cross_rank_prefix_cache=True)
            executor = make_executor(kv_segment_factory(cfg), cfg)
            self.ranks.append(OneRank(executor, True, self.board, r, cfg, dict(
                cache_observer=self.summary.writer(r),
                prefix_importer=PrefixImporter(self.summary, r))))

    def close(self) -> None:
        for rank in self.ranks:
            if rank.sched.cache is not None:
                rank.sched.cache.flush()
            rank.sched.executor.close()
        self.summary.close()
        self.board.close()


class OneRank:
    def __init__(self, executor, cache_on: bool, board=None, rank: int = 0, cfg=None,
                 sched_kw=None):
        self.owns_board = board is None
        self.board = board or LoadBoard.create(1, 1, new_launch_id())
        cfg = cfg or SchedulerConfig(dp_rank=0, board_name=self.board.name,
                                     disable_radix_cache=not cache_on)
        self.rank = rank
        self.sent: list = []
        self.sched = Scheduler(cfg, executor, self.board.rank_writer(rank), self.sent.append,
                               **(sched_kw or {}))
        self.dispatcher = self.board.dispatcher_writer(0)

    def ttft(self, rid: str, ids: list[int]) -> tuple[float, int]:
        """Seconds from delivery to the first output token, and the cached tokens."""
        from engine.sampling import SamplingParams
        msg = GenerateReq(rid=rid, input_ids=ids, dispatcher_id=0, counted_tokens=len(ids),
                          sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0,
                                                         ignore_eos=True))
        self.dispatcher.bump(self.rank, len(ids))
        start = time.perf_counter()
        self.sched.step([msg])
        while not self._first_token(rid):
            self.sched.step([])
        elapsed = time.perf_counter() - start
        while self.sched.has_work:
            self.sched.step([])
        cached = [o.cached_tokens for b in self.sent for o in b.outputs if o.rid == rid]
        return elapsed, cached[-1]

    def _first_token(self, rid: str) -> bool:
        return any(o.rid == rid and o.new_token_ids for b in self.sent for o in b.outputs)

    def close(self) -> None:
        if self.sched.cache is not None:
            self.sched.cache.flush()
        if self.owns_board:
            self.board.close()


def run(executor, rounds: int, vocab: int, seed: int = 0, pair: PeerPair | None = None) -> dict:
    """``pair``: also measure a prefix copied from another rank (``PeerPair``)."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    times: dict[str, list[float]] = {"hit": [], "off": [], "copied": []}
    cached_by: dict[str, list[int]] = {"hit": [], "copied": []}
    kinds = ["hit", "off"] + (["copied"] if pair is not None else [])
    for r in range(rounds):
        system = tok(SYSTEM_LEN)
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order
            if kind == "copied":
                holder, rank = pair.ranks
                holder.ttft(f"warm{r}", system + tok(QUESTION_LEN))
            else:
                holder = rank = OneRank(executor, kind == "hit")
                if kind == "hit":  # an earlier request with the same system prompt
                    rank.ttft(f"warm{r}", system + tok(QUESTION_LEN))
            try:
                seconds, cached = rank.ttft(f"r{r}", system + tok(QUESTION_LEN))
            finally:
                rank.close()
                if holder is not rank:
                    holder.close()
            times[kind].append(seconds)
            if kind in cached_by:
                cached_by[kind].append(cached)
    off = statistics.median(times["off"])
    result = {
        "rounds": rounds,
        "system_prompt_tokens": SYSTEM_LEN, "question_tokens": QUESTION_LEN,
        "ttft_cache_hit_ms": [round(s * 1e3, 2) for s in times["hit"]],
        "ttft_cache_off_ms": [round(s * 1e3, 2) for s in times["off"]],
        "cached_tokens": cached_by["hit"],
        "ttft_ratio_median": round(statistics.median(times["hit"]) / off, 4),
        "ttft_ratio_per_round": [round(a / b, 4) for a, b in zip(times["hit"], times["off"])],
        "target_ratio": TARGET_RATIO,
    }
    if pair is not None:
        result.update({
            "ttft_copied_ms": [round(s * 1e3, 2) for s in times["copied"]],
            "copied_cached_tokens": cached_by["copied"],
            "ttft_copied_ratio_median": round(statistics.median(times["copied"]) / off, 4),
            "ttft_copied_over_hit_median": round(
                statistics.median(times["copied"]) / statistics.median(times["hit"]), 4),
        })
    return result


def tiny_or_folder(text: str) -> str:
    """``tiny`` or a checkpoint folder that exists (what this benchmark loads)."""
    if text != "tiny" and not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"{text} is not 'tiny' or a checkpoint folder")
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.micro.prefix_cache",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--rounds", type=positive_int, default=7, help="timed rounds per figure")
    ap.add_argument("--model-path", type=tiny_or_folder, default="tiny",
                    help="tiny (its weights with a 4,096-token context) or a checkpoint folder")
    ap.add_argument("--json", type=writable_file, help="write the figures here too")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.model_path == "tiny":
        executor = tiny_long_context_executor()
        pair = PeerPair(lambda new_segment, cfg: tiny_long_context_executor(
            new_kv_segment=new_segment))
    else:
        executor = checkpoint_executor(args.model_path)
        pair = PeerPair(lambda new_segment, cfg: checkpoint_executor(args.model_path, cfg_kw=dict(
            dp_rank=cfg.dp_rank, prefix_summary_name=cfg.prefix_summary_name,
            cross_rank_prefix_cache=True)))
    try:
        result = run(executor, args.rounds, executor.vocab_size, pair=pair)
    finally:
        pair.close()
    result["model"] = args.model_path
    print(f"model {args.model_path}, CPU, 1 torch thread; system prompt {SYSTEM_LEN} + "
          f"question {QUESTION_LEN} tokens, {args.rounds} rounds")
    print(f"  TTFT cache hit (ms):  {result['ttft_cache_hit_ms']}")
    print(f"  TTFT cache off (ms):  {result['ttft_cache_off_ms']}")
    print(f"  cached tokens per hit: {result['cached_tokens']}")
    print(f"  ratio of medians {result['ttft_ratio_median']} (target <= {TARGET_RATIO}); "
          f"per round {result['ttft_ratio_per_round']}")
    print(f"  TTFT copied from the other rank (ms): {result['ttft_copied_ms']}, cached tokens "
          f"{result['copied_cached_tokens']}; over cache off {result['ttft_copied_ratio_median']},"
          f" over a hit {result['ttft_copied_over_hit_median']} (medians)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
