"""Time to first token with a prefix cache hit against the cache off, one rank, in one run.

    python -m bench.micro.prefix_cache [--json PATH] [--rounds 7] [--model-path tiny]

The workload of SGLang's generated-shared-prefix benchmark, one request at a time: a
2,048-token system prompt plus a 128-token question, greedy, one output token. With the
cache on, an earlier request with the same system prompt (another question) has run to
completion, so the measured request reuses its 2,048 tokens and computes its question
only; with the cache off (``disable_radix_cache``) it computes all 2,176. The real rank
scheduler and model executor run in this process (one torch thread, CPU), over a real
board; TTFT is from handing the request to the scheduler to its first output token.

The built-in tiny model has a 2,048-token context, too short for this prompt; the bench
runs its weights (the same seed) with the context raised to 4,096 (rotary embeddings
have no weights to stretch). Rounds alternate cache on and off so background load hits
both alike; the figure is the ratio of the medians, with each round's ratio listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time

from scheduler.config import SchedulerConfig
from scheduler.messages import GenerateReq
from scheduler.scheduler import Scheduler
from shm.board import LoadBoard
from shm.segment import new_launch_id

SYSTEM_LEN, QUESTION_LEN = 2048, 128
TARGET_RATIO = 0.15


def tiny_long_context_executor(context_len: int = 4096, pool_tokens: int = 16384):
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
    pool = KVPool.for_model(config, pool_tokens)
    runner = ModelRunner(config, "cpu", pool, model, random_seed=0)
    return ModelExecutor(runner, context_len, Tokenizer.load("tiny"))


def checkpoint_executor(model_path: str, pool_tokens: int = 16384):
    from scheduler.process import make_executor
    return make_executor(SchedulerConfig(dp_rank=0, board_name="unused", executor="real",
                                         device="cpu", model_path=model_path,
                                         max_total_tokens=pool_tokens))


class OneRank:
    def __init__(self, executor, cache_on: bool):
        self.board = LoadBoard.create(1, 1, new_launch_id())
        cfg = SchedulerConfig(dp_rank=0, board_name=self.board.name,
                              disable_radix_cache=not cache_on)
        self.sent: list = []
        self.sched = Scheduler(cfg, executor, self.board.rank_writer(0), self.sent.append)
        self.dispatcher = self.board.dispatcher_writer(0)

    def ttft(self, rid: str, ids: list[int]) -> tuple[float, int]:
        """Seconds from delivery to the first output token, and the cached tokens."""
        from engine.sampling import SamplingParams
        msg = GenerateReq(rid=rid, input_ids=ids, dispatcher_id=0, counted_tokens=len(ids),
                          sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0,
                                                         ignore_eos=True))
        self.dispatcher.bump(0, len(ids))
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
        self.board.close()


def run(executor, rounds: int, vocab: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    on_s, off_s, hits = [], [], []
    for r in range(rounds):
        system = tok(SYSTEM_LEN)
        for cache_on in ((True, False) if r % 2 == 0 else (False, True)):
            rank = OneRank(executor, cache_on)
            try:
                if cache_on:  # an earlier request with the same system prompt
                    rank.ttft(f"warm{r}", system + tok(QUESTION_LEN))
                seconds, cached = rank.ttft(f"r{r}", system + tok(QUESTION_LEN))
            finally:
                rank.close()
            (on_s if cache_on else off_s).append(seconds)
            if cache_on:
                hits.append(cached)
    ratios = [a / b for a, b in zip(on_s, off_s)]
    return {
        "rounds": rounds,
        "system_prompt_tokens": SYSTEM_LEN, "question_tokens": QUESTION_LEN,
        "ttft_cache_hit_ms": [round(s * 1e3, 2) for s in on_s],
        "ttft_cache_off_ms": [round(s * 1e3, 2) for s in off_s],
        "cached_tokens": hits,
        "ttft_ratio_median": round(statistics.median(on_s) / statistics.median(off_s), 4),
        "ttft_ratio_per_round": [round(x, 4) for x in ratios],
        "target_ratio": TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model-path", default="tiny",
                    help="tiny (its weights with a 4,096-token context) or a checkpoint folder")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    if args.model_path == "tiny":
        executor = tiny_long_context_executor()
    else:
        executor = checkpoint_executor(args.model_path)
    result = run(executor, args.rounds, executor.vocab_size)
    result["model"] = args.model_path
    print(f"model {args.model_path}, CPU, 1 torch thread; system prompt {SYSTEM_LEN} + "
          f"question {QUESTION_LEN} tokens, {args.rounds} rounds")
    print(f"  TTFT cache hit (ms):  {result['ttft_cache_hit_ms']}")
    print(f"  TTFT cache off (ms):  {result['ttft_cache_off_ms']}")
    print(f"  cached tokens per hit: {result['cached_tokens']}")
    print(f"  ratio of medians {result['ttft_ratio_median']} (target <= {TARGET_RATIO}); "
          f"per round {result['ttft_ratio_per_round']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
