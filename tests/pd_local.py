"""An in-process PD deployment: prefill and decode ``Scheduler``s over real shared memory.

Everything a PD launch shares is real here (two load boards, the route and hand-off
tables, the prefill ranks' KV segments, the dispatchers and the ``PDRouter``); only
the processes and pipes are replaced by stepping every scheduler in turn in one
thread, and the API by ``submit``/``abort``. Tests use it to check PD against
non-PD outputs and for leaks; ``bench.micro.pd`` uses it to time the bootstrap path (run
from the repository root, where ``tests`` is importable).

``submit`` follows the front door's order (``scheduler.pd_router``): prefill dispatch
(route entry), then decode dispatch; ``step`` delivers what was submitted, steps
every rank once and routes outputs back, removing a room's route entry when its
prefill request's last output arrives. ``decode_first=True`` delivers the decode half
one step before the prefill half, as a gateway's race can.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from engine.sampling import SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.dispatcher import Dispatcher
from scheduler.messages import AbortReq, BatchOutput, GenerateReq
from scheduler.pd import DEFAULT_HANDOFF_SLOTS, PDConfig, create_tables
from scheduler.pd_decode import DecodeReceiver
from scheduler.pd_prefill import PrefillSender
from scheduler.pd_router import PDRouter
from scheduler.process import make_executor
from scheduler.scheduler import Scheduler
from shm.bootstrap_layout import FAILED
from shm.board import LoadBoard, RankStatus
from shm.segment import new_launch_id
from tests.board_helpers import read_effective

FOREVER_NS = 1 << 62


def sim_executor_factory(profile: str = "instant", pool_tokens: int | None = None):
    return lambda cfg: make_executor(dataclasses.replace(
        cfg, executor="sim", sim_profile=profile, max_total_tokens=pool_tokens))


@dataclasses.dataclass(frozen=True)
class PDTimes:
    bootstrap_timeout_s: float
    waiting_timeout_s: float
    stale_after_s: float


class LocalPD:
    def __init__(self, num_prefill: int, num_decode: int, make_executor: Callable,
                 prefill_method: str = "total_tokens", decode_method: str = "total_requests",
                 bootstrap_timeout_s: float = 300.0, waiting_timeout_s: float = 300.0,
                 tokenizer=None, stale_after_s: float = 300.0, handoff_slots: int | None = None,
                 **cfg_kw):
        """``stale_after_s``: decode fails a request whose prefill rank has not stepped
        for this long (a test that stops stepping the prefill ranks freezes them);
        ``handoff_slots``: each prefill rank's hand-off region (default: the launch's)."""
        self.launch_id = new_launch_id()
        self._closers: list[Callable[[], None]] = []
        try:
            self._build(num_prefill, num_decode, make_executor, prefill_method, decode_method,
                        PDTimes(bootstrap_timeout_s, waiting_timeout_s, stale_after_s),
                        handoff_slots or DEFAULT_HANDOFF_SLOTS, tokenizer, cfg_kw)
        except BaseException:
            self.close()
            raise
        self.inbox: dict[tuple[str, int], list] = {}  # (role, rank) -> messages
        self.outputs: dict[str, list] = {}  # decode rid -> ReqOutputs
        self.prefill_outputs: dict[str, list] = {}
        self.rooms: dict[str, int] = {}  # prefill rid -> room
        self.ranks_of: dict[str, tuple[int, int]] = {}

    def _build(self, num_prefill, num_decode, make_executor, prefill_method, decode_method,
               times: "PDTimes", handoff_slots: int, tokenizer, cfg_kw) -> None:
        self.route_table, self.handoff_table = create_tables(
            self.launch_id, num_prefill, num_decode, handoff_slots=handoff_slots)
        self._closers += [self.handoff_table.close, self.route_table.close]
        self.boards = {}
        for role, n in (("prefill", num_prefill), ("decode", num_decode)):
            board = self.boards[role] = LoadBoard.create(n, 1, self.launch_id, kind=f"board-{role}")
            self._closers.append(board.close)
        pd = PDConfig(self.launch_id, self.route_table.name, self.handoff_table.name,
                      times.bootstrap_timeout_s, times.waiting_timeout_s, times.stale_after_s)
        self.schedulers: dict[str, list[Scheduler]] = {"prefill": [], "decode": []}
        for role, n in (("prefill", num_prefill), ("decode", num_decode)):
            for rank in range(n):
                cfg = SchedulerConfig(dp_rank=rank, board_name=self.boards[role].name, role=role,
                                      pd=pd, **cfg_kw)
                executor = make_executor(cfg)
                row = self.boards[role].rank_writer(rank)
                try:
                    sched = Scheduler(cfg, executor, row, self._sink(role, rank),
                                      tokenizer or executor.tokenizer)
                except BaseException:
                    executor.close()
                    raise
                self._closers.insert(0, sched.close)
                row.set_capacity(executor.max_total_num_tokens, sched.max_running_requests)
                row.set_status(RankStatus.READY)
                sched.publish_load()
                self.schedulers[role].append(sched)
        self.router = PDRouter(
            Dispatcher(self.boards["prefill"], 0, prefill_method, stale_ns=FOREVER_NS),
            Dispatcher(self.boards["decode"], 0, decode_method, stale_ns=FOREVER_NS),
            self.route_table.region_writer(0), failed_linger_s=times.bootstrap_timeout_s)

    # ---- the API's part -----------------------------------------------------------------
    def submit(self, rid: str, input_ids: list[int], params: SamplingParams, room: int, *,
               explicit_prefill_rank: bool = False, decode_first: bool = False,
               prefill: bool = True, decode: bool = True) -> tuple[int | None, int | None]:
        """Dispatch both halves (or one: an orphan on purpose). Returns the ranks."""
        p = d = None
        if prefill:
            p = self.router.dispatch_prefill(room, len(input_ids))
            self.rooms[rid] = room
            self._deliver("prefill", p, self._msg(rid, input_ids, params, room, None),
                          later=decode_first)
        if decode:
            d = self.router.dispatch_decode(room, len(input_ids))
            self._deliver("decode", d, self._msg(rid, input_ids, params, room,
                                                 p if explicit_prefill_rank else None))
            self.outputs.setdefault(rid, [])
        self.ranks_of[rid] = (p, d)
        return p, d

    def abort(self, rid: str, prefill: bool = True, decode: bool = True) -> None:
        p, d = self.ranks_of[rid]
        if prefill and p is not None:
            self._deliver("prefill", p, AbortReq(rid=rid))
        if decode and d is not None:
            self._deliver("decode", d, AbortReq(rid=rid))

    def step(self, roles: tuple[str, ...] = ("prefill", "decode")) -> None:
        """Deliver what is due, step every rank (of ``roles``) once, route the outputs."""
        for role in roles:
            for rank, sched in enumerate(self.schedulers[role]):
                msgs = self.inbox.pop((role, rank), [])
                later = self.inbox.pop((role + "-later", rank), [])
                if later:
                    self.inbox.setdefault((role, rank), []).extend(later)
                sched.step(msgs)

    def run(self, max_steps: int = 100_000, until: Callable[[], bool] | None = None) -> int:
        """Step until every rank is idle (or ``until()``); returns the steps taken."""
        for steps in range(1, max_steps + 1):
            self.step()
            if until() if until is not None else not self.busy:
                return steps
        raise TimeoutError(f"PD still busy after {max_steps} steps")

    @property
    def busy(self) -> bool:
        return bool(self.inbox) or any(s.has_work for ss in self.schedulers.values() for s in ss)

    # ---- results and leak checks --------------------------------------------------------
    def output_ids(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.new_token_ids]

    def finish_reason(self, rid: str) -> dict | None:
        outs = self.outputs.get(rid) or [None]
        return outs[-1].finish_reason if outs[-1] is not None else None

    def leftovers(self) -> dict:
        """Everything that should be zero once all requests ended."""
        # A FAILED route entry is not left over: it lingers (bounded, failed_linger_s) so a
        # decode request arriving late still sees that its prefill failed, and the next
        # dispatch after that expires it.
        left = {"route_entries": sum(1 for e in self.route_table.entries() if e.state != FAILED),
                "handoff_entries": self.handoff_table.num_live()}
        for role, scheds in self.schedulers.items():
            left[f"{role}_kv_used"] = sum(s.num_kv_in_use for s in scheds)
            left[f"{role}_held"] = sum(len(s.pd.held) for s in scheds
                                       if isinstance(s.pd, PrefillSender))
            left[f"{role}_parked"] = sum(len(s.pd.parked) for s in scheds
                                         if isinstance(s.pd, DecodeReceiver))
            left[f"{role}_reqs"] = sum(len(s.reqs) for s in scheds)
            eff_reqs, eff_tokens, _ = read_effective(self.boards[role], FOREVER_NS)
            left[f"{role}_board_reqs"] = sum(eff_reqs)
            left[f"{role}_board_tokens"] = sum(eff_tokens)
        return left

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers = []

    def __enter__(self) -> "LocalPD":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------
    def _msg(self, rid, input_ids, params, room, prefill_rank) -> GenerateReq:
        return GenerateReq(rid=rid, input_ids=input_ids, sampling_params=params, dispatcher_id=0,
                           counted_tokens=len(input_ids), bootstrap_room=room,
                           disagg_prefill_dp_rank=prefill_rank)

    def _deliver(self, role: str, rank: int, msg, later: bool = False) -> None:
        self.inbox.setdefault((role + ("-later" if later else ""), rank), []).append(msg)

    def _sink(self, role: str, rank: int):
        def send(batch: BatchOutput) -> None:
            for out in batch.outputs:
                if role == "decode":
                    self.outputs.setdefault(out.rid, []).append(out)
                    continue
                self.prefill_outputs.setdefault(out.rid, []).append(out)
                if out.finish_reason is not None and out.rid in self.rooms:
                    ok = out.finish_reason.get("type") != "abort"  # as server.inflight
                    self.router.prefill_finished(self.rooms.pop(out.rid), ok)
        return send
