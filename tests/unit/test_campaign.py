"""Campaign schedules: days, GPU-hours, cost, checkpoint blocking, failures and goodput."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from launch.config import validate
from launch.planning.campaign import campaign, young_interval_s
from launch.planning.planner import configure, plan
from tests.conftest import REPO, make_config

TOKENS = "train.tokens=100000000000"  # 1e11: 8B on one node, a few weeks
BASE = ("model=llama3_8b", "train=pretrain", "cluster.kind=slurm", "cluster.gpus_per_node=8",
        TOKENS, "cluster.save_time_s=30", "checkpoint.save_interval=0")


def _schedule(*overrides: str):
    cfg = make_config(*BASE, *overrides)
    best = plan(cfg)[0]
    return campaign(configure(cfg, best), best)


def test_without_failures_the_wall_time_is_compute_plus_save_blocking() -> None:
    r = _schedule("cluster.node_mtbf_hours=1e12", "checkpoint.interval_minutes=60")
    saves = math.ceil(r.compute_hours)  # one 30 s save per hour of compute
    assert r.steps == math.ceil(1e11 / (1024 * 8192))
    assert r.checkpoint_blocking_hours == pytest.approx(saves * 30 / 3600)
    assert r.wall_hours == pytest.approx(r.compute_hours + r.checkpoint_blocking_hours)
    assert r.goodput == pytest.approx(r.compute_hours / r.wall_hours)
    assert r.failures < 1e-6 and r.cost is None  # no price given: no cost


def test_failures_lose_the_work_since_the_last_save_and_the_restart() -> None:
    r = _schedule("cluster.node_mtbf_hours=100", "checkpoint.interval_minutes=60",
                  "cluster.restart_time_s=600")
    assert r.failures == pytest.approx(r.wall_hours / 100)
    assert r.lost_work_hours == pytest.approx(r.failures * 0.5)  # half an hourly interval
    assert r.restart_hours == pytest.approx(r.failures * 600 / 3600)
    assert r.wall_hours == pytest.approx(r.compute_hours + r.checkpoint_blocking_hours
                                         + r.lost_work_hours + r.restart_hours)


def test_young_interval_loses_less_than_saving_more_or_less_often() -> None:
    mtbf = ("cluster.node_mtbf_hours=50",)
    optimal = _schedule(*mtbf).optimal_interval_s
    assert optimal == pytest.approx(young_interval_s(30, 50 * 3600))  # one node: its own MTBF
    wall = {f: _schedule(*mtbf, f"checkpoint.interval_minutes={optimal * f / 60}").wall_hours
            for f in (0.5, 1.0, 2.0)}
    assert wall[1.0] < wall[0.5] and wall[1.0] < wall[2.0]


def test_more_nodes_finish_sooner_cost_per_node_hour_and_fail_more_often() -> None:
    price = "cluster.node_hour_price=98.32"
    one, four = _schedule(price), _schedule(price, "cluster.nodes=4")
    assert four.days < one.days / 3
    assert four.gpu_hours == pytest.approx(four.wall_hours * 32)
    assert four.cost == pytest.approx(four.wall_hours * 4 * 98.32)
    assert four.failures / four.wall_hours == pytest.approx(4 * one.failures / one.wall_hours)


def test_a_measured_step_time_replaces_the_model() -> None:
    r = _schedule("cluster.step_time_s=10")
    assert r.step_time_s == 10 and r.compute_hours == pytest.approx(r.steps * 10 / 3600)
    assert r.tokens_per_s_per_gpu == pytest.approx(1024 * 8192 / 10 / 8)


def test_failures_faster_than_the_work_they_lose_never_finish() -> None:
    r = _schedule("cluster.node_mtbf_hours=0.1", "cluster.restart_time_s=600")
    assert r.goodput == 0 and math.isinf(r.days)


def test_an_asynchronous_save_blocks_for_less_than_a_synchronous_one() -> None:
    predicted = ("cluster.save_time_s=0",)
    blocking = {a: _schedule(*predicted, f"checkpoint.async_save={a}").save_blocking_s
                for a in ("true", "false")}
    assert 0 < blocking["true"] < blocking["false"]


@pytest.mark.parametrize("override", ["train.tokens=-1", "cluster.node_hour_price=-5",
                                      "cluster.node_mtbf_hours=0", "cluster.restart_time_s=-1"])
def test_bad_campaign_settings_name_their_field(override: str) -> None:
    problems = validate(make_config(*BASE, override))
    assert len(problems) == 1 and problems[0].startswith(override)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.schedule", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_plans_each_node_count_and_refuses_a_campaign_without_tokens() -> None:
    run = _cli("--json", *BASE, "cluster.nodes=1,4", "cluster.node_hour_price=10")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    keys = {"nodes", "layout", "tokens_per_s_per_gpu", "days", "gpu_hours", "cost", "goodput",
            "optimal_save_interval"}
    assert [r["nodes"] for r in rows] == [1, 4] and all(keys <= set(r) for r in rows)
    assert rows[1]["days"] < rows[0]["days"]
    table = _cli(*BASE, "cluster.nodes=2")
    assert table.returncode == 0 and "2 nodes: TP=" in table.stdout
    assert "goodput" in table.stdout and "not measured" in table.stdout
    missing = _cli(*BASE[:4])
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: train.tokens must be > 0: the campaign's total tokens, e.g. "
        "train.tokens=2000000000000")
    bad = _cli(*BASE, "cluster.nodes=2,x")
    assert bad.returncode == 2 and "cluster.nodes=2,x" in bad.stderr
