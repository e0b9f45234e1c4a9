"""bench.models.lockstep_model: the queueing model of lockstep ranks (no processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.models.lockstep_model import (DECODE_SIGNALS, IDEAL, IN_FLIGHT, PREFILL_SIGNALS, ROOM,
                                  STEP_END, decode_tpot, main, prefill_ttft,
                                  prefill_ttft_independent)
from sim.executor import load_profile

PROFILE = load_profile("seed-qwen3-235b-dp4")
ROOMS = [np.random.default_rng(100 + seed).integers(0, 2**63 - 1, 96, dtype=np.int64)
         for seed in range(8)]


def workload(seed: int, n: int = 60, rate: float = 3.5):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1 / rate, n)), rng.integers(409, 4097, n)


@pytest.mark.parametrize("model", [prefill_ttft, prefill_ttft_independent])
def test_one_rank_leaves_nothing_to_choose(model):
    arrivals, lens = workload(0)
    ttfts = [model(PROFILE, arrivals, lens, 1, s, 4096) for s in PREFILL_SIGNALS]
    for t in ttfts[1:]:
        assert np.array_equal(t, ttfts[0])


@pytest.mark.parametrize("model", [prefill_ttft, prefill_ttft_independent])
@pytest.mark.parametrize("signal", PREFILL_SIGNALS)
def test_no_request_is_faster_than_its_own_prompt(signal, model):
    arrivals, lens = workload(1)
    chunk = 4096
    ttft = model(PROFILE, arrivals, lens, 4, signal, chunk)
    own = np.array([PROFILE.base_s + PROFILE.prefill_token_s * n
                    + PROFILE.prefill_attn_s * n * n / 2 for n in lens])
    assert np.all(ttft >= own - 1e-9)
    assert np.all(np.isfinite(ttft))


def mean_ttft_per_signal(model, rate: float) -> dict[str, float]:
    """Mean TTFT per signal over 8 prompt sets of 96 (one set's ratio varies widely)."""
    means = {s: [] for s in PREFILL_SIGNALS}
    for seed in range(8):
        arrivals, lens = workload(seed, n=96, rate=rate)
        for s in PREFILL_SIGNALS:
            means[s].append(model(PROFILE, arrivals, lens, 4, s, 16384, ROOMS[seed]).mean())
    return {s: float(np.mean(v)) for s, v in means.items()}


def test_lockstep_prefill_balances_best_on_tokens_not_in_flight():
    """The finding behind the step-start publish (scheduler.scheduler): with 16k-token
    chunks, counting the chunk in flight is worse than round robin, leaving it out is
    better."""
    m = mean_ttft_per_signal(prefill_ttft, rate=3.6)
    assert m[STEP_END] < 0.9 * m["round_robin"]
    assert m[IN_FLIGHT] > m["round_robin"]


def test_independent_prefill_balances_on_tokens_with_or_without_the_chunk_in_flight():
    """The contrast: on ranks that step on their own the chunk in flight does not
    mislead (with ties rotating as the engine's policy does), so the board's
    publish-after-each-batch is right for them; both beat round robin."""
    m = mean_ttft_per_signal(prefill_ttft_independent, rate=4.5)
    assert m[IN_FLIGHT] < 0.9 * m["round_robin"]
    assert m[STEP_END] < 0.9 * m["round_robin"]
    assert m[ROOM] > 1.5 * m[IN_FLIGHT]


def test_fixed_length_prompts_leave_total_tokens_no_better_than_round_robin():
    """prefill-heavy's shape (one prompt length, independent ranks): total_tokens places
    as round robin does, and follow_bootstrap_room's random placement is what it beats."""
    means = {s: [] for s in (IN_FLIGHT, "round_robin", ROOM)}
    for seed in range(8):
        arrivals, _ = workload(seed, n=96, rate=3.0)
        lens = np.full(96, 3500)
        for s in means:
            means[s].append(prefill_ttft_independent(PROFILE, arrivals, lens, 4, s, 16384,
                                                     ROOMS[seed]).mean())
    tt, rr, room = (float(np.mean(means[s])) for s in (IN_FLIGHT, "round_robin", ROOM))
    assert 0.97 < tt / rr < 1.03
    assert tt / room < 0.75


@pytest.mark.parametrize("model", [prefill_ttft, prefill_ttft_independent])
def test_follow_bootstrap_room_places_by_room_modulo_ranks(model):
    arrivals, lens = workload(2, n=30)
    rooms = 4 * np.arange(30, dtype=np.int64) + 2  # every room on rank 2 of 4
    on_one = model(PROFILE, arrivals, lens, 1, "round_robin", 4096)
    assert np.array_equal(model(PROFILE, arrivals, lens, 4, ROOM, 4096, rooms), on_one)
    with pytest.raises(ValueError, match="29 rooms for 30 requests"):
        model(PROFILE, arrivals, lens, 4, ROOM, 4096, rooms[:29])


@pytest.mark.parametrize("signal", DECODE_SIGNALS)
def test_decode_every_request_finishes_within_its_pool(signal):
    rng = np.random.default_rng(3)
    n = 40
    arrivals = np.cumsum(rng.exponential(1.0, n))
    prompts, outputs = rng.integers(100, 1000, n), rng.integers(2, 200, n)
    tpot = decode_tpot(PROFILE, arrivals, prompts, outputs, 3, signal, pool=2000)
    assert np.all(tpot >= PROFILE.base_s + PROFILE.decode_seq_s - 1e-9)
    with pytest.raises(ValueError, match="could never start"):
        decode_tpot(PROFILE, np.zeros(1), np.array([1500]), np.array([600]), 1, signal, 2000)


def test_decode_ideal_bound_is_below_every_placement():
    """Splitting requests and KV evenly at every step bounds what placement can do; on
    one rank there is nothing to split, and it is round robin."""
    rng = np.random.default_rng(5)
    means = {s: [] for s in DECODE_SIGNALS}
    for _ in range(4):
        n = 120
        arrivals = np.cumsum(rng.exponential(1.0, n))
        prompts, outputs = rng.integers(409, 4097, n), rng.integers(204, 2049, n)
        for s in DECODE_SIGNALS:
            means[s].append(decode_tpot(PROFILE, arrivals, prompts, outputs, 4, s,
                                        52600).mean())
        one = [decode_tpot(PROFILE, arrivals[:30], prompts[:30], outputs[:30], 1, s, 52600)
               for s in (IDEAL, "round_robin")]
        assert np.array_equal(one[0], one[1])
    ideal = np.mean(means[IDEAL])
    assert all(ideal < np.mean(means[s]) for s in DECODE_SIGNALS if s != IDEAL)


def test_cli_writes_every_figure(tmp_path):
    out = tmp_path / "model.json"
    main(["--reps", "2", "--prompts", "24", "--decode-prompts", "20", "--fractions", "1.0",
          "--decode-rates", "1.0", "--json", str(out)])
    data = json.loads(out.read_text())
    for key in ("prefill", "prefill_independent"):
        assert set(data[key]["1.0"]["mean_ttft_ms"]) == set(PREFILL_SIGNALS)
    assert set(data["decode"]["1.0"]["mean_tpot_ms"]) == set(DECODE_SIGNALS)
    assert "simulated" in data["model"]


def test_lockstep_model_checks_its_flags_and_takes_sglangs_names(capsys):
    from bench.models.lockstep_model import main
    for flags in (["--profile", "nope"], ["--fractions", "-1"], ["--range-ratio", "3"],
                  ["--random-input-len", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(flags)
        assert exc.value.code == 2 and flags[0] in capsys.readouterr().err


def test_cache_bound_checks_its_flags(capsys):
    from bench.models.cache_bound import main
    for flags, name in ((["--rate", "0"], "--request-rate"), (["--rate", "-1"], "--request-rate"),
                        (["--rate", "1", "--ranks", "0"], "--ranks"),
                        (["--request-rate", "1", "--sim-profile", "nope"], "--sim-profile"),
                        (["--rate", "1", "--gsp-prompts-per-group", "0"],
                         "--gsp-prompts-per-group")):
        with pytest.raises(SystemExit) as exc:
            main(flags)
        assert exc.value.code == 2 and name in capsys.readouterr().err
