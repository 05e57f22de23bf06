"""The time limit: the lead derived at submit time, and the ranks' own stop before the limit."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from launch.planning.planner import step_time
from launch.planning.time_limit import save_time_s, signal_lead_s, with_time_limit
from launch.prepare import choose_layout
from megatron_ext.deadline import SIGNAL_EARLY_S, TimeBudget, out_of_time
from megatron_ext.env import job_end_time
from megatron_ext.signals import StopSignals
from tests.conftest import make_config, run_launch


@pytest.mark.parametrize("cluster", ["hyperpod_p4d", "pcs_p5"])
def test_the_signal_lead_covers_two_predicted_steps_a_save_and_a_minute(cluster: str) -> None:
    cfg, layout, _ = choose_layout(make_config(f"cluster={cluster}", "cluster.nodes=2"))
    timed = with_time_limit(cfg, layout)
    step = step_time(cfg, layout, cfg.train.micro_batch_size, cfg.train.recompute)
    lead = int(timed.cluster.signal.split("@")[1])
    assert timed.cluster.step_time_s == pytest.approx(step, abs=1e-3)
    assert lead >= 2 * step + save_time_s(cfg, layout) + 60 > 120  # today's fixed lead: short
    # the configured lead is a floor, and step and save times the user gives are used
    long_lead = with_time_limit(make_config(f"cluster={cluster}", "cluster.nodes=2",
                                            "cluster.signal=USR2@9000"), layout)
    assert long_lead.cluster.signal == "USR2@9000"
    given = make_config(f"cluster={cluster}", "cluster.nodes=2", "cluster.step_time_s=500",
                        "cluster.save_time_s=100")
    assert with_time_limit(given, layout).cluster.signal == f"USR1@{signal_lead_s(500, 100)}"
    assert signal_lead_s(500, 100) == 1160


def test_local_runs_keep_their_config() -> None:
    cfg, layout, _ = choose_layout(make_config())
    assert with_time_limit(cfg, layout) is cfg


def test_the_dry_run_shows_the_derived_lead(tmp_path) -> None:
    result = run_launch("cluster=hyperpod_p4d", "cluster.nodes=2", "launch.dry_run=true",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    lead = result.stdout.split("#SBATCH --signal=USR1@")[1].split()[0]
    assert int(lead) > 2 * 200 and f"--signal=USR1@{lead} (at least two steps of" in result.stdout


def test_out_of_time_counts_the_step_the_saves_and_the_margin() -> None:
    assert not out_of_time(0, 100, step_s=30, save_s=9, saves=1, margin_s=60)
    assert out_of_time(0, 100, step_s=30, save_s=11, saves=1, margin_s=60)
    assert out_of_time(0, 100, step_s=30, save_s=9, saves=2, margin_s=60)  # one in flight


def test_measured_times_replace_the_predictions() -> None:
    budget = TimeBudget(time.time() + 200, step_s=10, save_s=10, margin_s=60)
    assert not budget.exhausted(save_pending=False)
    budget.observe(150, None)  # slower than predicted: the next step would not fit
    assert budget.step_s == 150 and budget.exhausted(save_pending=False)
    for _ in range(5):
        budget.observe(5, 20)
    assert budget.step_s == 5 and budget.save_s == 20 and not budget.exhausted(
        save_pending=False)
    assert TimeBudget(None, step_s=1e9, save_s=1e9, margin_s=0).exhausted(
        save_pending=True) is False  # no limit known: only signals stop


def test_the_end_time_comes_from_slurm_or_a_test(monkeypatch) -> None:
    assert job_end_time({}) is None  # cluster=local
    assert job_end_time({"SLURM_JOB_END_TIME": "1700000000"}) == 1_700_000_000.0


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_the_ranks_stop_for_the_time_limit_with_no_signal(handlers: None) -> None:
    stop = StopSignals("USR1@120", TimeBudget(time.time() + 100, step_s=1, save_s=1,
                                              margin_s=60))
    assert not stop.requested(step_s=30, save_s=None)
    assert stop.requested(step_s=45, save_s=None)  # 45 + 1 + 60 > 100 s left
    assert stop.wants_requeue and stop.exit_code == 0 and stop.reason == "time limit near"
    assert 35 < stop.seconds_left() <= 40  # for the S3 copy: to the end, less the margin


def test_a_signal_the_budget_explains_waits_for_the_last_step_that_fits(handlers: None) -> None:
    lead = 120
    stop = StopSignals(f"USR1@{lead}", TimeBudget(time.time() + lead + SIGNAL_EARLY_S - 1,
                                                  step_s=1, save_s=1, margin_s=10))
    os.kill(os.getpid(), signal.SIGUSR1)
    assert not stop.requested(step_s=1, save_s=1)  # the limit it warns of is still steps away
    far = StopSignals(f"USR1@{lead}", TimeBudget(time.time() + 3600, step_s=1, save_s=1,
                                                 margin_s=10))
    os.kill(os.getpid(), signal.SIGUSR1)  # long before the limit: preemption or a user
    assert far.requested(step_s=1, save_s=1) and far.reason == "stop signal"


@pytest.mark.parametrize("cluster, minutes", [("hyperpod_p4d", 60), ("pcs_p5", 60),
                                               ("local", 0)])
def test_gpu_profiles_also_save_every_hour(cluster: str, minutes: float) -> None:
    assert make_config(f"cluster={cluster}").checkpoint.interval_minutes == minutes
    assert make_config(f"cluster={cluster}", "checkpoint.interval_minutes=180"
                       ).checkpoint.interval_minutes == 180  # the command line wins
