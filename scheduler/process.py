"""Entry point of one rank's process: ``run_scheduler(cfg, req_conn, out_conn)``.

Start-up: attach the board (and the prefix summary, whose region this rank's cache
keeps current), mark the row STARTING, build the executor (loads the model), publish
capacity and an empty load, mark READY, send ``RankReady``. Any
exception before that is sent as ``RankError`` and the process exits non-zero.
Then loop: wait for messages (blocking with a timeout while idle, so an idle rank
burns no core but still refreshes its heartbeat), run a scheduler step.
On ``ShutdownReq`` or a closed request pipe the row is marked DEAD and the process
returns; requests still held get an abort output first.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from scheduler.config import SchedulerConfig
from scheduler.executor import Executor
from scheduler.log_format import configure_logging
from scheduler.messages import RankError, RankReady
from scheduler.pd import kv_segment_factory
from scheduler.rank_io import RankPipes, owned_by, retire_dispatcher
from scheduler.roles import rank_name
from shm.board import LoadBoard, RankStatus
from shm.prefix_summary import PrefixSummary

logger = logging.getLogger(__name__)


def run_scheduler(cfg: SchedulerConfig, req_conn, out_conn) -> None:
    """``req_conn``/``out_conn``: this rank's pipes, one of each, or a list of each with
    one per dispatcher (``--api-server-count``, ``scheduler.rank_io``)."""
    configure_logging(cfg.log_level, rank_name(cfg.role, cfg.dp_rank))
    pipes = RankPipes(*(c if isinstance(c, (list, tuple)) else [c] for c in (req_conn, out_conn)))
    board = LoadBoard.attach(cfg.board_name)
    row = board.rank_writer(cfg.dp_rank)
    row.heartbeat()
    row.set_status(RankStatus.STARTING)
    summary = None
    try:
        if cfg.prefix_summary_name:
            summary = PrefixSummary.attach(cfg.prefix_summary_name)
        scheduler = _start(cfg, row, pipes, summary)
    except BaseException as exc:  # report any start-up failure, then exit non-zero
        row.set_status(RankStatus.DEAD)
        try:  # to dispatcher 0's pipe: the launcher reads it at start-up
            pipes.send_to(0, RankError(dp_rank=cfg.dp_rank, message=_describe(exc)))
            pipes.drain()
        except (OSError, ValueError):
            pass
        if summary is not None:
            summary.close()
        board.close()
        sys.exit(1)
    try:
        _loop(scheduler, pipes, board, cfg.heartbeat_interval_s)
    except BaseException as exc:
        if pipes.num_dispatchers == 1 and isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            # The only API process is gone (killed with its launcher): nobody reads this
            # rank's outputs and nothing more can come; stop as on its request pipe's EOF.
            logger.info("the API process is gone (its output pipe is closed): stopping")
            return
        pipes.send_final(RankError(dp_rank=cfg.dp_rank, message=_describe(exc)))
        raise
    finally:
        row.set_status(RankStatus.DEAD)
        try:
            scheduler.close()  # PD: drop hand-off entries, unlink the shared KV segment
        except Exception:
            logger.exception("closing the scheduler failed")  # the launcher reclaims by pid
        del scheduler, row
        if summary is not None:
            summary.close()  # its keys stay until the next writer of this rank flushes
        board.close()


def make_executor(cfg: SchedulerConfig) -> Executor:
    """Build the executor named by ``cfg.executor`` ("real" or "sim"), with a PD prefill
    rank's shared KV segment (``scheduler.pd.kv_segment_factory``: the one place it is
    made; the executor sizes it)."""
    new_kv_segment = kv_segment_factory(cfg)
    if cfg.executor == "real":
        from engine.executor import ModelExecutor
        return ModelExecutor.from_config(cfg, new_kv_segment)
    if cfg.executor == "sim":
        from sim.executor import SimExecutor
        return SimExecutor.from_config(cfg, new_kv_segment)
    raise ValueError(f"unknown executor {cfg.executor!r}: expected 'real' or 'sim'")


def _start(cfg: SchedulerConfig, row, pipes: RankPipes, summary: PrefixSummary | None):
    """Build the executor and the scheduler; ``summary``: where the rank's prefix cache
    publishes what it holds (its ``SummaryWriter`` is the cache's observer)."""
    from scheduler.scheduler import Scheduler

    executor = make_executor(cfg)
    if pipes.num_dispatchers != cfg.num_dispatchers:
        raise ValueError(f"{pipes.num_dispatchers} request pipes for {cfg.num_dispatchers} "
                         "dispatchers")
    try:
        observer = summary.writer(cfg.dp_rank) if summary is not None else None
        importer = None
        if cfg.cross_rank_prefix_cache and summary is not None:
            from scheduler.prefix_share import PrefixImporter
            from scheduler.pd import peer_kv_segment_name
            importer = PrefixImporter(summary, cfg.dp_rank, peer_kv_segment_name(cfg),
                                      executor.forget_peer)
        scheduler = Scheduler(cfg, executor, row, pipes.send, executor.tokenizer,
                              send_stats=pipes.broadcast, send_to=pipes.send_to,
                              cache_observer=observer, prefix_importer=importer)
    except BaseException:
        executor.close()  # a PD prefill rank's shared KV segment
        raise
    row.set_capacity(executor.max_total_num_tokens, scheduler.max_running_requests)
    scheduler.publish_load()
    row.set_status(RankStatus.READY)
    pipes.send_to(0, RankReady(dp_rank=cfg.dp_rank, pid=os.getpid(),
                   max_total_num_tokens=executor.max_total_num_tokens,
                   max_running_requests=scheduler.max_running_requests,
                   context_len=executor.context_len, device=executor.device,
                   **_memory_gb(executor)))
    logger.info("ready on %s: %d KV tokens, %d max running requests", executor.device,
                executor.max_total_num_tokens, scheduler.max_running_requests)
    return scheduler


def _memory_gb(executor) -> dict[str, float]:
    """SGLang's ``memory_usage`` figures: the executor's weights and KV pool in GB."""
    weight_bytes, kv_bytes = executor.memory_bytes()
    return {"weight_gb": weight_bytes / 2**30, "kv_cache_gb": kv_bytes / 2**30}


def _loop(scheduler, pipes: RankPipes, board, idle_wait_s: float) -> None:
    while not scheduler.stopped:
        # Busy ranks only peek; idle ones block until a message or the heartbeat is due.
        # A rank whose executor wants idle steps (lockstep peers wait on it) is busy.
        busy = scheduler.executor.wants_idle_steps
        received, gone = pipes.receive(0 if busy else scheduler.poll_timeout(idle_wait_s))
        messages = [msg for d, msg in received if owned_by(scheduler, d, msg)]
        if gone:
            # Messages read before the EOF still count (a request the API sent, then died).
            scheduler.receive(messages)
            messages = []
            for d in gone:
                ended = retire_dispatcher(scheduler, board, d, "its API process exited")
                logger.info("API process of dispatcher %d is gone: ended its %d request(s)%s",
                            d, ended, "" if pipes.any_open else "; shutting down")
            if not pipes.any_open:
                scheduler.stopped = True
        scheduler.step(messages)
    scheduler.abort_all("the rank is shutting down")
    pipes.drain()  # the last outputs, to API processes that read slowly


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-3:])
