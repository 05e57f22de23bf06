"""The real launch command against a real one-host Slurm: a job, a sweep, a requeue.

Job states come from squeue/scontrol (no slurmdbd, so no sacct) and results from the run folder.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_launch
from tests.integration.conftest import SLURM_CPU

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(job_id: str, timeout: float = 180) -> dict[str, str]:
    """Poll until the job has left the queue for good; its final scontrol record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {job_info(job_id)['JobState']} after {timeout} s")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launch(workdir: Path, *overrides: str) -> tuple[str, Path]:
    result = run_launch(*SLURM_CPU, *overrides, cwd=workdir, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"submitted job (\d+); run folder (\S+)", result.stdout)
    assert match, result.stdout
    return match.group(1), Path(match.group(2))


def test_two_rank_training_job_completes_with_a_falling_loss(slurm: Path, workdir: Path) -> None:
    job_id, run_dir = launch(workdir, "name=slurm-train", "train.steps=20", "train.warmup_steps=2")
    info = wait_for(job_id)
    log = (run_dir / "logs" / job_id / f"{job_id}_0_log.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["NumTasks"] == "2" and (run_dir / "logs" / job_id / f"{job_id}_submission.sh").exists()
    losses = [row["loss"] for row in metrics(run_dir)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert "DP=2" in log and "healthcheck on" in log


def test_multirun_sweep_submits_one_job_per_point(slurm: Path, workdir: Path) -> None:
    """`-m` through hydra-submitit-launcher's local launcher: each point's launch runs sbatch."""
    result = run_launch("-m", "hydra/launcher=submitit_local", *SLURM_CPU, "name=slurm-sweep",
                        "train.steps=4", "train.warmup_steps=1", "train.lr=1e-3,3e-3",
                        cwd=workdir, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    points = sorted((workdir / "runs" / "slurm-sweep" / "sweeps").glob("*/[0-9]"))
    jobs = {p: next((p / "logs").glob("[0-9]*")).name for p in points}
    assert len(set(jobs.values())) == 2
    for point, job_id in jobs.items():
        assert wait_for(job_id)["JobState"] == "COMPLETED"
        assert [row["step"] for row in metrics(point)] == [1, 2, 3, 4]
    lrs = sorted(max(row["lr"] for row in metrics(p)) for p in points)
    assert lrs == pytest.approx([1e-3, 3e-3])


def test_a_requeued_job_runs_again_and_completes(slurm: Path, workdir: Path) -> None:
    steps = 40
    job_id, run_dir = launch(workdir, "name=slurm-requeue", f"train.steps={steps}",
                             "train.warmup_steps=2")
    deadline = time.monotonic() + 120
    while len(metrics(run_dir)) < 3:  # mid-run: training has started, far from done
        assert time.monotonic() < deadline, job_info(job_id)
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    info = wait_for(job_id)
    log = (run_dir / "logs" / job_id / f"{job_id}_0_log.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert f"job {job_id} on" in log and "restart 1" in log
    assert metrics(run_dir)[-1]["step"] == steps
