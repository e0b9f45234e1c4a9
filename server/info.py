"""Health, information and load routes (what gateways poll), and ``/flush_cache``.

- ``/health``: 200 while at least one rank can serve (body ``{"status": "ok"}`` or
  ``"degraded"`` with the dead ranks), 503 when none can or the server is not serving:
  gateways mark a worker unhealthy on non-2xx, and a degraded engine still serves.
  ``dead_ranks`` lists the ranks that cannot serve (dead or stale); a PD front door
  lists them by role, ``{"prefill": [...], "decode": [...]}``.
- ``/health_generate``: one greedy token through every live rank (a PD prefill or decode
  server, which cannot generate alone: its ranks' liveness).
- ``/server_info`` (``/get_server_info``), ``/model_info`` (``/get_model_info``): the
  resolved arguments and model facts; paths are local folders so a gateway never
  tries to fetch a tokenizer from a hub.
- ``/get_load``: a JSON list, one object per rank (sglang-router sums ``num_tokens``);
  ``/v1/loads`` (alias ``/loads``): SGLang's richer shape, as smg polls it. A row says
  its rank's ``role`` (``/get_load``: on a PD server only, plain rows keep SGLang's
  keys). ``num_reqs`` and ``num_tokens`` are the *effective* loads the dispatcher
  balances on: what the rank reported plus what was dispatched to it and not yet
  received (``num_tokens``: KV in use plus prompt tokens still to prefill; a PD prefill
  rank's, the prompt tokens only). Memory is ``num_used_tokens`` and ``token_usage``, as
  SGLang's: the KV tokens the rank holds for requests, those a PD prefill rank keeps for
  decode included, and that over its pool. Each row has a ``status``: ``ready``,
  ``starting``, ``draining``, ``stale`` (no heartbeat within ``--stale-after-s``: its
  load is its last report) or ``dead`` (its load is 0: a dead rank holds nothing).
- ``/flush_cache`` (GET or POST): every rank empties its prefix cache, or the answer
  says why not (``flush_cache``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import datetime, timezone

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from engine.sampling import SamplingParams
from scheduler.roles import Role
from server import __version__
from server.args import local_model_path
from server.bounds import query_int
from server.engine_client import EngineClient
from server.errors import ApiError, ServiceUnavailable
from server.prepared import PreparedRequest
from server.request_flow import new_rid, release, run_all, start
from shm.board import RankStatus

HEALTH_GENERATE_TIMEOUT_S = 20.0
FLUSH_CACHE_TEXT = ("Cache flushed.\nPlease check backend logs for more details. (When there "
                    "are running or waiting requests, the operation will not be performed.)\n")


async def health(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    status = engine.status
    body = {"status": status, "dead_ranks": _down_ranks(engine)}
    return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503)


async def health_generate(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    live = engine.live_ranks()
    if not engine.is_serving or not live:
        raise ServiceUnavailable(f"no rank can serve (status {engine.status})")
    if engine.role in (Role.PREFILL, Role.DECODE):
        # Half of a PD pair generates nothing alone (a request needs both servers): its
        # ranks' liveness (heartbeats within --stale-after-s) is what it can vouch for.
        return JSONResponse({"status": engine.status, "ranks": live,
                             "checked": f"liveness only: a PD {engine.role} server cannot "
                                        "generate without its peer"})
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    ids = engine.tokenizer.encode("ping") or [0]
    running = []
    try:
        for rank in live:
            prepared = PreparedRequest(rid=f"health_generate_{new_rid()}", input_ids=ids,
                                       params=params, routed_dp_rank=rank)
            running.append(start(engine, prepared))
        await asyncio.wait_for(run_all(running), HEALTH_GENERATE_TIMEOUT_S)
    except (ApiError, asyncio.TimeoutError) as exc:
        raise ServiceUnavailable(f"health_generate failed: {exc or 'timed out'}") from None
    finally:
        release(running, "health check ended")
    return JSONResponse({"status": engine.status, "ranks": live})


async def server_info(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    args = engine.args
    ready = [r.ready for r in engine.ranks]
    return JSONResponse({
        **dataclasses.asdict(args),
        "model_path": local_model_path(args.model_path),
        "api_key": None if args.api_key is None else "<set>",  # never echo the key
        "enable_metrics": True,  # /metrics is always served, flag or not
        "tp_size": 1,
        "context_length": engine.context_len,
        "max_total_num_tokens": engine.max_total_num_tokens,
        "max_running_requests": min(r.max_running_requests for r in ready),
        "device": ready[0].device,
        "version": __version__,
        # PD: which rank roles this server runs and the method each one's dispatch uses.
        "disaggregation_roles": {g.role: args.method_for(g.role) for g in engine.rank_groups()},
        "status": engine.status,
        "dead_ranks": _down_ranks(engine),
        "ranks": engine.rank_summaries(),
        "is_simulated": args.executor == "sim",
        # Front-door time per dispatched request (EngineClient.submit); PD: prefill half.
        "dispatch": engine.dispatch_stats(),
        **_internal_states(engine),
    })


def _internal_states(engine) -> dict:
    """SGLang's ``internal_states``, one entry per rank (a PD front door: prefill ranks,
    then decode ranks). A PD front door also lists them per role under ``prefill`` and
    ``decode``, each a list of one server's info, as SGLang's PD router answers: clients
    that find a ``decode`` key read ``["decode"][0]["internal_states"]``."""
    groups = engine.internal_state_groups()
    body = {"internal_states": [state for states in groups.values() for state in states]}
    if len(groups) > 1:
        body.update({role: [{"internal_states": states}] for role, states in groups.items()})
    return body


async def model_info(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    args = engine.args
    return JSONResponse({
        "model_path": local_model_path(args.model_path),
        "tokenizer_path": args.tokenizer_path,
        "served_model_name": args.served_model_name,
        "is_generation": True,
        "architectures": list(engine.model_config.architectures),
        "model_type": engine.model_config.model_type,
        "disaggregation_mode": args.disaggregation_mode,
        "context_length": engine.context_len,
        "vocab_size": engine.model_config.vocab_size,
    })


async def get_load(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    keys = ("dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens", "status")
    # A PD server's rows are prefill or decode ranks (pd: prefill rank 0 and decode rank 0
    # are two rows); a plain server's keep SGLang's keys.
    if engine.role != Role.MIXED:
        keys += ("role",)
    return JSONResponse([{k: row[k] for k in keys} for row in _loads(engine)])


async def v1_loads(request: Request) -> Response:
    engine: EngineClient = request.state.engine
    rows = _loads(engine)
    dp_rank = query_int(request, "dp_rank", 0, max(row["dp_rank"] for row in rows))
    if dp_rank is not None:  # in PD, that rank of each role
        rows = [row for row in rows if row["dp_rank"] == dp_rank]
    n = max(len(rows), 1)
    return JSONResponse({
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "version": __version__,
        "dp_rank_count": len(rows),
        "loads": rows,
        "aggregate": {
            "total_running_reqs": sum(r["num_running_reqs"] for r in rows),
            "total_waiting_reqs": sum(r["num_waiting_reqs"] for r in rows),
            "total_reqs": sum(r["num_total_reqs"] for r in rows),
            "avg_token_usage": round(sum(r["token_usage"] for r in rows) / n, 4),
        },
    })


async def flush_cache(request: Request) -> Response:
    """SGLang's answer: 200 when every rank emptied its prefix cache, 400 with the same
    text when some rank refused (it holds running or waiting requests; the rank logs
    why, and so does the API); 503 when a rank cannot be asked or does not answer
    within the stale bound (``--stale-after-s``)."""
    engine: EngineClient = request.state.engine
    results = await engine.flush_cache(engine.args.stale_ns / 1e9)
    flushed = all(r.success for r in results)
    return PlainTextResponse(FLUSH_CACHE_TEXT, status_code=200 if flushed else 400)


def _loads(engine: EngineClient) -> list[dict]:
    """One row per rank, each saying its ``role``; a PD front door lists its prefill
    ranks, then its decode ranks."""
    rows = []
    for group in engine.rank_groups():
        rows += _board_loads(group.board, group.role, engine.args.stale_ns)
    return rows


def _board_loads(board, role: str, stale_ns: int) -> list[dict]:
    snap = board.snapshot()
    oldest_beat = time.monotonic_ns() - stale_ns
    eff_reqs, eff_tokens, in_flight = snap.effective_reqs, snap.effective_tokens, snap.in_flight_reqs
    eff_prefill = snap.effective_prefill_tokens
    rows = []
    for r in range(board.num_ranks):
        status = RankStatus(int(snap.status[r])).name.lower()
        if status == "dead":
            rows.append(_dead_row(r, role, int(snap.max_total_num_tokens[r]),
                                  int(snap.max_running_requests[r])))
            continue
        if status == "ready" and snap.heartbeat_ns[r] < oldest_beat:
            status = "stale"
        waiting = int(snap.num_waiting_reqs[r]) + max(int(in_flight[r]), 0)
        running = max(int(eff_reqs[r]) - waiting, 0)
        tokens = int(eff_tokens[r])
        kv_used = int(snap.num_kv_tokens[r])
        capacity = int(snap.max_total_num_tokens[r])
        rows.append({
            "dp_rank": r,
            "num_reqs": int(eff_reqs[r]),
            "num_running_reqs": running,
            "num_waiting_reqs": waiting,
            "num_total_reqs": running + waiting,
            "num_tokens": tokens,
            "num_used_tokens": kv_used,
            "num_prefill_tokens": int(eff_prefill[r]),  # prompt tokens not prefilled yet
            "max_total_num_tokens": capacity,
            "max_running_requests": int(snap.max_running_requests[r]),
            "token_usage": round(kv_used / capacity, 4) if capacity > 0 else 0.0,
            "status": status,
            "role": role,
        })
    return rows


def _dead_row(r: int, role: str, capacity: int, max_running: int) -> dict:
    return {"dp_rank": r, "num_reqs": 0, "num_running_reqs": 0, "num_waiting_reqs": 0,
            "num_total_reqs": 0, "num_tokens": 0, "num_used_tokens": 0, "num_prefill_tokens": 0,
            "max_total_num_tokens": capacity, "max_running_requests": max_running,
            "token_usage": 0.0, "status": "dead", "role": role}


def _down_ranks(engine: EngineClient) -> list[int] | dict[str, list[int]]:
    return engine.down_ranks()


def info_routes() -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/health_generate", health_generate, methods=["GET"]),
        Route("/server_info", server_info, methods=["GET"]),
        Route("/get_server_info", server_info, methods=["GET"]),
        Route("/model_info", model_info, methods=["GET"]),
        Route("/get_model_info", model_info, methods=["GET"]),
        Route("/get_load", get_load, methods=["GET"]),
        Route("/v1/loads", v1_loads, methods=["GET"]),
        Route("/loads", v1_loads, methods=["GET"]),
        Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
    ]
