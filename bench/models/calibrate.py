"""Fit the simulated accelerator's cost model to the real tiny model on this machine.

    python -m bench.models.calibrate [--out sim/profiles/tiny-cpu.json] [--repeats 7]

Times ``engine.executor.ModelExecutor.forward`` (the call the scheduler makes, adapter
and sampling included) on the default ``tiny`` model with one torch thread, as a rank
runs it, over batches of three kinds:
- prefill: one chunk of n tokens starting at position s (n from 16 to 512, s from 0
  to 1536), so both the per-token and the quadratic attention term are seen;
- decode: b requests (1 to 64) each with KV length L (16 to 1536);
- mixed: decodes plus one prefill chunk, as the scheduler builds them, to check that
  the terms add up.
Each shape is timed ``--repeats`` times after a warm-up round, rounds interleaved over
all shapes, and its median kept (the machine is shared; the median resists other
processes better than the mean and, unlike the minimum, still includes the Python
overhead a rank really pays).

The features of a batch are computed by ``SimProfile.step_time`` itself with one
coefficient set to 1 and the others to 0, so the fit is by construction the model the
simulator evaluates. Coefficients come from least squares on relative error (each row
divided by its measured time, so 1 ms decodes weigh as much as 50 ms prefills), with
any coefficient that comes out negative pinned to 0 and the rest refitted.
The fit quality printed (and stored in ``source``) is R^2 on the times and the median
and maximum relative error over all shapes.

KV slots are reserved but never filled by a real prefill: attention costs the same
whatever the cached values are, and this keeps the calibration to about a minute.
The derivation of the other shipped profile (``seed-qwen3-235b-dp4``, from published
SGLang figures) is in ``bench/PROFILES.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.cli import positive_int, writable_file
from engine.sampling import SamplingParams
from scheduler.batching import ForwardItem
from scheduler.config import SchedulerConfig
from scheduler.request import Req
from sim.executor import PROFILE_DIR, SimProfile

COEFFS = ("base_s", "prefill_token_s", "prefill_attn_s", "decode_seq_s", "decode_kv_s")
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1 << 20, ignore_eos=True)

PREFILL_CHUNKS = (16, 32, 64, 128, 256, 512)
PREFILL_STARTS = (0, 256, 512, 1024, 1536)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DECODE_KV_LENS = (16, 128, 512, 1024, 1536)
MIXED = ((8, 256, 128, 0), (16, 512, 256, 256), (32, 128, 64, 512), (4, 1024, 512, 0))


def prefill_shapes() -> list[tuple]:
    return [("prefill", n, s) for n in PREFILL_CHUNKS for s in PREFILL_STARTS if s + n <= 2048]


def decode_shapes(pool_tokens: int) -> list[tuple]:
    """Only batches the rank's default KV pool can hold: nothing else ever runs."""
    return [("decode", b, kv) for b in DECODE_BATCHES for kv in DECODE_KV_LENS
            if b * kv <= pool_tokens]


def mixed_shapes() -> list[tuple]:
    """(decode batch, decode KV length, prefill chunk, prefill start)."""
    return [("mixed", *m) for m in MIXED]


class BatchMaker:
    """Builds ``ForwardItem`` batches whose requests own real slots of the executor's pool."""

    def __init__(self, executor):
        self.executor = executor
        self.reqs: list[Req] = []

    def request(self, total_len: int, num_computed: int) -> Req:
        ids = [(31 * i + 7) % 256 for i in range(total_len)]
        req = Req(rid=f"cal{len(self.reqs)}", input_ids=ids, params=GREEDY, dispatcher_id=0,
                  counted_tokens=total_len)
        req.slots = self.executor.kv.alloc(total_len + 1)
        req.num_computed = num_computed
        self.reqs.append(req)
        return req

    def prefill_item(self, n: int, start: int) -> ForwardItem:
        req = self.request(start + n, start)
        return ForwardItem(req, req.input_ids[start:start + n], start, True)

    def decode_items(self, batch: int, kv_len: int) -> list[ForwardItem]:
        items = []
        for _ in range(batch):
            # A decoding request: the prompt is computed, the newest token is not.
            req = self.request(kv_len - 1, kv_len - 1)
            req.output_ids.append(1)
            items.append(ForwardItem(req, [1], kv_len - 1, True))
        return items

    def batch(self, shape: tuple) -> list[ForwardItem]:
        kind = shape[0]
        if kind == "prefill":
            return [self.prefill_item(shape[1], shape[2])]
        if kind == "decode":
            return self.decode_items(shape[1], shape[2])
        _, b, kv, n, start = shape
        return self.decode_items(b, kv) + [self.prefill_item(n, start)]

    def release(self) -> None:
        for req in self.reqs:
            self.executor.kv.free(req.slots)
        self.reqs.clear()


def time_shapes(executor, maker: BatchMaker, shapes: list[tuple], repeats: int,
                log=print) -> tuple[list[list[ForwardItem]], list[float]]:
    """Median time of each shape's forward. Rounds are interleaved (every shape once
    per round) so that a burst of load from other processes spreads over all shapes
    instead of inflating a few."""
    runs: list[list[float]] = [[] for _ in shapes]
    batches: list[list[ForwardItem]] = []
    for r in range(repeats + 1):
        for i, shape in enumerate(shapes):
            items = maker.batch(shape)
            try:
                start = time.perf_counter()
                executor.forward(items)
                elapsed = time.perf_counter() - start
            finally:
                maker.release()
            if r == 0:
                batches.append(items)  # round 0 is the warm-up; keep the shapes
            else:
                runs[i].append(elapsed)
        log(f"  round {r}/{repeats} done" + (" (warm-up)" if r == 0 else ""))
    return batches, [statistics.median(t) for t in runs]


def features(items: list[ForwardItem]) -> list[float]:
    """One column per coefficient: the cost model evaluated with that coefficient = 1."""
    zero = dict.fromkeys(COEFFS, 0.0)
    return [SimProfile(name="unit", **{**zero, c: 1.0}).step_time(items) for c in COEFFS]


def fit(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Least squares on relative error with non-negative coefficients (active set:
    pin the most negative to 0 and refit until none is negative)."""
    active = list(range(x.shape[1]))
    w = 1.0 / t
    while True:
        coef_active, *_ = np.linalg.lstsq(x[:, active] * w[:, None], t * w, rcond=None)
        if (coef_active >= 0).all():
            break
        active.pop(int(np.argmin(coef_active)))
    coef = np.zeros(x.shape[1])
    coef[active] = coef_active
    return coef


def quality(x: np.ndarray, t: np.ndarray, coef: np.ndarray) -> dict:
    pred = x @ coef
    rel = np.abs(pred - t) / t
    r2 = 1.0 - float(((t - pred) ** 2).sum() / ((t - t.mean()) ** 2).sum())
    return {"r2": r2, "median_rel_err": float(np.median(rel)), "max_rel_err": float(rel.max())}


def calibrate(repeats: int, log=print) -> tuple[SimProfile, dict, list]:
    from engine.executor import ModelExecutor

    cfg = SchedulerConfig(dp_rank=0, board_name="calibration", device="cpu", random_seed=0)
    executor = ModelExecutor.from_config(cfg)  # one torch thread, default KV pool
    maker = BatchMaker(executor)
    shapes = prefill_shapes() + decode_shapes(executor.max_total_num_tokens) + mixed_shapes()
    batches, times = time_shapes(executor, maker, shapes, repeats, log)
    rows = [features(items) for items in batches]
    x, t = np.array(rows), np.array(times)
    coef = fit(x, t)
    q = quality(x, t, coef)
    profile = SimProfile(
        name="tiny-cpu", **dict(zip(COEFFS, (float(f"{c:.4g}") for c in coef))),
        max_total_num_tokens=executor.max_total_num_tokens, context_len=executor.context_len,
        vocab_size=executor.vocab_size,
        source=(f"python -m bench.models.calibrate: ModelExecutor.forward of the built-in tiny model, "
                f"1 torch thread, on this machine ({time.strftime('%Y-%m-%d')}); median of "
                f"{repeats} runs per shape over {len(shapes)} shapes (prefill chunks "
                f"{PREFILL_CHUNKS[0]}-{PREFILL_CHUNKS[-1]} at starts {PREFILL_STARTS[0]}-"
                f"{PREFILL_STARTS[-1]}, decode batches {DECODE_BATCHES[0]}-{DECODE_BATCHES[-1]} at "
                f"KV {DECODE_KV_LENS[0]}-{DECODE_KV_LENS[-1]}, {len(MIXED)} mixed); non-negative "
                f"least squares on relative error: R^2 {q['r2']:.4f}, median relative error "
                f"{q['median_rel_err']:.1%}, max {q['max_rel_err']:.1%}"))
    residuals = [(s, float(tt), float(p)) for s, tt, p in zip(shapes, t, x @ coef)]
    return profile, q, residuals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models.calibrate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(PROFILE_DIR / "tiny-cpu.json"),
                        help="profile JSON to write (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed runs per batch shape")
    parser.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    args = parser.parse_args(argv)
    if not args.dry_run:  # the profile's path, checked before minutes of timing
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            writable_file(args.out)
        except OSError as exc:
            parser.error(f"argument --out: cannot make {Path(args.out).parent}: {exc.strerror}")
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --out: {exc}")
    print("timing the tiny model's forward pass (1 torch thread) ...")
    profile, q, residuals = calibrate(args.repeats)
    print("\nper shape, measured -> model (worst 8 by relative error):")
    for shape, t, p in sorted(residuals, key=lambda r: -abs(r[2] - r[1]) / r[1])[:8]:
        print(f"  {shape[0]:7s} {str(shape[1:]):22s} {t * 1e3:8.2f} -> {p * 1e3:8.2f} ms")
    print("\ncoefficients:")
    for c in COEFFS:
        print(f"  {c:16s} {getattr(profile, c):.4e}")
    print(f"fit: R^2 {q['r2']:.4f}, median relative error {q['median_rel_err']:.1%}, "
          f"max relative error {q['max_rel_err']:.1%}")
    if not args.dry_run:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        profile.save(Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
