"""``bench.compare``'s outputs: the markdown tables, the JSON and the PNG plots.

Files in ``--out``: ``report.md`` (what ``main`` prints), ``<scenario>_<ranks>_ttft.png``
(mean TTFT vs rate, one line per method), ``<scenario>_<ranks>_load.png`` (requests and
tokens per rank over time at the highest rate, one panel pair per method),
``timelines.json`` (the raw load samples) and the ``--json`` summary.

Top-level JSON keys (at the smallest rank count run): ``prefill_heavy_ttft_ratio_0_8``
and ``_1_0`` (mean TTFT of ``total_tokens`` over ``follow_bootstrap_room`` at 0.8x and
1.0x capacity), ``variable_length_ttft_gain`` / ``_tpot_gain`` (fraction lower than
``round_robin``, best board method, highest rate), ``decode_heavy_throughput_gain``
(output throughput of ``total_requests`` over ``round_robin``, minus 1, highest rate),
``decode_heavy_p99_ttft_ratio``, ``mixed_gains`` (per method, TTFT and TPOT fraction
lower than ``round_robin`` at the highest rate), ``dispatch_probe_us`` and ``simulated``.

Every figure is over a run's successful requests; the tables give each run's failed
requests, and a key is None where either side has no figure (no successful request),
never 0 or a gain of 1. A key whose runs had failed requests keeps its figure and is
named under ``failed`` with each side's count (``{"prefill_heavy_ttft_ratio_1_0":
{"total_tokens": 3, "follow_bootstrap_room": 0}}``), and in a line under the headline.
"""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The methods that read the load board (the others place without it).
BOARD_METHODS = ("total_tokens", "total_requests")


def method_run(result: dict, method: str, frac: float) -> dict | None:
    """The run of ``method`` at ``frac`` x capacity in one scenario's ``result``, if any."""
    return next((r for r in result["runs"].get(method, []) if r["fraction"] == frac), None)


def ttft_figures(run: dict | None) -> dict:
    """Where a run's TTFT figures come from: its TTFT pass when the scenario has one
    (``ttft_output_len``, SGLang PR #20435's method), else the run itself."""
    run = run or {}
    return run.get("ttft_pass") or run


def _change(value, baseline) -> str:
    """``value`` against ``baseline`` in words: "12.3% lower" / "4.0% higher"."""
    if not value or not baseline:
        return "-"
    change = 1 - value / baseline
    return f"{abs(change):.1%} {'lower' if change >= 0 else 'higher'}"


def _fig(value, fmt="{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _failed(run: dict, probe: bool) -> str:
    """A run's failed requests; with a TTFT pass, "full/TTFT pass"."""
    full = _fig(run.get("failed"))
    return f"{full}/{_fig(ttft_figures(run).get('failed'))}" if probe else full


def scenario_table(result: dict) -> str:
    methods, base = result["methods"], result["baseline"]
    others = [m for m in methods if m != base]
    probe = bool(result.get("ttft_output_len"))
    head = (["rate (x cap)", "offered req/s"] + (["TTFT pass offered req/s"] if probe else [])
            + [f"TTFT {m}" for m in methods]
            + [f"{m} vs {base}" for m in others] + [f"TPOT {m}" for m in methods]
            + [f"{m} vs {base}" for m in others]
            + [f"out tok/s {m}" for m in methods] + [f"P99 TTFT {m}" for m in methods]
            + [f"failed {m}" + (" (full/TTFT pass)" if probe else "") for m in methods])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for frac in result["fractions"]:
        runs = {m: method_run(result, m, frac) or {} for m in methods}
        rate = next(iter(runs.values())).get("request_rate")
        row = [f"{frac:g}", _fig(rate, "{:.2f}")]
        if probe:
            row.append(_fig(ttft_figures(next(iter(runs.values()))).get("request_rate"), "{:.2f}"))
        row += [_fig(ttft_figures(runs[m]).get("mean_ttft_ms")) for m in methods]
        for m in others:
            a, b = ttft_figures(runs[m]).get("mean_ttft_ms"), ttft_figures(runs[base]).get("mean_ttft_ms")
            row.append(_change(a, b))
        row += [_fig(runs[m].get("mean_tpot_ms"), "{:.1f}") for m in methods]
        for m in others:
            a, b = runs[m].get("mean_tpot_ms"), runs[base].get("mean_tpot_ms")
            row.append(_change(a, b))
        row += [_fig(runs[m].get("output_throughput"), "{:.0f}") for m in methods]
        row += [_fig(ttft_figures(runs[m]).get("p99_ttft_ms")) for m in methods]
        row += [_failed(runs[m], probe) if runs[m] else "-" for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def headline(results: list[dict], simulated: bool) -> dict:
    """The top-level keys; a key with a side missing (not run, or no request succeeded)
    is None. ``failed`` names each key whose figures left out failed requests, with the
    failed count of each side's run (the run its figure came from)."""
    out: dict = {"simulated": simulated}
    failed: dict[str, dict[str, int]] = {}
    by_name = {}
    for r in sorted(results, key=lambda r: r["ranks"]):
        by_name.setdefault(r["scenario"], r)  # the smallest rank count

    def run_of(r, m, frac, key) -> dict:
        run = method_run(r, m, frac)
        if run and key.endswith("ttft_ms"):
            run = ttft_figures(run)
        return run or {}

    def mean(r, m, frac, key):
        return run_of(r, m, frac, key).get(key)

    def note(name, r, frac, key, *methods) -> None:
        counts = {m: run_of(r, m, frac, key).get("failed") or 0 for m in methods}
        if any(counts.values()):
            failed[name] = counts

    def ratio(a, b):
        return a / b if a is not None and b else None

    if r := by_name.get("prefill-heavy"):
        for frac, key in ((0.8, "0_8"), (1.0, "1_0")):
            name = f"prefill_heavy_ttft_ratio_{key}"
            out[name] = ratio(mean(r, "total_tokens", frac, "mean_ttft_ms"),
                              mean(r, "follow_bootstrap_room", frac, "mean_ttft_ms"))
            note(name, r, frac, "mean_ttft_ms", "total_tokens", "follow_bootstrap_room")

    def gain(r, m, fig):  # fraction lower than the baseline's, highest rate
        top = max(r["fractions"])
        x = ratio(mean(r, m, top, fig), mean(r, r["baseline"], top, fig))
        return 1 - x if x is not None else None

    if r := by_name.get("variable-length"):
        boards = [m for m in r["methods"] if m in BOARD_METHODS]
        for key, fig in (("ttft", "mean_ttft_ms"), ("tpot", "mean_tpot_ms")):
            name = f"variable_length_{key}_gain"
            gains = {m: g for m in boards if (g := gain(r, m, fig)) is not None}
            best = max(gains, key=gains.get) if gains else None
            out[name] = gains[best] if best else None
            # The best method's failures, or with no gain every board method's.
            note(name, r, max(r["fractions"]), fig, *([best] if best else boards), r["baseline"])
    if r := by_name.get("decode-heavy"):
        top = max(r["fractions"])
        tput = ratio(mean(r, "total_requests", top, "output_throughput"),
                     mean(r, "round_robin", top, "output_throughput"))
        out["decode_heavy_throughput_gain"] = tput - 1 if tput is not None else None
        out["decode_heavy_p99_ttft_ratio"] = ratio(mean(r, "total_requests", top, "p99_ttft_ms"),
                                                   mean(r, "round_robin", top, "p99_ttft_ms"))
        for name, fig in (("decode_heavy_throughput_gain", "output_throughput"),
                          ("decode_heavy_p99_ttft_ratio", "p99_ttft_ms")):
            note(name, r, top, fig, "total_requests", "round_robin")
    if r := by_name.get("mixed"):
        others = [m for m in r["methods"] if m != r["baseline"]]
        out["mixed_gains"] = {m: {"ttft": gain(r, m, "mean_ttft_ms"),
                                  "tpot": gain(r, m, "mean_tpot_ms")} for m in others}
        for m in others:
            for key, fig in (("ttft", "mean_ttft_ms"), ("tpot", "mean_tpot_ms")):
                note(f"mixed_gains.{m}.{key}", r, max(r["fractions"]), fig, m, r["baseline"])
    out["failed"] = failed
    return out


def failed_lines(summary: dict) -> list[str]:
    """One line per key of ``headline`` whose runs had failed requests: its figure, kept,
    comes from the successful ones only, which can make a win of requests dropped."""
    lines = []
    for name, counts in summary.get("failed", {}).items():
        value = summary
        for part in name.split("."):
            value = (value or {}).get(part)
        sides = ", ".join(f"{m} {n}" for m, n in counts.items())
        lines.append(f"{name} {_fig(value, '{:.3f}')} ({sum(counts.values())} failed: {sides}; "
                     f"the figure is over the successful requests only)")
    return lines


def ttft_points(result: dict, method: str) -> tuple[list, list]:
    """(offered rates, mean TTFTs) of ``method``'s runs: the figures the table and the
    headline use (``ttft_figures``: the TTFT pass, at its own rates, where there is one)."""
    runs = [ttft_figures(r) for r in result["runs"].get(method, [])]
    return [r.get("request_rate") for r in runs], [r.get("mean_ttft_ms") for r in runs]


def plot_ttft(result: dict, path: str, label: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=90)
    for m in result["methods"]:
        rates, ttfts = ttft_points(result, m)
        ax.plot(rates, [math.nan if t is None else t for t in ttfts], marker="o", label=m)
    probe = result.get("ttft_output_len")
    ax.set_xlabel("offered request rate (req/s)" + (
        f", TTFT pass ({probe} output token(s))" if probe else ""))
    ax.set_ylabel("mean TTFT (ms)")
    ax.set_title(f"{result['scenario']}, {result['ranks']} ranks{label}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_load(result: dict, path: str, label: str) -> None:
    top = max(result["fractions"])
    methods = result["methods"]
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 5.2), dpi=80,
                             squeeze=False, sharex="col", sharey="row")
    for j, m in enumerate(methods):
        samples = result["timelines"].get((m, top), [])
        t = [s["t"] for s in samples]
        for row, key, name in ((0, "reqs", "requests"), (1, "tokens", "tokens")):
            ax = axes[row][j]
            if samples:
                for rank in range(len(samples[0][key])):
                    ax.plot(t, [s[key][rank] for s in samples], lw=0.8)
            ax.set_ylabel(f"{name} per rank", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(m, fontsize=9)
        axes[1][j].set_xlabel("time (s)", fontsize=8)
    fig.suptitle(f"{result['scenario']}, {result['ranks']} ranks, {top:g}x capacity{label}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def failed_section(summary: dict) -> list[str]:
    """The report's lines for ``failed_lines``, under the headline; none when no key's runs
    had a failed request."""
    flagged = failed_lines(summary)
    if not flagged:
        return []
    return ["", "keys read on runs with failed requests:", "", *(f"- {line}" for line in flagged)]


def _failed_note(run: dict) -> str:
    return f", {run['failed']} failed" if run.get("failed") else ""


def time_scales_used(results: list[dict]) -> float | dict | None:
    """The ``--sim-time-scale`` factor the runs used (``auto`` resolved): one number
    when every scenario and rank count used the same, else one per "scenario@ranks"."""
    used = {f"{r['scenario']}@{r['ranks']}": r.get("sim_time_scale") for r in results}
    values = set(used.values())
    if not values:
        return None
    return values.pop() if len(values) == 1 else used


def write_reports(results: list[dict], probe: dict, args, elapsed_s: float) -> str:
    simulated = any(r.get("simulated") for r in results) or args.executor == "sim"
    label = f" (simulated: {args.sim_profile})" if simulated else " (real model)"
    parts = [f"# bench.compare{label}", "",
             f"executor {args.executor}; {elapsed_s:.0f} s; "
             f"capacity = completed req/s of a saturating run (rate inf) of the first method; for "
             f"decode-bound PD shapes its rate while it was full, without ramp and drain "
             f"(bench.compare.run.capacity_estimate)", ""]
    timelines = {}
    for r in results:
        stem = f"{r['scenario'].replace('-', '_')}_{r['ranks']}"
        plot_ttft(r, os.path.join(args.out, f"{stem}_ttft.png"), label)
        plot_load(r, os.path.join(args.out, f"{stem}_load.png"), label)
        timelines[stem] = {f"{m}@{f:g}": s for (m, f), s in r.pop("timelines").items()}
        balanced = {"prefill": "the prefill ranks", "decode": "the decode ranks",
                    "both": "prefill and decode ranks"}.get(r.get("pd_balanced") or "prefill")
        mode = (f" PD ({r['ranks']} prefill + {r.get('decode_ranks') or '?'} decode ranks; "
                f"methods balance {balanced})," if r["pd"] else "")
        cap = r.get("capacity_run") or {}
        conc = f" max concurrency {r['max_concurrency']}," if r.get("max_concurrency") else ""
        lock = " lockstep," if r["lockstep"] else ""
        scale = r.get("sim_time_scale") or 1.0
        stretched = (f" steps ran {scale:g}x slower than modelled (--sim-time-scale), figures "
                     f"in simulated time," if scale != 1.0 else "")
        parts += [f"## {r['scenario']}, {r['ranks']} ranks{label}", "",
                  f"input {r['input_len']} (ratio {r['range_ratio']}), output {r['output_len']},"
                  f"{mode}{lock}{stretched}{conc} {r.get('prompts', '?')} prompts per run, capacity "
                  f"{r['capacity_req_s']:.2f} req/s (saturating run of "
                  f"{cap.get('completed', '?')} prompts{_failed_note(cap)}); TTFT/TPOT in ms",
                  "",
                  *([f"TTFT and P99 TTFT: a second pass of {r.get('ttft_prompts') or 'the same'} "
                     f"prompts (lengths drawn alike) with {r['ttft_output_len']} output "
                     f"token(s) (as SGLang PR #20435 measured TTFT) at the "
                     f"same fraction of its own capacity, "
                     f"{r.get('ttft_capacity_req_s') or 0:.2f} req/s; TPOT and output "
                     f"throughput: the full-length pass", ""] if r.get("ttft_output_len") else []),
                  scenario_table(r), "",
                  "one run per method and rate: no interval on these figures (pool runs of "
                  "several --seed values with python -m bench.compare.pool for one)", "",
                  "dispatch (server front door, mean us/request): " + ", ".join(
                      f"{m} {_fig((d or {}).get('mean_us'), '{:.0f}')}"
                      for m, d in r.get("dispatch", {}).items()), ""]
    summary = {**headline(results, simulated), "dispatch_probe_us": probe,
               "sim_profile": args.sim_profile if simulated else None,
               "sim_time_scale": time_scales_used(results) if simulated else None,
               "executor": args.executor, "quick": args.quick, "seed": args.seed,
               "elapsed_s": elapsed_s,
               "scenarios": results}
    if probe:
        parts += ["## dispatch overhead (Dispatcher.pick + encode, median us)", "",
                  "| ranks | " + " | ".join(probe) + " |", "|---|" + "---|" * len(probe),
                  "| us | " + " | ".join(f"{v:.1f}" for v in probe.values()) + " |", ""]
    parts += ["## headline", "", "```", json.dumps(
        {k: v for k, v in summary.items() if k not in ("scenarios",)}, indent=1), "```"]
    parts += failed_section(summary)
    report = "\n".join(parts)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "timelines.json"), "w") as f:
        json.dump(timelines, f)
    json_path = args.json or os.path.join(args.out, "summary.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
    return report
