"""One rank's continuous-batching scheduler.

The loop is named steps (``step``): receive messages, poll transfers, schedule (admit +
pick the batch), forward, finish what finished, publish load to the board, send outputs.
Every rank holds a PD role (``scheduler.pd_role``) and calls it at fixed points; on a
mixed rank it does nothing. In ``poll_transfers`` a decode rank takes in requests whose
KV arrived from prefill, a prefill rank frees KV decode released.

Load accounting (what the board row says, see ``shm.board``):
- ``num_reqs`` = running + waiting; ``num_waiting_reqs`` = waiting;
- ``num_tokens`` = what the rank must hold or compute: KV tokens computed for running
  requests (a cached prefix that several of them read counted once, through the cache's
  locked size) + prompt tokens of requests not computed yet (queued or mid-prefill; a
  queued request less the prefix the cache held when it arrived, which admission will
  most likely reuse).
  Cached tokens no request reads are evictable and are not load. A PD prefill rank counts
  only the prompt tokens not computed yet: that is its work, and the KV it computed
  leaves with the hand-off;
- ``num_prefill_tokens`` = prompt tokens not computed yet (queued or mid-prefill), on
  every rank (so on a PD prefill rank it equals ``num_tokens``; 0 on a decode rank but
  for retracted requests, whose prompt and output are computed again there);
- ``acked[d]`` grows the moment a request from dispatcher d is taken off the pipe, and
  reaches the board in the same publish that first counts the request, so the board's
  in-flight term (dispatched - acked) hands over to the reported term exactly.

When ranks step together (DP attention with expert parallelism; the simulated
executor with ``--sim-lockstep``, ``Executor.steps_in_lockstep``) the row is also
published just before each forward pass, as it will stand when that pass ends: the
requests certain to leave in it (a PD prefill rank's last prompt chunks, requests
sampling their last allowed token) are not counted, nor are the prompt tokens the pass
computes in ``num_prefill_tokens`` (and, on a PD prefill rank, in ``num_tokens``).
Every rank's current pass ends at the same moment, so work already in it delays a new
request equally on every rank; counting it steered
arrivals away from the ranks busy *now* and piled them onto the others' next step
(lockstep prefill with 16k-token chunks: ``total_tokens`` had up to 93% higher mean TTFT
than round robin; ``python -m bench.models.lockstep_model`` shows the effect in a queueing
model). Independent ranks publish after each batch only: there, work in flight does
delay a new request.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from engine.finish import (ABORT_REQUESTED, FinishAbort, FinishLength, FinishReason,
                           StopStringSearch, check_finish)
from engine.sampling import InvalidSamplingParams
from scheduler.batching import ForwardItem, select_batch
from scheduler.config import SchedulerConfig
from scheduler.executor import Executor
from scheduler.messages import (CLIENT_ERROR, SERVER_ERROR, AbortReq, BatchOutput,
                                FlushCacheReq, FlushCacheResult, GenerateReq, PrefixCopyStats,
                                RankStats, ReqOutput, ShutdownReq)
from scheduler.pd_decode import DecodeReceiver
from scheduler.pd_prefill import PrefillSender
from scheduler.pd_role import MixedRole, PDRole
from scheduler.prefix_share import PrefixImporter
from scheduler.radix_cache import CacheObserver, RadixCache
from scheduler.request import Req
from scheduler.roles import Role
from scheduler.stats import DecodeStats, decode_batch_line, prefill_batch_line
from shm.board_writers import RankWriter

logger = logging.getLogger(__name__)

# A decoding request past its reservation grows it by this many slots at a time.
GROW_SLOTS = 64


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, executor: Executor, board_row: RankWriter,
                 send: Callable[[BatchOutput], None], tokenizer=None,
                 send_stats: Callable[[RankStats], None] = lambda stats: None,
                 cache_observer: CacheObserver | None = None,
                 send_to: Callable[[int, BatchOutput], None] | None = None,
                 prefix_importer: PrefixImporter | None = None):
        self.cfg = cfg
        self.executor = executor
        self.board_row = board_row
        self.send = send
        # Outputs go to the API process that sent the request (dispatcher id first).
        self.send_to = send_to or (lambda dispatcher_id, batch: send(batch))
        self.send_stats = send_stats  # the rank's periodic figures (scheduler.stats)
        self.tokenizer = tokenizer  # only needed for stop strings
        self.max_running_requests = cfg.max_running_requests or 256
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.reqs: dict[str, Req] = {}
        self.acked_reqs, self.acked_tokens = board_row.acked_counts()
        # Requests with something to send this step, by object: a refused duplicate rid
        # (another API process's) must not replace the running request's output.
        self.outbox: dict[int, Req] = {}
        self.stopped = False
        self._stop_searches: dict[str, StopStringSearch] = {}
        self._handlers = {
            GenerateReq: self.on_generate,
            AbortReq: self.on_abort,
            FlushCacheReq: self.on_flush_cache,
            ShutdownReq: self.on_shutdown,
        }
        # PD roles (scheduler.pd_role): a prefill rank hands each request off after its
        # first token; a decode rank parks requests until their KV arrives from prefill.
        self.pd = make_pd_role(cfg, executor, self._free_kv)
        self.hands_off = self.pd.hands_off
        # The prefix cache (scheduler.radix_cache); none on a PD decode rank, which
        # receives each prompt's KV from prefill, nor with --disable-radix-cache.
        self.cache: RadixCache | None = None
        if not cfg.disable_radix_cache and cfg.role != Role.DECODE:
            self.cache = RadixCache(executor.kv, cache_observer)
        # --enable-cross-rank-prefix-cache: copy what a peer caches of a prompt beyond
        # this rank's own cache (scheduler.prefix_share) when admitting it.
        self.prefix_importer = prefix_importer if self.cache is not None else None
        if self.prefix_importer is not None:  # copies a peer still holds are evicted first
            self.cache.held_elsewhere = self.prefix_importer.held_by_peer
        self._copies_reported = (0, 0)  # what report_copies last sent
        self.decode_stats = DecodeStats(cfg.decode_log_interval)
        self.num_retracted = 0  # requests sent back to the queue for want of KV

    # ---- the loop --------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running) or self.pd.has_work

    @property
    def num_kv_in_use(self) -> int:
        """KV slots taken, less the cached ones no request reads (evictable): zero on
        an idle rank, whatever its cache holds."""
        evictable = self.cache.evictable_size if self.cache is not None else 0
        return self.executor.kv.num_used - evictable

    def poll_timeout(self, idle_wait_s: float) -> float:
        """How long the rank loop may block on its pipe before the next step: 0 with a
        batch to run; short, backing off, while PD requests wait on shared memory."""
        if self.waiting or self.running:
            return 0.0
        return self.pd.poll_timeout(idle_wait_s)

    def step(self, messages: list) -> None:
        """One iteration; ``messages`` are what ``receive`` took off the pipe."""
        started = self.decode_stats.clock()
        self.receive(messages)
        self.poll_transfers()
        batch = self.schedule()
        # An empty batch still runs when the executor asks (simulated lockstep peers).
        if batch or self.executor.wants_idle_steps:
            if self.executor.steps_in_lockstep:
                self.publish_load(batch)
            results = self.executor.forward(batch)
            self.process_results(batch, results)
        self.publish_load()
        self.send_outputs()
        self.report_stats(batch, started)
        if self.prefix_importer is not None:
            self.report_copies()

    def receive(self, messages: list) -> None:
        for msg in messages:
            self._handlers[type(msg)](msg)

    def schedule(self) -> list[ForwardItem]:
        self._grow_decoding()
        num_waiting = len(self.waiting)
        batch = select_batch(self.running, self.waiting, self.cfg.chunked_prefill_size,
                             self.max_running_requests, self._try_reserve)
        if len(self.waiting) < num_waiting:
            self._log_prefill(batch, num_waiting - len(self.waiting))
        return batch

    def _log_prefill(self, batch: list[ForwardItem], num_new: int) -> None:
        """SGLang's "Prefill batch." line, for a batch that admitted requests."""
        if not logger.isEnabledFor(logging.INFO):
            return
        new = self.running[-num_new:]
        usage = self.num_kv_in_use / max(self.executor.max_total_num_tokens, 1)
        logger.info("%s", prefill_batch_line(
            num_new, sum(len(i.token_ids) for i in batch if i.req.is_prefilling),
            sum(r.prefix_len for r in new), usage, len(self.running), len(self.waiting)))

    def process_results(self, batch: list[ForwardItem], results: list[tuple[int, float]]) -> None:
        sampled = iter(results)
        for item in batch:
            req = item.req
            req.num_computed += len(item.token_ids)
            if item.start_pos < req.prompt_len:
                self._cache_prefilled(req)
            if not item.sample:
                continue
            self._append_token(req, *next(sampled))

    def poll_transfers(self) -> None:
        """PD: start decoding requests whose KV arrived, fail orphans (decode rank);
        free KV that decode released or nobody claimed in time (prefill rank); nothing
        on a mixed rank."""
        ready, failed = self.pd.poll(self._admit_transferred)
        for req, message, status_code in failed:
            req.finish_reason = FinishAbort(message, status_code)
            self._release(req)
            self.outbox[id(req)] = req
        for r in ready:
            r.req.num_computed = r.req.prompt_len
            if r.req.return_logprob:  # the top list prefill computed, in the hand-off
                r.req.output_top_logprobs.append(r.top)
            self._append_token(r.req, r.first_token, r.logprob)
        if ready or failed:
            self.send_outputs()  # the first token goes out now, not after this step's batch

    def publish_load(self, in_flight: list[ForwardItem] = ()) -> None:
        """Write this rank's row. ``in_flight``: the batch about to run, when the row
        should show the load as it will stand after it (lockstep; module docstring)."""
        leaving = self._leaving(in_flight) if in_flight else ()
        running = [r for r in self.running if r not in leaving] if leaving else self.running
        queued = sum(r.fill_len - r.queued_cached for r in self.waiting)
        if self.hands_off:  # PD prefill: the prompt work left
            done_now = sum(len(i.token_ids) for i in in_flight if i.req not in leaving)
            tokens = prefill = (sum(r.fill_len - r.num_computed for r in running)
                                - done_now + queued)
        else:
            computed = sum(r.num_computed - r.prefix_len for r in running)
            if self.cache is not None:  # cached prefixes requests read, each once
                computed += self.cache.protected_size
            uncomputed = sum(r.fill_len - r.num_computed for r in running if r.is_prefilling)
            tokens = computed + uncomputed + queued
            done_now = sum(len(i.token_ids) for i in in_flight
                           if i.req.is_prefilling and i.req not in leaving)
            prefill = uncomputed - done_now + queued
        # PD decode: parked requests (KV not here yet) count as waiting, prompt included.
        parked, parked_tokens = self.pd.pending_load()
        self.board_row.publish(len(running) + len(self.waiting) + parked,
                               len(self.waiting) + parked, tokens + parked_tokens,
                               self.acked_reqs, self.acked_tokens, num_prefill_tokens=prefill,
                               num_kv_tokens=self.num_kv_in_use)
        self.board_row.heartbeat()

    def report_copies(self) -> None:
        """The prefix KV copied from other ranks, to the API when it changed."""
        importer = self.prefix_importer
        figures = (importer.num_copied_tokens, importer.num_dropped)
        if figures != self._copies_reported:
            self._copies_reported = figures
            self.send_stats(PrefixCopyStats(dp_rank=self.cfg.dp_rank,
                                            num_copied_prefix_tokens=figures[0],
                                            num_dropped_prefix_copies=figures[1]))

    def report_stats(self, batch: list[ForwardItem], started: float) -> None:
        """Every ``--decode-log-interval`` decoding batches: SGLang's "Decode batch."
        line, and the same figures to the API (``scheduler.stats``)."""
        num_decoded = sum(1 for item in batch if item.start_pos >= item.req.fill_len)
        step_s = self.decode_stats.on_step(len(batch), num_decoded, started)
        if step_s is None:
            return
        used = self.num_kv_in_use  # as the board's and the "Prefill batch." line's
        parked = self.pd.pending_load()[0]
        stats = RankStats(
            dp_rank=self.cfg.dp_rank, num_running_reqs=len(self.running), num_used_tokens=used,
            token_usage=used / max(self.executor.max_total_num_tokens, 1),
            num_queue_reqs=len(self.waiting) + parked,
            last_gen_throughput=self.decode_stats.last_gen_throughput,
            decode_step_time_s=step_s, num_decode_batches=self.decode_stats.num_decode_batches)
        logger.info("%s", decode_batch_line(stats))
        self.send_stats(stats)

    def _leaving(self, batch: list[ForwardItem]) -> frozenset[Req]:
        """Requests the forward of ``batch`` ends whatever it samples: a PD prefill
        rank's last prompt chunks (handed off), and requests sampling their last
        allowed token."""
        return frozenset(item.req for item in batch if item.sample and (
            self.hands_off or len(item.req.output_ids) + 1 >= item.req.params.max_new_tokens))

    def send_outputs(self) -> None:
        """One ``BatchOutput`` per dispatcher (API process) with something to send."""
        if not self.outbox:
            return
        by_dispatcher: dict[int, list[ReqOutput]] = {}
        for req in self.outbox.values():
            new = req.output_ids[req.num_sent:]
            out = ReqOutput(
                rid=req.rid, new_token_ids=new, finish_reason=req.finish_reason,
                prompt_tokens=req.prompt_len, completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens)
            if req.return_logprob:
                _add_logprobs(out, req)
            by_dispatcher.setdefault(req.dispatcher_id, []).append(out)
            req.num_sent = len(req.output_ids)
        self.outbox.clear()
        for dispatcher_id, outputs in by_dispatcher.items():
            self.send_to(dispatcher_id, BatchOutput(dp_rank=self.cfg.dp_rank, outputs=outputs))

    def abort_all(self, message: str) -> None:
        """End every request this rank holds (at shutdown) and tell the API."""
        for rid in list(self.reqs):
            self._abort(rid, message, SERVER_ERROR)
        self.publish_load()
        try:
            self.send_outputs()
        except (OSError, ValueError):
            pass  # the API side is already gone

    # ---- message handlers --------------------------------------------------------------
    def on_generate(self, msg: GenerateReq) -> None:
        d = msg.dispatcher_id
        self.acked_reqs[d] += 1
        self.acked_tokens[d] += msg.counted_tokens
        req = Req(rid=msg.rid, input_ids=msg.input_ids, params=msg.sampling_params,
                  dispatcher_id=d, counted_tokens=msg.counted_tokens,
                  arrival_time=msg.arrival_time, return_logprob=msg.return_logprob,
                  logprob_start_len=msg.logprob_start_len,
                  top_logprobs_num=msg.top_logprobs_num,
                  bootstrap_room=msg.bootstrap_room,
                  disagg_prefill_dp_rank=msg.disagg_prefill_dp_rank, group_rid=msg.group_rid)
        error = self._admission_error(req)
        if error is not None or msg.rid in self.reqs:
            req.finish_reason = FinishAbort(error or f"duplicate rid {msg.rid!r}", CLIENT_ERROR)
            self.outbox[id(req)] = req
            self.pd.on_refused(req, req.finish_reason.message)
            return
        self.reqs[req.rid] = req
        if not self.pd.park(req):
            if self.cache is not None:
                tokens = req.input_ids[:self._match_limit(req)]
                req.queued_cached = self.cache.cached_len(tokens)
                if self.prefix_importer is not None:  # admission will most likely copy it
                    req.queued_cached = max(req.queued_cached,
                                            self.prefix_importer.shared_len(tokens))
            self.waiting.append(req)

    def on_abort(self, msg: AbortReq) -> None:
        if msg.abort_all:
            rids = list(self.reqs)
        elif msg.requested:  # and the body's other requests (copies under n, its prompts)
            rids = [msg.rid, *(rid for rid, req in self.reqs.items()
                               if req.group_rid == msg.rid and rid != msg.rid)]
        else:
            rids = [msg.rid]
        status = ABORT_REQUESTED if msg.requested else None
        for rid in rids:
            self._abort(rid, msg.message, status)

    def _abort(self, rid: str, message: str, status_code: int | None = None) -> None:
        """End request ``rid`` here; ``status_code`` when the rank, not the API, ends it."""
        req = self.reqs.get(rid)
        if req is None:  # finished here: a prefill rank may still hold its KV for decode
            self.pd.release_handed_off(rid, message)
            return
        if req in self.running:
            self.running.remove(req)
        elif not self.pd.discard(req):
            self.waiting.remove(req)
        req.finish_reason = FinishAbort(message, status_code)
        self.pd.on_abort(req, message)
        self._release(req)
        self.outbox[id(req)] = req

    def on_flush_cache(self, msg: FlushCacheReq) -> None:
        """Empty the prefix cache, unless this rank holds any request (SGLang refuses
        then too: their KV is in use, and the cache could not be emptied)."""
        held = self.pd.num_held
        if self.reqs or held:
            what = [f"{len(self.reqs)} request(s)"] if self.reqs else []
            what += [f"the KV of {held} request(s) handed off, until decode takes it or "
                     "the bootstrap timeout"] if held else []
            result = FlushCacheResult(dp_rank=self.cfg.dp_rank, success=False, message=(
                f"rank {self.cfg.dp_rank} holds {' and '.join(what)}; the cache is flushed "
                "only when no request is running or waiting"))
        elif self.cache is not None and not self.cache.flush():
            result = FlushCacheResult(dp_rank=self.cfg.dp_rank, success=False, message=(
                f"rank {self.cfg.dp_rank}: cached KV is still in use"))
        else:
            result = FlushCacheResult(dp_rank=self.cfg.dp_rank, success=True)
        self.send(result)

    def on_shutdown(self, msg: ShutdownReq) -> None:
        self.stopped = True

    # ---- helpers -----------------------------------------------------------------------
    def _admission_error(self, req: Req) -> str | None:
        ctx = self.executor.context_len
        if req.prompt_len == 0:
            return "the prompt is empty"
        if req.prompt_len >= ctx:
            return f"prompt of {req.prompt_len} tokens does not fit the context length {ctx}"
        try:
            req.params.validate(self.executor.vocab_size, ctx)
        except InvalidSamplingParams as exc:
            return str(exc)
        if (error := self.pd.admission_error(req)) is not None:
            return error
        need, pool = self._reserve_len(req), self.executor.max_total_num_tokens
        if need > pool:
            return (f"request needs {need} KV tokens (prompt + max_new_tokens) but this rank's "
                    f"pool holds {pool}; lower max_new_tokens or raise --max-total-tokens")
        return None

    def _reserve_len(self, req: Req) -> int:
        return self.pd.reserve_len(req, self.executor.context_len)

    def _admit_transferred(self, req: Req) -> bool:
        """PD decode: reserve KV for a request whose prompt KV is ready to copy in; not
        while retracted requests wait (they came first: a new hand-off would take the
        room they need and be retracted ahead of them in turn)."""
        if self.waiting or len(self.running) >= self.max_running_requests \
                or not self._try_reserve(req):
            return False
        self.running.append(req)
        return True

    def _append_token(self, req: Req, token: int, logprob: float) -> None:
        req.output_ids.append(token)
        if req.return_logprob:
            req.output_logprobs.append(logprob)
        self.outbox[id(req)] = req
        req.finish_reason = self._check_finish(req)
        if self.hands_off:  # PD prefill: the first token ends the request on this rank
            error = self.pd.hand_off(req, logprob)
            if error is not None:
                req.finish_reason = FinishAbort(error, SERVER_ERROR)
                self.pd.on_refused(req, error)
            elif req.finish_reason is None:
                req.finish_reason = FinishLength(len(req.output_ids))
        if req.finish_reason is not None:
            self._release(req)

    def close(self) -> None:
        """At exit: free what PD holds in shared memory, unlink the executor's segment."""
        self.pd.close()
        self.executor.close()

    def _try_reserve(self, req: Req) -> bool:
        """Reserve the request's KV: the longest cached prefix of its prompt (locked),
        then free slots for the rest, evicting unused cache entries if the pool needs
        them. False, with nothing held, when the pool cannot fit it now."""
        need = req.initial_len(self._reserve_len(req), self.cfg.clip_max_new_tokens_estimation)
        kv, cache = self.executor.kv, self.cache
        if cache is None:
            if not kv.can_alloc(need):
                return False
            req.slots = kv.alloc(need)
            return True
        tokens = self._match_tokens(req)
        prefix, node = cache.match_prefix(tokens, reuse=True)
        cache.lock(node)  # before evicting: the match itself must stay
        if self.prefix_importer is not None:
            prefix, node = self._copy_shared_prefix(tokens, prefix, node)
        own = need - len(prefix)
        if not self._room_for(own):
            cache.unlock(node)
            return False
        req.slots = prefix + kv.alloc(own)
        req.prefix_len = req.num_computed = len(prefix)
        if not req.num_retractions:  # what the client is told: its first admission's hit
            req.cached_tokens = len(prefix)
        req.cache_node = node
        return True

    def _match_tokens(self, req: Req) -> list[int]:
        """The tokens a cache hit may cover at admission (``_match_limit``)."""
        if req.recompute_len:  # all it knows but the last, whose forward samples
            return (req.input_ids + req.output_ids)[:req.recompute_len - 1]
        return req.input_ids[:self._match_limit(req)]

    def _grow_decoding(self) -> None:
        """Give every decoding request a slot for the token this step computes: one past
        its reservation grows it by up to ``GROW_SLOTS`` (by one when the pool is short of
        that); where the pool (after evicting unused cache) has no room even for one, the
        newest running requests are retracted until it does, or the request itself is
        the newest."""
        for req in list(self.running):  # oldest first: the newest give way
            if req.is_prefilling or req.num_computed < len(req.slots) or req.kv_held:
                continue
            grow = min(GROW_SLOTS, self._reserve_len(req) - len(req.slots))
            if not self._room_for_slots(grow):
                grow = 1  # what this step needs: retract only when not even that fits
                while req in self.running and not self._room_for_slots(grow):
                    self._retract(self.running[-1])
            if req in self.running:
                req.slots += self.executor.kv.alloc(grow)

    def _room_for_slots(self, n: int) -> bool:
        if self.cache is not None:
            return self._room_for(n)
        return self.executor.kv.can_alloc(n)

    def _retract(self, req: Req) -> None:
        """Send a running request back to the head of the queue, its KV freed (what it
        computed into the prefix cache), to be computed again when admitted."""
        self._free_kv(req)
        self.running.remove(req)
        if req.output_ids:
            req.recompute_len = req.seq_len
        else:  # still in its first prefill: its prompt logprobs are computed again
            req.input_token_logprobs.clear()
            req.input_top_logprobs.clear()
        req.num_computed = req.prefix_len = 0
        # Its load while queued: what the cache will not give back (as at arrival).
        req.queued_cached = (self.cache.cached_len(self._match_tokens(req))
                             if self.cache is not None else 0)
        req.num_retractions += 1
        self.num_retracted += 1
        self.waiting.appendleft(req)
        logger.info("rank %d: KV pool full; retracted request %s (%d tokens to compute "
                    "again; %d retractions so far)", self.cfg.dp_rank, req.rid, req.fill_len,
                    self.num_retracted)

    def _room_for(self, n: int) -> bool:
        """Whether ``n`` slots can be allocated now, evicting unlocked cache entries
        (least recently used first) if the pool needs them."""
        kv = self.executor.kv
        if not kv.can_alloc(n):
            self.cache.evict(n - kv.num_free)
        return kv.can_alloc(n)

    def _copy_shared_prefix(self, tokens, prefix: list[int], node):
        """Where a peer caches more of ``tokens`` than the locked match (``prefix``,
        ``node``): copy the difference's KV into fresh slots, cache it, and return the
        longer match, locked in place of the old one. Unchanged when there is nothing to
        copy, no room for it, or the peer evicted during the copy."""
        cache, kv = self.cache, self.executor.kv
        plan = self.prefix_importer.plan(tokens, len(prefix))
        if plan is None:
            return prefix, node
        n = plan.end - plan.start
        if not self._room_for(n):
            return prefix, node
        slots = kv.alloc(n)
        self.executor.copy_prefix(plan.segment, plan.src_slots, slots)
        if not self.prefix_importer.still_good(plan):
            kv.free(slots)
            return prefix, node
        had = cache.insert(tokens[:plan.end], prefix + slots, copy_key=plan.key)
        if had > len(prefix):  # not seen: nothing else inserts meanwhile
            kv.free(slots[:had - len(prefix)])
        longer, new_node = cache.match_prefix(tokens)
        cache.lock(new_node)
        cache.unlock(node)
        return longer, new_node

    @staticmethod
    def _match_limit(req: Req) -> int:
        """How much of the prompt a cache hit may cover: never the last token (its
        forward samples the first output), nor the positions whose prompt logprobs the
        request asked for (they must be computed)."""
        limit = req.prompt_len - 1
        if req.return_logprob and req.logprob_start_len >= 0:
            limit = min(limit, max(req.logprob_start_len, 1) - 1)
        return limit

    def _cache_prefilled(self, req: Req) -> None:
        """Cache the prompt KV the request computed so far now, not when it ends, so that
        a request with the same prefix arriving while this one still prefills or decodes
        reuses it (SGLang caches unfinished requests alike). The request then reads those
        slots as the cache's: its lock moves to the node the prompt so far ends at,
        ``prefix_len`` covers it, and where another request cached the same tokens
        meanwhile, the cache's slots (the same KV) replace the request's, which are freed."""
        cache = self.cache
        if cache is None or req.cache_node is None:
            return
        n = min(req.num_computed, req.prompt_len)
        if n <= req.prefix_len:
            return
        tokens = req.input_ids[:n]
        had = cache.insert(tokens, req.slots[:n])
        slots, node = cache.match_prefix(tokens)
        cache.lock(node)  # first: the path the request reads stays locked throughout
        cache.unlock(req.cache_node)
        duplicates = req.slots[req.prefix_len:had]
        req.slots[:n] = slots
        self.executor.kv.free(duplicates)
        req.prefix_len, req.cache_node = n, node

    def _free_kv(self, req: Req) -> None:
        """Give the request's KV back: what it computed goes into the cache (the part
        the cache already had is freed), the rest of its reservation to the pool."""
        cache, slots = self.cache, req.slots
        req.slots = []
        if cache is None or req.cache_node is None:
            self.executor.kv.free(slots)
            return
        n = req.num_computed
        tokens = req.input_ids[:n] if n <= req.prompt_len else (
            req.input_ids + req.output_ids[:n - req.prompt_len])
        had = cache.insert(tokens, slots[:n])
        self.executor.kv.free(slots[req.prefix_len:had] + slots[n:])
        cache.unlock(req.cache_node)
        req.cache_node = None

    def _release(self, req: Req) -> None:
        """Free the request's KV and forget it (it stays in the outbox until sent)."""
        if req.slots and not req.kv_held:
            self._free_kv(req)
        if req in self.running:
            self.running.remove(req)
        self.reqs.pop(req.rid, None)
        self._stop_searches.pop(req.rid, None)

    def _check_finish(self, req: Req) -> FinishReason | None:
        params = req.params
        if params.stop_strs and self.tokenizer is not None:
            search = self._stop_searches.get(req.rid)
            if search is None:
                search = self._stop_searches[req.rid] = StopStringSearch(
                    self.tokenizer, params.skip_special_tokens)
            reason = search.check(params, req.output_ids, self.executor.eos_token_ids)
            req.output_text = search.text
        else:
            reason = check_finish(params, req.output_ids, self.executor.eos_token_ids)
        if reason is None and req.seq_len >= self.executor.context_len:
            reason = FinishLength(len(req.output_ids))
        return reason


def make_pd_role(cfg: SchedulerConfig, executor: Executor,
                 free_kv: Callable[[Req], None] | None = None) -> PDRole:
    """The PD role of a rank with ``cfg``: the null role unless it is a PD rank.
    ``free_kv(req)`` gives a handed-off request's KV back once decode is done with it
    (the scheduler's: into the prefix cache)."""
    if cfg.pd is None or cfg.role == Role.MIXED:
        return MixedRole()
    if cfg.role == Role.PREFILL:
        return PrefillSender.from_config(cfg, executor, free_kv)
    return DecodeReceiver.from_config(cfg, executor)


def _add_logprobs(out: ReqOutput, req: Req) -> None:
    """The logprobs ``req`` gained since its last output (the prompt's in the first)."""
    out.output_logprobs = req.output_logprobs[req.num_sent:]
    out.output_top_logprobs = req.output_top_logprobs[req.num_sent:]
    if req.num_sent == 0:
        out.input_token_logprobs = req.input_token_logprobs
        out.input_top_logprobs = req.input_top_logprobs
