"""The memory predictor (launch.planning.memory) against peak memory measured on a GPU (benchmarks/gpu/measure_memory.py).

Each measurement stores the overrides it ran with; the prediction is made now from the same
config, so a change to the formula is judged against the measurements at once. Allocated is
compared with ``torch.cuda.max_memory_allocated``, reserved with ``max_memory_reserved``.
"""
from __future__ import annotations

import json
import statistics

import pytest

from launch.config import derive_layout
from tests.conftest import REPO, make_config
from launch.planning.memory import MemoryBreakdown, predict

MEASUREMENTS = REPO / "tests" / "data" / "memory_measurements.json"
MEDIAN_ERROR = 0.03
WORST_ERROR = 0.08
UNDER_PREDICTION = 0.05
"""A configuration predicted to fit must not be predicted more than 5% below its measured peak:
"fits" followed by an out-of-memory error is the worst failure."""


def _predicted(overrides: list[str]) -> MemoryBreakdown:
    cfg = make_config(*overrides)
    return predict(cfg, derive_layout(cfg))


@pytest.fixture(scope="module")
def measurements() -> list[dict]:
    if not MEASUREMENTS.exists():
        pytest.skip(f"{MEASUREMENTS.relative_to(REPO)} does not exist yet: run "
                    "python benchmarks/gpu/measure_memory.py on a GPU node")
    return json.loads(MEASUREMENTS.read_text())["measurements"]


def test_predictions_match_measured_peaks(measurements: list[dict]) -> None:
    ran = [m for m in measurements if not m["oom"]]
    assert len(ran) >= 20, f"only {len(ran)} measured configurations; the matrix has more"
    errors, under = [], []
    print(f"\n{'configuration':<36} {'alloc GiB':>9} {'pred':>7} {'error':>7} "
          f"{'resv GiB':>9} {'pred':>7} {'error':>7}")
    for m in ran:
        p = _predicted(m["overrides"])
        alloc = (p.allocated_gib - m["allocated_gib"]) / m["allocated_gib"]
        resv = (p.reserved_gib - m["reserved_gib"]) / m["reserved_gib"]
        errors.append(abs(alloc))
        if p.fits and min(alloc, resv) < -UNDER_PREDICTION:
            under.append(f"{m['name']}: {alloc:+.1%} allocated, {resv:+.1%} reserved")
        print(f"{m['name']:<36} {m['allocated_gib']:>9.2f} {p.allocated_gib:>7.2f} {alloc:>+7.1%} "
              f"{m['reserved_gib']:>9.2f} {p.reserved_gib:>7.2f} {resv:>+7.1%}")
    median, worst = statistics.median(errors), max(errors)
    print(f"allocated: median |error| {median:.1%}, worst {worst:.1%}")
    assert not under, f"predicted to fit but more than {UNDER_PREDICTION:.0%} low: {under}"
    assert median < MEDIAN_ERROR and worst < WORST_ERROR


def test_configurations_that_ran_out_of_memory_are_predicted_not_to_fit(
        measurements: list[dict]) -> None:
    wrong = [m["name"] for m in measurements if m["oom"] and _predicted(m["overrides"]).fits]
    assert not wrong, f"predicted to fit, but out of memory on the GPU: {wrong}"
