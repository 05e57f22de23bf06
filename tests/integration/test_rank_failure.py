"""A rank that dies takes the whole job down, promptly and loudly (no silent survivor)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _rank_pids(config_marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"megatron_ext.train .*{config_marker}"],
                         capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_sigkill_of_one_rank_ends_the_job_non_zero(workdir: Path) -> None:
    name = "killed-rank"
    launch = subprocess.Popen(
        [sys.executable, "-m", "launch", f"name={name}", "train.steps=300",
         "resilience.collective_timeout_s=60", "checkpoint.save_interval=0"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "runs" / name / "launches"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait until training is really under way
        files = list(metrics.glob("*/metrics.jsonl"))
        if files and len(files[0].read_text().splitlines()) >= 5:
            break
        time.sleep(0.5)
    pids = _rank_pids(f"runs/{name}/")
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    stdout, stderr = launch.communicate(timeout=60 + 30)  # collective timeout + 30 s
    assert launch.returncode != 0
    assert "failed" in stderr
    assert time.monotonic() - killed_at < 90
    assert _rank_pids(f"runs/{name}/") == []  # no rank left hanging
    steps = len(next(metrics.glob("*/metrics.jsonl")).read_text().splitlines())
    assert steps < 300
