"""Straggler detection with real gloo ranks: the detector alone (three ranks, one sleeping
twice as long per step), and the training loop with one rank's forward passes slowed."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from launch.prepare import write_run_dir
from megatron_ext.straggler import StragglerDetector
from tests.conftest import REPO, make_config
from tests.integration.conftest import torchrun_argv

WORLD, INTERVAL, BASE_S, SLOW_RANK = 3, 4, 0.05, 1


def run_phase(rank: int, slow_rank: int | None, consecutive: int = 1) -> dict:
    """Two report intervals of sleep-as-compute: the reports with their step, and the scores."""
    detector = StragglerDetector(None, report_interval=INTERVAL, threshold=1.5, rank=rank,
                                 hostname=f"node{rank}", consecutive=consecutive)
    reports, scores = [], []
    for step in range(1, 2 * INTERVAL + 1):
        start = time.perf_counter()
        time.sleep(BASE_S * (2 if rank == slow_rank else 1))
        check = detector.step(time.perf_counter() - start)
        if check is not None:
            scores.append([step, check.worst_slowdown])
            reports += [dataclasses.asdict(report) | {"step": step} for report in check.reports]
    return {"reports": reports, "scores": scores}


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        results = {"injected": run_phase(rank, SLOW_RANK), "clean": run_phase(rank, None),
                   "two in a row": run_phase(rank, SLOW_RANK, consecutive=2)}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_slow_rank_is_reported_on_every_rank_and_only_when_slow(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(WORLD)]
    assert all(r == results[0] for r in results)  # every rank gets the same reports
    injected = results[0]["injected"]["reports"]
    assert injected and {r["rank"] for r in injected} == {SLOW_RANK}
    assert injected[0]["step"] <= 2 * INTERVAL and injected[0]["hostname"] == f"node{SLOW_RANK}"
    assert all(1.6 < r["slowdown"] < 2.6 for r in injected)
    assert results[0]["clean"]["reports"] == []
    # Asked for two slow intervals in a row, the first interval reports nobody.
    assert {r["step"] for r in results[0]["two in a row"]["reports"]} == {2 * INTERVAL}
    # A score every interval, high with the slow rank, near 1 without it.
    assert [step for step, _ in results[0]["injected"]["scores"]] == [INTERVAL, 2 * INTERVAL]
    assert all(1.6 < score < 2.6 for _, score in results[0]["injected"]["scores"])
    assert all(1.0 <= score < 1.5 for _, score in results[0]["clean"]["scores"])


def test_a_slow_rank_in_real_training_is_named_within_two_report_intervals(tmp_path):
    """The training loop's own timing: whole steps end together (every rank waits in the
    gradient all-reduce), so only per-rank forward time can point at the slow one."""
    interval = 2
    cfg = make_config("data=synthetic", "train.steps=6", "train.warmup_steps=1",
                      "resilience.straggler.enabled=true",
                      f"resilience.straggler.report_interval={interval}",
                      "resilience.straggler.consecutive_reports=1",
                      f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=0",
                      "checkpoint.save_on_exit=false", run_dir=str(tmp_path / "run"))
    job = subprocess.run(torchrun_argv(str(REPO / "tests/integration/faulty_rank.py"),
                                       str(write_run_dir(cfg)), "slow", "1", "0.1"),
                         env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    found = re.findall(r"straggler: rank (\d+) on \S+: ([\d.]+)x the median", job.stdout)
    assert found and {rank for rank, _ in found} == {"1"}, job.stdout[-3000:]
    assert all(float(slowdown) > 1.5 for _, slowdown in found)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    flagged = [row["step"] for row in rows if row.get("straggler_worst_slowdown", 0) > 1.5]
    assert flagged and flagged[0] <= 2 * interval  # the dashboard's straggler score too
