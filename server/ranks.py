"""The rank processes and the shared memory they use, owned by the API process.

``EngineProcesses`` is the ownership boundary of one launch:
- it reclaims segments of crashed runs, then *creates* the load board (the API
  process is the board's owner and dispatcher 0) and, where the ranks keep a prefix
  cache, the prefix summary (``shm.prefix_summary``), and unlinks both in ``close``;
- it spawns one process per DP rank (``multiprocessing`` spawn context) running
  ``rank_main(cfg, req_conn, out_conn)`` (``scheduler.process.run_scheduler``), with
  one one-way pipe API -> rank for requests and one rank -> API for outputs; with
  ``--api-server-count N`` > 1, one of each per dispatcher (lists of N, see
  ``scheduler.rank_io``), whose API ends ``server.api_servers`` hands to the N API
  processes;
- ``wait_ready`` blocks until every rank sent ``RankReady``; a ``RankError``, a rank
  exiting or the timeout raises ``RankStartupError``;
- ``close`` sends ``ShutdownReq`` to every rank, waits a bound, then kills what is
  left (ranks ignore SIGTERM), unlinks any segment a rank created and could not
  unlink itself (a PD prefill rank's KV pool, if it was killed), and only then
  unlinks the board.

In PD modes one launch has a group per role (``server.pd``): each group is one
``EngineProcesses`` with its ``role``, ``dp_size``, its own board (kind
``board-<role>``) and the shared ``PDConfig``. Ranks exit by
  themselves if the API process dies, since their request pipe then reads EOF.

Ranks ignore SIGINT and SIGTERM: Ctrl-C in a terminal reaches the whole process group,
and a service manager's stop every process of the server at once (systemd's default
``KillMode=control-group``); the API process is the one that stops them, in order, with
``ShutdownReq`` once its requests are done, and SIGKILL for a rank that does not listen.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import select
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Callable


from scheduler.config import SchedulerConfig
from scheduler.messages import RankError, RankReady, ShutdownReq, decode_to_server, encode
from scheduler.roles import DisaggregationMode, Role, rank_name
from server.args import InvalidServerArgs, ServerArgs
from server.placement import LaunchPlan, plan_launch
from server.internal_state import RankStatsLog
from server.rank_segments import reclaim_stale, retire_dead_rank, unlink_segments_of
from shm.board import LoadBoard
from shm.prefix_summary import PrefixSummary, buckets_for
from shm.segment import new_launch_id

logger = logging.getLogger(__name__)

API_DISPATCHER_ID = 0  # the API process's dispatcher id when there is one API process

# A prefix summary is sized for this many cached tokens per rank when the KV pool size
# is only known once the ranks start (buckets_for: 256 KiB a rank).
DEFAULT_SUMMARY_KV_TOKENS = 1 << 20

RankMain = Callable[[SchedulerConfig, Connection, Connection], None]


class RankStartupError(RuntimeError):
    """A rank could not start: its error message, or how it exited."""

    def __init__(self, dp_rank: int, message: str):
        super().__init__(f"rank {dp_rank} failed to start: {message}")
        self.dp_rank = dp_rank


@dataclass(eq=False)
class RankHandle:
    """The API's side of one rank: its process and the API ends of its two pipes."""

    dp_rank: int
    process: multiprocessing.process.BaseProcess
    req_conn: Connection  # API -> rank, send only
    out_conn: Connection  # rank -> API, receive only
    ready: RankReady | None = None
    # Set once the API stopped using the rank (it died, its pipe broke, it stalled).
    lost_reason: str | None = None
    lost_at: float = 0.0  # time.monotonic() when it was lost
    is_marked_dead: bool = False
    # Its periodic figures (RankStats), for /server_info's internal_states and /metrics.
    stats: RankStatsLog = dataclasses.field(default_factory=RankStatsLog)
    # --api-server-count N > 1: the API ends of its pipes to every dispatcher d,
    # (request, output); req_conn/out_conn are dispatcher 0's, read at start-up.
    dispatcher_pipes: list[tuple[Connection, Connection]] = dataclasses.field(
        default_factory=list)

    @property
    def is_usable(self) -> bool:
        return self.ready is not None and self.lost_reason is None


def default_rank_main() -> RankMain:
    from scheduler.process import run_scheduler
    return run_scheduler


def rank_entry(rank_main: RankMain, cfg: SchedulerConfig, req_conn: Connection,
               out_conn: Connection) -> None:
    """What each rank process runs (module level, so spawn can pickle it). A rank ignores
    the stop signals (a closed terminal sends SIGHUP to every process of the server):
    the API stops it, after failing or finishing its requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    rank_main(cfg, req_conn, out_conn)


def scheduler_configs(args: ServerArgs, board_name: str, role: Role | None = None,
                      dp_size: int | None = None, pd=None,
                      sim_lockstep_name: str | None = None,
                      plan: LaunchPlan | None = None) -> list[SchedulerConfig]:
    """One config per rank of the group ``role``: its device and KV pool size from
    ``plan`` (``server.placement``; planned here from ``args`` when not given)."""
    role = role or args.role
    ranks = (plan or plan_launch(args)).ranks[role]
    assert len(ranks) == (dp_size or args.dp_size), "the plan was made for other args"
    base = SchedulerConfig(
        dp_rank=0, board_name=board_name, num_dispatchers=args.api_server_count,
        role=role, pd=pd, model_path=args.model_path,
        dtype=args.dtype, max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size, context_length=args.context_length,
        clip_max_new_tokens_estimation=args.clip_max_new_tokens_estimation,
        random_seed=args.random_seed, heartbeat_interval_s=args.heartbeat_interval_s,
        executor=args.executor, sim_profile=args.sim_profile,
        sim_lockstep_name=sim_lockstep_name, sim_time_scale=args.sim_time_scale,
        log_level=args.log_level, decode_log_interval=args.decode_log_interval,
        disable_radix_cache=args.disable_radix_cache,
        cross_rank_prefix_cache=args.enable_cross_rank_prefix_cache)
    if args.enable_cross_rank_prefix_cache and args.executor != "sim" and role != Role.DECODE:
        gpu = [rank.device for rank in ranks if rank.device.startswith("cuda")]
        if gpu:
            raise InvalidServerArgs(
                f"--enable-cross-rank-prefix-cache on {gpu[0]}: ranks copy each other's KV "
                "through shared memory, which needs --device cpu (or --executor sim); CUDA "
                "IPC is not implemented")
    # Each rank its own sampling stream (decode ranks after the prefill ranks of a pd
    # launch), so unseeded requests on different ranks do not draw the same samples.
    seed = args.random_seed or 0
    if role == Role.DECODE and args.disaggregation_mode == DisaggregationMode.PD:
        seed += args.prefill_dp_size or args.dp_size
    return [dataclasses.replace(base, dp_rank=r, random_seed=seed + r, device=rank.device,
                                max_total_tokens=rank.max_total_tokens)
            for r, rank in enumerate(ranks)]


class EngineProcesses:
    """The board plus the rank processes of one launch; ``close`` releases everything."""

    dispatcher_id = API_DISPATCHER_ID  # of the API process serving in this process

    def __init__(self, args: ServerArgs, rank_main: RankMain | None = None, *,
                 role: Role | None = None, dp_size: int | None = None,
                 launch_id: str | None = None, pd=None, plan: LaunchPlan | None = None):
        self.args = args
        # Every rank's device and KV size; the launcher plans (and checks) before it
        # creates anything, stand-alone users get the same plan here.
        self.plan = plan or plan_launch(args)
        self.rank_main = rank_main or default_rank_main()
        self.role = role or args.role
        self.dp_size = dp_size or args.dp_size
        self.num_dispatchers = args.api_server_count  # one per API process
        self.pd = pd  # scheduler.pd.PDConfig for prefill/decode groups
        self.launch_id = launch_id or new_launch_id()
        self.board: LoadBoard | None = None
        # --sim-lockstep: one lockstep segment per group (PD: prefill and decode ranks
        # step apart, as two servers would); created here, unlinked after the ranks stop.
        self.lockstep = None
        # The ranks' prefix-cache summaries (shm.prefix_summary), where the ranks cache
        # (not decode, not with --disable-radix-cache); created here, unlinked in close.
        self.summary: PrefixSummary | None = None
        self.ranks: list[RankHandle] = []

    def start(self) -> "EngineProcesses":
        """Create the board and spawn every rank (does not wait for them)."""
        reclaim_stale()
        kind = "board" if self.role == Role.MIXED else f"board-{self.role}"
        self.board = LoadBoard.create(self.dp_size, self.num_dispatchers,
                                      launch_id=self.launch_id, kind=kind)
        if self.args.sim_lockstep:
            from sim.lockstep import LockstepSegment
            self.lockstep = LockstepSegment.create(self.dp_size, self.launch_id, group=self.role)
        ctx = multiprocessing.get_context("spawn")
        lockstep_name = self.lockstep.name if self.lockstep is not None else None
        cfgs = scheduler_configs(self.args, self.board.name, self.role, self.dp_size, self.pd,
                                 lockstep_name, self.plan)
        if self.role != Role.DECODE and not cfgs[0].disable_radix_cache:
            # The ranks' prefix caches publish into it; cache_aware dispatch reads it.
            kv_tokens = max(c.max_total_tokens or DEFAULT_SUMMARY_KV_TOKENS for c in cfgs)
            kind = "prefix" if self.role == Role.MIXED else f"prefix-{self.role}"
            self.summary = PrefixSummary.create(
                self.dp_size, buckets_for(kv_tokens), self.launch_id, kind=kind,
                slot_records=cfgs[0].cross_rank_prefix_cache)
            cfgs = [dataclasses.replace(c, prefix_summary_name=self.summary.name) for c in cfgs]
        for cfg in cfgs:
            # One request pipe and one output pipe per dispatcher (API process).
            req_pipes = [ctx.Pipe(duplex=False) for _ in range(self.num_dispatchers)]
            out_pipes = [ctx.Pipe(duplex=False) for _ in range(self.num_dispatchers)]
            rank_ends = ([r for r, _ in req_pipes], [s for _, s in out_pipes])
            if self.num_dispatchers == 1:
                rank_ends = (rank_ends[0][0], rank_ends[1][0])
            process = ctx.Process(target=rank_entry, name=f"dpserve-rank-{cfg.dp_rank}",
                                  args=(self.rank_main, cfg, *rank_ends), daemon=True)
            process.start()
            # Drop our copies of the rank's ends: EOF then tells each side the other is gone.
            for (req_recv, _), (_, out_send) in zip(req_pipes, out_pipes):
                req_recv.close()
                out_send.close()
            ours = [(req_send, out_recv)
                    for (_, req_send), (out_recv, _) in zip(req_pipes, out_pipes)]
            self.ranks.append(RankHandle(cfg.dp_rank, process, *ours[0],
                                         dispatcher_pipes=ours if len(ours) > 1 else []))
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every rank sent ``RankReady``; raise ``RankStartupError`` if one
        reports an error, exits, or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        by_handle = {r.out_conn: r for r in self.ranks} | {r.process.sentinel: r for r in self.ranks}
        while starting := [r for r in self.ranks if r.ready is None]:
            left = deadline - time.monotonic()
            if left <= 0:
                names = [r.dp_rank for r in starting]
                raise RankStartupError(names[0], f"not ready after {timeout_s:.0f} s "
                                                 f"(ranks still starting: {names})")
            watched = [r.out_conn for r in starting] + [r.process.sentinel for r in self.ranks]
            for obj in wait(watched, timeout=left):
                self._read_startup_message(by_handle[obj])

    def _read_startup_message(self, rank: RankHandle) -> None:
        msg, eof = None, False
        if rank.out_conn.poll(0):
            try:
                msg = decode_to_server(rank.out_conn.recv_bytes())
            except (EOFError, OSError):
                eof = True
        if isinstance(msg, RankReady):
            rank.ready = msg
            logger.info("%s ready (pid %d, %s, %d KV tokens)", rank_name(self.role, rank.dp_rank),
                        msg.pid, msg.device, msg.max_total_num_tokens)
        elif isinstance(msg, RankError):
            raise RankStartupError(rank.dp_rank, msg.message)
        elif msg is not None:
            raise RankStartupError(rank.dp_rank, f"unexpected message {type(msg).__name__}")
        elif eof or not rank.process.is_alive():
            rank.process.join(2.0)
            raise RankStartupError(rank.dp_rank, f"exited with code {rank.process.exitcode} "
                                                 "during start-up (see its log above)")

    def mark_dead(self, rank: RankHandle) -> None:
        """``retire_dead_rank``, once the rank's process has exited."""
        if rank.is_marked_dead or rank.process.is_alive() or self.board is None:
            return
        retire_dead_rank(self.board, self.summary, rank)

    def close(self) -> None:
        """Stop every rank (ShutdownReq, then kill) and unlink the board."""
        try:
            self._stop_ranks(self.args.shutdown_timeout_s)
        finally:
            self._reclaim_rank_segments()
            if self.lockstep is not None:
                self.lockstep.close()
                self.lockstep = None
            if self.summary is not None:
                self.summary.close()
                self.summary = None
            if self.board is not None:
                self.board.close()
                self.board = None

    def _reclaim_rank_segments(self) -> None:
        """Unlink segments our ranks created and left (killed before their cleanup)."""
        unlink_segments_of({r.process.pid for r in self.ranks if not r.process.is_alive()})

    def _stop_ranks(self, timeout_s: float) -> None:
        for rank in self.ranks:
            if not rank.process.is_alive():
                continue
            try:
                if rank.lost_reason is not None:
                    raise OSError(rank.lost_reason)  # not listening to it: no clean stop
                # A pipe that cannot take a small frame now belongs to a rank that does
                # not read: do not block on it.
                if not select.select([], [rank.req_conn], [], 0.2)[1]:
                    raise OSError("request pipe full")
                rank.req_conn.send_bytes(encode(ShutdownReq()))
            except (OSError, ValueError):
                rank.process.kill()  # it ignores SIGTERM (module docstring)
        deadline = time.monotonic() + timeout_s
        for rank in self.ranks:
            rank.process.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r in self.ranks if r.process.is_alive()]
        if alive:  # they ignore SIGTERM (module docstring)
            logger.warning("kill ranks %s", [r.dp_rank for r in alive])
            for rank in alive:
                rank.process.kill()
            for rank in alive:
                rank.process.join(2.0)
        for rank in self.ranks:
            self.mark_dead(rank)
            rank.req_conn.close()
            rank.out_conn.close()

    def __enter__(self) -> "EngineProcesses":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
