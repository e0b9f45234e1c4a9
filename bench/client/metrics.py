"""Figures of one benchmark run, and the summary block in SGLang's ``bench_serving`` layout.

Definitions (SGLang's):
- duration: from the first request sent to the last one finished, failed or not;
- totals and throughputs count successful requests only; input tokens as the server
  reported them (``meta_info.prompt_tokens`` / ``usage.prompt_tokens``);
- concurrency: sum of E2E latencies / duration (mean requests in flight);
- TPOT: (E2E - TTFT) / (output_len - 1), over requests with more than one token;
- ITL: every inter-token gap of every request (see ``bench.client.backends``);
- peak output token throughput: the most output tokens in one full 1-second window
  (aligned to the start), or the mean output throughput when that is higher
  (``peak_output_throughput``); peak concurrent requests: the most requests in flight,
  a failed one until its failure was seen;
- prefix cache (ours): ``total_cached_tokens``, the prompt tokens the server said it
  reused (``cached_tokens``), and ``cache_hit_rate``, those over the input tokens of
  the requests that reported it; None (and not printed) when no request did. With it,
  the mean TTFT of the requests that reused at least half of their prompt
  (``mean_ttft_hit_ms``, ``hit_requests``) and of the others (``mean_ttft_miss_ms``):
  where a method's TTFT goes, hits waiting in a queue or prompts computed again.
Latency figures are in milliseconds, as SGLang prints them. Every latency statistic is
over the successful requests (``completed``; ``failed`` counts the others) and is None,
printed "-", where there is none: no successful request, or (TPOT) none with more than
one output token.

The block keeps SGLang's line order and ``{:<40} {:<10}`` columns. It leaves out
"Total generated tokens (retokenized)", which needs the model's tokenizer on the
client; the text/vision split is printed as SGLang does for a text-only run.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from bench.client.backends import RequestResult

STATS = ("mean", "median", "std", "p90", "p95", "p99", "max")


def distribution(values_s: list[float]) -> dict[str, float | None]:
    """STATS of values given in seconds, returned in milliseconds; None each when there
    are none (a run whose requests all failed has no TTFT, not a TTFT of 0, which a
    ratio against another method would read as a perfect score)."""
    if not values_s:
        return dict.fromkeys(STATS, None)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std()),
            "p90": float(np.percentile(ms, 90)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


def summarize(results: list[RequestResult], duration_s: float, bench_start: float) -> dict:
    """Every figure of the run as a flat-ish dict (what ``--output-file`` stores)."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    duration = max(duration_s, 1e-9)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    figures = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_throughput": (total_in + total_out) / duration,
        "peak_output_throughput": peak_output_throughput(ok, bench_start, duration_s),
        "peak_concurrent_requests": peak_concurrency(results),
        "concurrency": sum(r.latency for r in ok) / duration,
    }
    for name, values in (("e2e_latency", [r.latency for r in ok]),
                         ("ttft", [r.ttft for r in ok]), ("tpot", tpots),
                         ("itl", [gap for r in ok for gap in r.itl])):
        for stat, value in distribution(values).items():
            figures[f"{stat}_{name}_ms"] = value
    figures.update(cache_figures(ok))
    figures.update(per_rank(ok))
    return figures


def cache_figures(ok: list[RequestResult]) -> dict:
    reported = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens for r in reported)
    prompt = sum(r.prompt_len for r in reported)
    hits, misses = [], []
    for r in reported:
        (hits if 2 * r.cached_tokens >= r.prompt_len > 0 else misses).append(r)
    return {"total_cached_tokens": cached if reported else None,
            "cache_hit_rate": cached / prompt if reported and prompt else None,
            "hit_requests": len(hits) if reported else None,
            "mean_ttft_hit_ms": distribution([r.ttft for r in hits])["mean"] if hits else None,
            "mean_ttft_miss_ms": (distribution([r.ttft for r in misses])["mean"]
                                  if misses else None)}


def per_rank(ok: list[RequestResult]) -> dict:
    """Requests and tokens per ``dp_rank`` (when the server reports it), keyed by str."""
    ranked = [r for r in ok if r.dp_rank is not None]
    if not ranked:
        return {}
    reqs, toks_in, toks_out = Counter(), Counter(), Counter()
    for r in ranked:
        reqs[r.dp_rank] += 1
        toks_in[r.dp_rank] += r.prompt_len
        toks_out[r.dp_rank] += r.output_len
    order = sorted(reqs)
    return {"requests_per_dp_rank": {str(k): reqs[k] for k in order},
            "input_tokens_per_dp_rank": {str(k): toks_in[k] for k in order},
            "output_tokens_per_dp_rank": {str(k): toks_out[k] for k in order}}


def peak_output_throughput(ok: list[RequestResult], bench_start: float,
                           duration_s: float) -> float:
    """Output tokens per second in the busiest window of the run: its full 1-second
    windows from the start, and the whole run as one more window.

    Only full windows count: a run shorter than a second, or its last partial second,
    would otherwise give a fraction of a second's tokens as a second's worth. The whole
    run as a window makes the figure at least the mean output throughput (on a run
    shorter than a second, it is that mean)."""
    per_second: Counter = Counter()
    for r in ok:
        for since_sent, tokens in r.chunks:
            per_second[int(r.start_time - bench_start + since_sent)] += tokens
    full = [n for second, n in per_second.items() if second + 1 <= duration_s]
    whole_run = sum(r.output_len for r in ok) / max(duration_s, 1e-9)  # output_throughput
    return float(max([*full, whole_run]))


def peak_concurrency(results: list[RequestResult]) -> int:
    """The most requests in flight at once, failed ones too: each from when it was sent
    until it finished or its failure was seen (``RequestResult.latency``)."""
    events = []
    for r in results:
        if r.start_time:
            events += [(r.start_time, 1), (r.start_time + r.latency, -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


# ---- the printed block --------------------------------------------------------------------
def _row(label: str, value) -> str:
    if value is None:  # no figure: no request it could come from
        return "{:<40} {:<10}".format(label, "-")
    if isinstance(value, float):
        return "{:<40} {:<10.2f}".format(label, value)
    return "{:<40} {:<10}".format(label, value)


def _section(title: str) -> str:
    return "{s:{c}^{n}}".format(s=title, n=50, c="-")


def format_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else str(float(rate))


def _cache_rows(f: dict) -> list[str]:
    if f.get("cache_hit_rate") is None:
        return []
    return [_row("Total cached input tokens:", f["total_cached_tokens"]),
            _row("Cache hit rate (%):", 100.0 * f["cache_hit_rate"])]


def format_summary(f: dict) -> str:
    """``f``: figures from ``summarize`` plus ``backend``, ``request_rate`` and
    ``max_concurrency`` (None when not set)."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             _row("Backend:", f["backend"]),
             _row("Traffic request rate:", format_rate(f["request_rate"])),
             _row("Max request concurrency:", f["max_concurrency"] or "not set"),
             _row("Successful requests:", f["completed"]),
             _row("Benchmark duration (s):", f["duration_s"]),
             _row("Total input tokens:", f["total_input_tokens"]),
             _row("Total input text tokens:", f["total_input_tokens"]),
             _row("Total input vision tokens:", 0),
             _row("Total generated tokens:", f["total_output_tokens"]),
             _row("Request throughput (req/s):", f["request_throughput"]),
             _row("Input token throughput (tok/s):", f["input_throughput"]),
             _row("Output token throughput (tok/s):", f["output_throughput"]),
             _row("Peak output token throughput (tok/s):", f["peak_output_throughput"]),
             _row("Peak concurrent requests:", f["peak_concurrent_requests"]),
             _row("Total token throughput (tok/s):", f["total_throughput"]),
             _row("Concurrency:", f["concurrency"]),
             *_cache_rows(f),
             _section("End-to-End Latency"),
             _row("Mean E2E Latency (ms):", f["mean_e2e_latency_ms"]),
             _row("Median E2E Latency (ms):", f["median_e2e_latency_ms"]),
             _section("Time to First Token"),
             _row("Mean TTFT (ms):", f["mean_ttft_ms"]),
             _row("Median TTFT (ms):", f["median_ttft_ms"]),
             _row("P99 TTFT (ms):", f["p99_ttft_ms"]),
             _section("Time per Output Token (excl. 1st token)"),
             _row("Mean TPOT (ms):", f["mean_tpot_ms"]),
             _row("Median TPOT (ms):", f["median_tpot_ms"]),
             _row("P99 TPOT (ms):", f["p99_tpot_ms"]),
             _section("Inter-Token Latency"),
             _row("Mean ITL (ms):", f["mean_itl_ms"]),
             _row("Median ITL (ms):", f["median_itl_ms"]),
             _row("P95 ITL (ms):", f["p95_itl_ms"]),
             _row("P99 ITL (ms):", f["p99_itl_ms"]),
             _row("Max ITL (ms):", f["max_itl_ms"]),
             "=" * 50]
    return "\n".join(lines)
