"""Throughput of one rank's model runner on the built-in tiny model (1 torch thread).

    python -m bench.micro.engine [--json PATH] [--device cpu]

Prefill: one request per forward, a fresh prompt of --prompt-len tokens.
Decode: --batch requests (1 and 32) with prefilled prompts of --decode-prompt-len
tokens, then --decode-steps forward passes of one new token each; tokens/s counts
every request's token. Greedy sampling (the sampler costs an argmax).

The machine is shared, so each figure is the best of --rounds rounds, and batch-1 and
batch-32 rounds alternate so that background load hits both alike; medians are
printed too, and beside the ratio of the bests the median of each round's own ratio
(its two batches timed under the same load). Every decode round restarts from the same
prefilled prompts, so all rounds see the same context lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.cli import DefaultsHelpFormatter, positive_int, writable_file
from engine.device import configure_worker_threads, resolve_device
from engine.runner import ForwardReq, ModelRunner
from engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def prefill_round(runner: ModelRunner, prompt_len: int, num_prompts: int) -> float:
    ids = [(7 * i) % 256 for i in range(prompt_len)]
    start = time.perf_counter()
    for _ in range(num_prompts):
        runner.kv_pool.free(prefill(runner, [ids])[0])
    return num_prompts * prompt_len / (time.perf_counter() - start)


def decode_round(runner: ModelRunner, prompt_slots: list[list[int]], steps: int) -> float:
    """Decode `steps` tokens for every request from its prompt; free them after."""
    pool = runner.kv_pool
    slots = [list(s) for s in prompt_slots]
    last = [0] * len(slots)
    start = time.perf_counter()
    for _ in range(steps):
        new = [pool.alloc(1) for _ in slots]
        batch = [
            ForwardReq([last[i]], slots[i], new[i], sampling_params=GREEDY)
            for i in range(len(slots))
        ]
        out = runner.forward(batch)
        for i in range(len(slots)):
            slots[i] += new[i]
            last[i] = out.next_token_ids[i]
    elapsed = time.perf_counter() - start
    for s, p in zip(slots, prompt_slots):
        pool.free(s[len(p) :])
    return len(slots) * steps / elapsed


def prefill(runner: ModelRunner, prompts: list[list[int]]) -> list[list[int]]:
    slots = [runner.kv_pool.alloc(len(p)) for p in prompts]
    runner.forward([ForwardReq(p, [], s, sampling_params=GREEDY) for p, s in zip(prompts, slots)])
    return slots


def run(runner: ModelRunner, args: argparse.Namespace) -> dict[str, list[float]]:
    prompts = {
        bs: [[(i * 31 + j) % 256 for j in range(args.decode_prompt_len)] for i in range(bs)]
        for bs in (1, 32)
    }
    prompt_slots = {bs: prefill(runner, p) for bs, p in prompts.items()}
    rounds: dict[str, list[float]] = {"prefill": [], "bs1": [], "bs32": []}
    prefill_round(runner, args.prompt_len, 1)  # warm-up
    decode_round(runner, prompt_slots[32], 2)
    for _ in range(args.rounds):
        rounds["prefill"].append(prefill_round(runner, args.prompt_len, 2))
        rounds["bs1"].append(decode_round(runner, prompt_slots[1], args.decode_steps))
        rounds["bs32"].append(decode_round(runner, prompt_slots[32], args.decode_steps))
    for slots in prompt_slots.values():
        for s in slots:
            runner.kv_pool.free(s)
    return rounds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.engine",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--json", type=writable_file, help="also write the figures to this file")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                        help="where the model runs")
    parser.add_argument("--prompt-len", type=positive_int, default=512,
                        help="prefill prompt length in tokens")
    parser.add_argument("--decode-prompt-len", type=positive_int, default=128,
                        help="prompt length in tokens of each decoding sequence")
    parser.add_argument("--decode-steps", type=positive_int, default=32,
                        help="decode steps timed per round")
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="timed rounds (each figure the best, the median beside it)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    configure_worker_threads(device)
    capacity = args.prompt_len + 33 * (args.decode_prompt_len + args.decode_steps) + 64
    runner = ModelRunner.from_model_path("tiny", device, max_total_num_tokens=capacity, random_seed=0)
    rounds = run(runner, args)
    best = {name: max(values) for name, values in rounds.items()}
    ratio = best["bs32"] / best["bs1"]
    # The same round's two batches met the same background load: their ratio, per round.
    paired = statistics.median(b32 / b1 for b1, b32 in zip(rounds["bs1"], rounds["bs32"]))
    print(f"model: tiny  device: {device}  torch threads: {torch.get_num_threads()}  "
          f"best of {args.rounds} rounds (median in brackets)")
    labels = {
        "prefill": f"prefill (prompt {args.prompt_len})",
        "bs1": "decode batch 1",
        "bs32": "decode batch 32",
    }
    for name, label in labels.items():
        print(f"{label + ':':24s} {best[name]:9.0f} tok/s  ({statistics.median(rounds[name]):.0f})")
    print(f"{'batch-32 / batch-1:':24s} {ratio:9.1f}x      (target >= 8x; of the bests; "
          f"median of each round's own: {paired:.1f}x)")
    if args.json:
        results = {
            "prefill_tok_s": best["prefill"],
            "decode_tok_s_bs1": best["bs1"],
            "decode_tok_s_bs32": best["bs32"],
            "bs32_over_bs1": ratio,
            "bs32_over_bs1_paired_median": paired,
            "device": device,
            "rounds": rounds,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
