"""The real model under the real rank scheduler: batching correctness, board truth,
and the rank process's start-up/shutdown handshake."""

from __future__ import annotations

import logging
import multiprocessing as mp
import random

import pytest

from engine.sampling import SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.messages import (BatchOutput, GenerateReq, RankReady, ShutdownReq,
                                decode_to_server, encode)
from scheduler.scheduler import Scheduler
from shm.board import LoadBoard, RankStatus
from shm.segment import new_launch_id
from tests.board_helpers import read_effective

FOREVER = 1 << 62


@pytest.fixture(scope="module")
def executor():
    from engine.executor import ModelExecutor
    cfg = SchedulerConfig(dp_rank=0, board_name="unused", max_total_tokens=8192, device="cpu")
    return ModelExecutor.from_config(cfg)


@pytest.fixture
def board():
    b = LoadBoard.create(1, 1, launch_id=new_launch_id())
    try:
        yield b
    finally:
        b.close()


def run_all(board, executor, msgs_by_step, sent: list | None = None, free_slots: int = 0,
            **cfg_kw):
    """Deliver ``msgs_by_step[i]`` at step i (dispatching each first), step until idle.
    Returns {rid: output ids}, checking the board row after every batch; ``sent`` gets
    the outputs; ``free_slots``: the pool has only this many (the rest held meanwhile)."""
    cfg = SchedulerConfig(dp_rank=0, board_name=board.name, **cfg_kw)
    sent = [] if sent is None else sent
    held_slots = executor.kv.alloc(executor.kv.num_free - free_slots) if free_slots else []
    sched = Scheduler(cfg, executor, board.rank_writer(0), sent.append, executor.tokenizer)
    dispatcher = board.dispatcher_writer(0)
    step = 0
    while step < len(msgs_by_step) or sched.has_work:
        msgs = msgs_by_step[step] if step < len(msgs_by_step) else []
        for m in msgs:
            dispatcher.bump(0, m.counted_tokens)
        sched.step(msgs)
        snap = board.snapshot()
        held = sched.running + list(sched.waiting)
        assert snap.num_reqs[0] == len(held)
        locked = sched.cache.protected_size if sched.cache is not None else 0
        assert snap.num_tokens[0] == locked + sum(
            r.num_computed - r.prefix_len for r in sched.running) + sum(
            r.fill_len - r.num_computed for r in sched.running if r.is_prefilling) + sum(
            r.fill_len - r.queued_cached for r in sched.waiting)
        step += 1
        assert step < 5000
    executor.kv.free(held_slots)
    assert sched.num_kv_in_use == 0
    if sched.cache is not None:  # the executor is shared by the module's tests
        assert sched.cache.flush()
    assert executor.kv.num_used == 0
    assert read_effective(board, FOREVER)[:2] == ([0], [0])
    outputs: dict[str, list[int]] = {}
    for batch in sent:
        for o in batch.outputs:
            outputs.setdefault(o.rid, []).extend(o.new_token_ids)
    return outputs


def make_req(rid, prompt, max_new, **params):
    params.setdefault("temperature", 0.0)
    return GenerateReq(rid=rid, input_ids=prompt, dispatcher_id=0, counted_tokens=len(prompt),
                       sampling_params=SamplingParams(max_new_tokens=max_new, ignore_eos=True, **params))


def test_sixteen_requests_together_equal_each_alone(board, executor):
    """Greedy (and seeded sampling) outputs do not depend on what shares the batch."""
    rng = random.Random(7)
    reqs = []
    for i in range(16):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randint(1, 150))]
        params = {} if i % 4 else {"temperature": 0.8, "top_p": 0.9, "sampling_seed": i}
        reqs.append((f"r{i}", prompt, rng.randint(1, 24), params))
    alone = {}
    for rid, prompt, max_new, params in reqs:
        alone.update(run_all(board, executor, [[make_req(rid, prompt, max_new, **params)]]))
    # Together: staggered arrivals, small prefill budget, so prefill chunks, decodes and
    # new admissions share batches.
    by_step = [[make_req(rid, p, m, **kw) for rid, p, m, kw in reqs[i:i + 3]] for i in range(0, 16, 3)]
    together = run_all(board, executor, by_step, chunked_prefill_size=48, max_running_requests=10)
    assert together == alone
    assert all(len(alone[rid]) == m for rid, _, m, _ in reqs)


def test_retracted_requests_end_as_they_would_alone(board, executor, caplog):
    """Six requests reserving 8 new tokens each in a pool of 560 free slots: decoding
    40 tokens, the newest are retracted and computed again. Greedy and seeded outputs,
    the sampled tokens' logprobs and the prompt's (scored once) match each run alone."""
    rng = random.Random(3)
    reqs = []
    for i in range(6):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randint(60, 100))]
        params = {"temperature": 0.8, "sampling_seed": i} if i % 2 else {}
        reqs.append(GenerateReq(
            rid=f"t{i}", input_ids=prompt, dispatcher_id=0, counted_tokens=len(prompt),
            return_logprob=True, logprob_start_len=len(prompt) - 5, top_logprobs_num=2,
            sampling_params=SamplingParams(max_new_tokens=40, ignore_eos=True,
                                           **{"temperature": 0.0, **params})))
    alone_sent: list[BatchOutput] = []
    for m in reqs:
        run_all(board, executor, [[m]], sent=alone_sent)
    together_sent: list[BatchOutput] = []
    with caplog.at_level(logging.INFO, logger="scheduler.scheduler"):
        run_all(board, executor, [reqs], sent=together_sent, free_slots=560,
                clip_max_new_tokens_estimation=8)

    def joined(sent):
        out = {}
        for o in (o for b in sent for o in b.outputs):
            r = out.setdefault(o.rid, {"ids": [], "lp": [], "top": [], "prompt": []})
            r["ids"] += o.new_token_ids
            r["lp"] += o.output_logprobs
            r["top"] += [[t for _, t in top] for top in o.output_top_logprobs]
            r["prompt"] += o.input_token_logprobs or []
        return out

    alone, together = joined(alone_sent), joined(together_sent)
    assert "retracted request" in caplog.text
    for rid, a in alone.items():
        t = together[rid]
        assert t["ids"] == a["ids"] and len(a["ids"]) == 40, rid
        assert t["top"] == a["top"], rid
        assert t["lp"] == pytest.approx(a["lp"], abs=1e-4), rid
        assert len(a["prompt"]) == 5 and t["prompt"] == pytest.approx(a["prompt"], abs=1e-4)


def test_stop_strings_and_eos_finish_requests(board, executor):
    prompt = list(b"Once upon a time")
    free_run = run_all(board, executor, [[make_req("free", prompt, 40)]])["free"]
    text = executor.tokenizer.decode(free_run)
    stop = text[10:12]
    assert stop
    cut = run_all(board, executor, [[make_req("stop", prompt, 40, stop=[stop])]])["stop"]
    assert len(cut) < 40
    assert stop in executor.tokenizer.decode(cut)


def test_a_stop_string_may_spell_a_special_token(board, executor):
    """A stop string is matched against the text with the special tokens in it, as
    SGLang's is (``<|im_end|>`` as a stop string for a model whose EOS is another
    token), whatever ``skip_special_tokens`` does to the text the client gets."""
    from engine.tiny import PAD_ID, PAD_TOKEN
    prompt = list(b"Once upon a time")
    forced = {str(PAD_ID): 100.0}  # every token the special <|pad|>
    outputs = run_all(board, executor, [[
        make_req("special", prompt, 8, stop=[PAD_TOKEN], logit_bias=forced),
        make_req("inside", prompt, 8, stop=["d|><|p"], logit_bias=forced),
        make_req("free", prompt, 8, logit_bias=forced)]])
    assert outputs["special"] == [PAD_ID]
    assert outputs["inside"] == [PAD_ID, PAD_ID]
    assert outputs["free"] == [PAD_ID] * 8


# ---- the rank process ----------------------------------------------------------------

def test_rank_process_reports_ready_serves_and_shuts_down(board):
    from scheduler.process import run_scheduler
    ctx = mp.get_context("spawn")
    req_recv, req_send = ctx.Pipe(duplex=False)
    out_recv, out_send = ctx.Pipe(duplex=False)
    cfg = SchedulerConfig(dp_rank=0, board_name=board.name, max_total_tokens=4096, device="cpu")
    proc = ctx.Process(target=run_scheduler, args=(cfg, req_recv, out_send), daemon=True)
    proc.start()
    try:
        assert out_recv.poll(60), "rank never reported"
        ready = decode_to_server(out_recv.recv_bytes())
        assert isinstance(ready, RankReady), ready
        assert ready.max_total_num_tokens == 4096 and ready.device == "cpu"
        assert board.snapshot().status[0] == RankStatus.READY
        assert board.snapshot().max_total_num_tokens[0] == 4096
        board.dispatcher_writer(0).bump(0, 5)
        req_send.send_bytes(encode(make_req("p", [10, 20, 30, 40, 50], 6)))
        tokens, finish = [], None
        while finish is None:
            assert out_recv.poll(30), "no output"
            msg = decode_to_server(out_recv.recv_bytes())
            for o in msg.outputs:
                tokens.extend(o.new_token_ids)
                finish = o.finish_reason
        assert finish == {"type": "length", "length": 6} and len(tokens) == 6
        req_send.send_bytes(encode(ShutdownReq()))
        proc.join(30)
        assert proc.exitcode == 0
        assert board.snapshot().status[0] == RankStatus.DEAD
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
