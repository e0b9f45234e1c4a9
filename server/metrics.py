"""``GET /metrics``: Prometheus text with SGLang's metric names.

Each app has its own ``CollectorRegistry`` (never the process-global one), so two apps
in one process (tests) do not share or collide.
- Gauges per ``dp_rank`` and ``engine_type`` (SGLang's label: ``unified`` on a plain
  server, ``prefill`` or ``decode`` on a PD one; ``--disaggregation-mode pd`` has a row
  of each for its prefill and its decode ranks) are read from the load boards at scrape
  time, so they are as fresh as the ranks' last batch and cost nothing between scrapes:
  ``sglang:num_running_reqs``, ``sglang:num_queue_reqs`` (waiting in the rank plus
  dispatched but not yet received), ``sglang:num_used_tokens`` (KV tokens the rank holds
  for requests, as SGLang's: running requests' and, on a PD prefill rank, those kept
  for decode; cached tokens no request reads are free) and ``sglang:token_usage`` (that
  over the rank's KV pool size). The load the dispatcher balances on, which also counts
  prompt tokens still to prefill, is ``/get_load``'s ``num_tokens``.
- Histograms are observed by the engine client as outputs arrive:
  ``sglang:time_to_first_token_seconds``, ``sglang:inter_token_latency_seconds``
  (a batch output carrying k tokens after an interval t counts k intervals of t/k),
  ``sglang:e2e_request_latency_seconds``; plus token and request counters
  (``sglang:num_requests_total``: requests that got their finish, an ``/abort_request``
  one included, and those served without a rank, ``max_new_tokens`` 0), and
  ``sglang:num_aborted_requests_total`` (requests that ended without their finish: a
  client that left counts here only).
- ``sglang:gen_throughput`` per ``dp_rank``: the rank's latest "Decode batch." figure
  (``scheduler.stats``), 0 until its first.
- Prefix cache, per ``dp_rank``, from the finished requests' ``cached_tokens`` as the
  API returns them (a PD request's from its prefill rank, and labelled with it: in
  ``--disaggregation-mode pd`` these ``dp_rank`` are prefill ranks):
  ``sglang:cached_tokens_total`` (SGLang's counter) and ``sglang:cache_hit_rate``,
  cached prompt tokens over prompt tokens of those requests since start (0 before
  any), computed at scrape time from the summed counters
  (``dpserve:cache_prompt_tokens_total`` is its denominator). SGLang's gauge is each
  rank's latest prefill batch; for a recent window use
  ``rate(sglang:cached_tokens_total)`` over ``rate(dpserve:cache_prompt_tokens_total)``,
  and sum both over ``dp_rank`` for the server's.
- With ``--api-server-count N`` any API process answers for all: the gauges come from
  the board, the counters and histograms are summed over every API process
  (prometheus_client's multiprocess mode, ``shared_registry``).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scheduler.roles import Role
from server.engine_client import EngineClient
from server.inflight import MetricsObserver
from shm.board import RankStatus

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10,
                20, 40, 60, 80, 120, 160)
ITL_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04,
               0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 150,
               200, 250, 300, 350, 500, 1000)
# prometheus_client's multiprocess mode: read when it is imported, so set by the launcher.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_ITL_OBSERVATIONS = 64  # per output message; a huge batch output is rare
# SGLang's ``engine_type`` label of a rank's gauges, by the rank's role.
ENGINE_TYPES = {Role.MIXED: "unified", Role.PREFILL: "prefill", Role.DECODE: "decode"}


class BoardCollector:
    """Per-rank gauges straight from the board, on every scrape."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    def describe(self):
        return []  # nothing to check at registration; values exist only at scrape time

    def collect(self):
        engine = self.engine
        labels = ["model_name", "engine_type", "dp_rank"]
        families = {
            "running": GaugeMetricFamily("sglang:num_running_reqs",
                                         "Requests running in the rank's batch", labels=labels),
            "queue": GaugeMetricFamily("sglang:num_queue_reqs",
                                       "Requests waiting for the rank (queued or in transit)",
                                       labels=labels),
            "used": GaugeMetricFamily("sglang:num_used_tokens",
                                      "KV tokens the rank holds for requests", labels=labels),
            "usage": GaugeMetricFamily("sglang:token_usage", "num_used_tokens / KV pool size",
                                       labels=labels),
            "throughput": GaugeMetricFamily(
                "sglang:gen_throughput", "Tokens/s the rank decoded over its last "
                "--decode-log-interval decoding batches", labels=labels),
        }
        for group in engine.rank_groups():
            snap = group.board.snapshot()
            in_flight = snap.in_flight_reqs
            engine_type = ENGINE_TYPES[group.role]
            for r in range(group.board.num_ranks):
                values = [engine.args.served_model_name, engine_type, str(r)]
                if RankStatus(int(snap.status[r])) == RankStatus.DEAD:
                    # A dead rank runs nothing: its row's last figures are history (as in
                    # /get_load).
                    for name in ("running", "queue", "used", "usage", "throughput"):
                        families[name].add_metric(values, 0)
                    continue
                waiting = int(snap.num_waiting_reqs[r])
                used = int(snap.num_kv_tokens[r])
                capacity = int(snap.max_total_num_tokens[r])
                families["running"].add_metric(values, int(snap.num_reqs[r]) - waiting)
                families["queue"].add_metric(values, waiting + max(int(in_flight[r]), 0))
                families["used"].add_metric(values, used)
                families["usage"].add_metric(values, used / capacity if capacity > 0 else 0.0)
                families["throughput"].add_metric(values,
                                                  group.ranks[r].stats.last_gen_throughput)
        return list(families.values())


class ServerMetrics(MetricsObserver):
    def __init__(self, engine: EngineClient):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BoardCollector(engine))
        name = engine.args.served_model_name
        kw = {"labelnames": ["model_name"], "registry": self.registry}
        self._ttft = Histogram("sglang:time_to_first_token_seconds", "Time to first token",
                               buckets=TTFT_BUCKETS, **kw).labels(name)
        self._itl = Histogram("sglang:inter_token_latency_seconds", "Time between tokens",
                              buckets=ITL_BUCKETS, **kw).labels(name)
        self._e2e = Histogram("sglang:e2e_request_latency_seconds", "Request latency, end to end",
                              buckets=E2E_BUCKETS, **kw).labels(name)
        self._prompt = Counter("sglang:prompt_tokens", "Prompt tokens of finished requests",
                               **kw).labels(name)
        self._generation = Counter("sglang:generation_tokens", "Generated tokens of finished "
                                   "requests", **kw).labels(name)
        self._requests = Counter("sglang:num_requests", "Finished requests", **kw).labels(name)
        per_rank = {**kw, "labelnames": ["model_name", "dp_rank"]}
        cached = Counter("sglang:cached_tokens", "Prompt tokens of finished requests that "
                         "their rank's prefix cache held", **per_rank)
        # The hit rate's denominator: prompts of requests that ran on a rank
        # (max_new_tokens 0 does not); the rate itself is computed at scrape time.
        prompt = Counter("dpserve:cache_prompt_tokens", "Prompt tokens of finished requests "
                         "that ran on a rank (the cache hit rate's denominator)", **per_rank)
        # One series per rank from the start: a rank's hit rate is 0 before its first.
        self._cache_counters = [(cached.labels(name, str(r)), prompt.labels(name, str(r)))
                                for r in range(engine.num_cache_ranks)]
        self._aborted = Counter("sglang:num_aborted_requests", "Requests that ended before "
                                "their finish: the client left, the rank refused or lost "
                                "them", **kw).labels(name)
        self.registry = shared_registry(self.registry, engine)

    def on_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)

    def on_tokens(self, num_tokens: int, interval_s: float) -> None:
        per_token = interval_s / num_tokens
        for _ in range(min(num_tokens, MAX_ITL_OBSERVATIONS)):
            self._itl.observe(per_token)

    def on_finish(self, e2e_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        self._e2e.observe(e2e_s)
        self._prompt.inc(prompt_tokens)
        self._generation.inc(completion_tokens)
        self._requests.inc()

    def on_prompt_cache(self, prompt_tokens: int, cached_tokens: int, dp_rank: int) -> None:
        cached, prompt = self._cache_counters[dp_rank]
        cached.inc(cached_tokens)
        prompt.inc(prompt_tokens)

    def on_abort(self) -> None:
        self._aborted.inc()


class CacheHitRateCollector:
    """``sglang:cache_hit_rate`` from the (summed) cache counters ``source`` yields."""

    def __init__(self, source):
        self.source = source

    def describe(self):
        return []

    def collect(self):
        totals: dict[tuple[str, tuple], float] = {}
        for family in self.source.collect():
            for sample in family.samples:
                if sample.name in ("sglang:cached_tokens_total",
                                   "dpserve:cache_prompt_tokens_total"):
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    totals[key] = totals.get(key, 0.0) + sample.value
        rate = GaugeMetricFamily("sglang:cache_hit_rate", "Prefix cache hit rate: cached over "
                                 "prompt tokens of the rank's finished requests since start",
                                 labels=["model_name", "dp_rank"])
        rows = []
        for (name, labels), prompt in totals.items():
            if name == "dpserve:cache_prompt_tokens_total":
                cached = totals.get(("sglang:cached_tokens_total", labels), 0.0)
                values = dict(labels)
                rows.append((values["model_name"], int(values["dp_rank"]),
                             cached / prompt if prompt else 0.0))
        for model_name, dp_rank, value in sorted(rows):
            rate.add_metric([model_name, str(dp_rank)], value)
        yield rate


class _Forward:
    """Registers another registry's (or collector's) metrics in a scrape registry."""

    def __init__(self, source):
        self.source = source

    def describe(self):
        return []

    def collect(self):
        return self.source.collect()


def shared_registry(own: CollectorRegistry, engine: EngineClient) -> CollectorRegistry:
    """What a scrape reads: the board gauges, the counters and histograms, and the hit
    rate computed from the counters. With several API processes (``server.api_servers``
    sets ``MULTIPROC_ENV`` before any of them starts) each one's counters and
    histograms live in a file of that folder, and a scrape of any process sums every
    process's (the board gauges are the same from any); otherwise ``own``'s."""
    path = os.environ.get(MULTIPROC_ENV)
    registry = CollectorRegistry(auto_describe=False)
    if path:
        registry.register(BoardCollector(engine))
        source = MultiProcessCollector(None, path=path)
    else:
        source = own  # it holds the board collector too
    registry.register(_Forward(source))
    registry.register(CacheHitRateCollector(source))
    return registry


async def metrics(request: Request) -> Response:
    registry = request.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def metrics_routes() -> list[Route]:
    return [Route("/metrics", metrics, methods=["GET"])]
