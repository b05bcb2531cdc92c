"""natlib.netcheck home choice (sans-io): the §2.3 hysteresis over a 5 min + 5 s history."""

from __future__ import annotations

from natlib.netcheck import HISTORY_WINDOW, LatencyHistory, choose_home


def _run(history: LatencyHistory, now: float, current: dict[int, float], home: int, **kw: object) -> int:
    history.add(now, current)
    return choose_home(now=now, current=current, best_recent=history.best(), previous_home=home, **kw)  # type: ignore[arg-type]


def test_first_report_picks_the_fastest() -> None:
    assert _run(LatencyHistory(), 0.0, {1: 0.030, 2: 0.020, 3: 0.050}, 0) == 2


def test_small_differences_do_not_move_the_home() -> None:
    h = LatencyHistory()
    home = _run(h, 0.0, {1: 0.040, 2: 0.050}, 0)
    assert home == 1
    # Region 2 becomes faster, but by less than 10 ms...
    home = _run(h, 30.0, {1: 0.040, 2: 0.032}, home)
    assert home == 1
    # ...or by more than 10 ms but less than a third (45 vs 60 ms: 75 %).
    h2 = LatencyHistory()
    assert _run(h2, 0.0, {1: 0.060, 2: 0.070}, 0) == 1
    assert _run(h2, 30.0, {1: 0.060, 2: 0.045}, 1) == 1


def test_a_clearly_better_region_takes_over() -> None:
    h = LatencyHistory()
    assert _run(h, 0.0, {1: 0.060, 2: 0.070}, 0) == 1
    assert _run(h, 30.0, {1: 0.060, 2: 0.030}, 1) == 2  # 30 ms faster and half the latency


def test_best_recent_latency_counts_so_one_good_sample_is_remembered() -> None:
    h = LatencyHistory()
    assert _run(h, 0.0, {1: 0.020, 2: 0.080}, 0) == 1
    # Region 1 has a bad sample now; its best over the history is still 20 ms, so it stays best.
    assert _run(h, 30.0, {1: 0.090, 2: 0.050}, 1) == 1
    # Once the good sample left the 5 min + 5 s window, region 2 (50 ms) beats 1 (90 ms now).
    assert HISTORY_WINDOW == 305.0
    assert _run(h, 306.0, {1: 0.090, 2: 0.050}, 1) == 2


def test_only_regions_answering_now_can_become_home() -> None:
    h = LatencyHistory()
    assert _run(h, 0.0, {1: 0.010, 2: 0.080}, 0) == 1
    assert _run(h, 30.0, {2: 0.080}, 1) == 2  # 1 is silent and no DERP frame came: not reachable


def test_old_home_reachable_through_a_recent_derp_frame_is_kept() -> None:
    h = LatencyHistory()
    assert _run(h, 0.0, {1: 0.050, 2: 0.060}, 0) == 1
    assert _run(h, 30.0, {2: 0.055}, 1, last_heard_from_home=25.0) == 1  # heard 5 s ago
    assert _run(h, 60.0, {2: 0.055}, 1, last_heard_from_home=50.0) == 2  # 10 s ago: too long


def test_no_latency_data_keeps_a_home_heard_within_two_minutes() -> None:
    assert choose_home(now=100.0, current={}, best_recent={}, previous_home=3, last_heard_from_home=0.0) == 3
    assert choose_home(now=121.0, current={}, best_recent={}, previous_home=3, last_heard_from_home=0.0) == 0
    assert choose_home(now=1.0, current={}, best_recent={}, previous_home=3) == 0


def test_region_score_forced_and_never_home() -> None:
    current = {1: 0.030, 2: 0.040}
    assert choose_home(now=0.0, current=current, best_recent=current) == 1
    assert choose_home(now=0.0, current=current, best_recent=current, region_score={1: 2.0}) == 2
    assert choose_home(now=0.0, current=current, best_recent=current, forced_region=2, previous_home=1) == 2
    assert choose_home(now=0.0, current=current, best_recent=current, forced_region=9) == 1  # unreachable
    assert choose_home(now=0.0, current=current, best_recent=current, never_home={1}) == 2
    assert choose_home(now=0.0, current={1: 0.03}, best_recent={1: 0.03}, never_home={1}) == 0


def test_alternating_samples_under_the_hysteresis_never_flap() -> None:
    h = LatencyHistory()
    home = _run(h, 0.0, {1: 0.050, 2: 0.052}, 0)
    homes = []
    for i in range(1, 40):
        a, b = (0.050, 0.045) if i % 2 else (0.049, 0.053)
        home = _run(h, i * 20.0, {1: a, 2: b}, home)
        homes.append(home)
    assert set(homes) == {1}
