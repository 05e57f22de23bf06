"""Straggler arithmetic; the multi-process gloo test lives in tests/integration."""
from __future__ import annotations

import pytest

from megatron_ext.straggler import (NullStragglerDetector, StragglerDetector, StragglerReport,
                                    above_threshold, comparable, persistent, pipeline_position,
                                    role_medians)
from tests.conftest import make_config


def find_stragglers(times: list[float], threshold: float,
                    roles: list[int] | None = None) -> list[tuple[int, float]]:
    """What ``StragglerDetector.step`` reports for these per-rank times."""
    return above_threshold(times, role_medians(times, roles or [0] * len(times)), threshold)


def test_no_straggler_among_equal_ranks():
    assert find_stragglers([1.0, 1.05, 0.97, 1.02], threshold=1.5) == []


def test_slow_ranks_are_found_relative_to_the_median_slowest_first():
    found = find_stragglers([1.0, 1.6, 1.0, 3.0, 0.9], threshold=1.5)
    assert [rank for rank, _ in found] == [3, 1]
    assert found[0][1] == pytest.approx(3.0) and found[1][1] == pytest.approx(1.6)


def test_ranks_are_compared_within_their_pipeline_stage():
    # the last stage (role 1) computes the loss over a large vocabulary: slower by design
    times, roles = [1.0, 1.05, 2.0, 2.1, 1.0, 4.4], [0, 0, 1, 1, 0, 1]
    found = find_stragglers(times, threshold=1.5, roles=roles)
    assert [rank for rank, _ in found] == [5] and found[0][1] == pytest.approx(4.4 / 2.1)
    assert [rank for rank, _ in find_stragglers(times, threshold=1.5)] == [5, 3, 2]  # mixed up


def test_the_stages_between_first_and_last_are_compared_with_each_other():
    """PP=4 with a single data-parallel replica: one rank per stage, yet a slow middle stage is
    found; the first (embedding) and last (loss) stages are slower by design and not blamed."""
    roles = [pipeline_position(stage, 4) for stage in range(4)]
    assert roles == [0, 1, 1, 2]
    assert [pipeline_position(stage, 2) for stage in range(2)] == [0, 2]
    assert pipeline_position(0, 1) == 0
    times = [1.2, 0.8, 1.7, 1.5]
    assert find_stragglers(times, threshold=1.5, roles=roles) == [(2, pytest.approx(1.7 / 0.8))]
    assert find_stragglers([1.2, 0.8, 0.85, 1.5], threshold=1.5, roles=roles) == []


def test_with_two_ranks_the_faster_one_is_the_yardstick():
    assert find_stragglers([1.0, 2.0], threshold=1.5) == [(1, 2.0)]


def test_threshold_is_exclusive_and_zero_times_report_nothing():
    assert find_stragglers([1.0, 1.5, 1.0], threshold=1.5) == []
    assert find_stragglers([0.0, 0.0, 0.0], threshold=1.5) == []


def test_report_reads_well():
    r = StragglerReport(rank=5, hostname="p5-node-7", slowdown=2.04, compute_s=0.51, median_s=0.25)
    assert r.describe() == "rank 5 on p5-node-7: 2.04x the median (510 ms vs 250 ms per step)"


def test_disabled_detector_is_a_null_object():
    cfg = make_config("resilience.straggler.enabled=false")
    detector = StragglerDetector.from_config(cfg, group=None, rank=0, hostname="h")
    assert isinstance(detector, NullStragglerDetector)
    assert detector.step(1.0) is None


def test_only_a_rank_slow_in_consecutive_intervals_is_reported():
    """A healthy run crosses the threshold on alternating ranks (async saves); a straggler stays."""
    streaks, reported = [0, 0, 0], []
    for slow in ([(1, 1.6)], [(2, 1.7)], [(1, 1.6)], [(0, 2.0)], [(0, 2.1)], [(0, 2.2)],
                 [(0, 2.0), (2, 1.6)]):
        found, streaks = persistent(slow, streaks, consecutive=3)
        reported.append([i for i, _ in found])
    assert reported == [[], [], [], [], [], [0], [0]]
    assert persistent([(2, 1.6)], [0, 0, 0], consecutive=1)[0] == [(2, 1.6)]


def test_ranks_alone_in_their_pipeline_position_cannot_be_compared():
    assert not comparable([0, 2])  # PP=2, one replica: a first and a last stage
    assert comparable([0, 1, 1, 2])  # PP=4: the two stages between compare
    assert comparable([0, 0])  # DP=2
