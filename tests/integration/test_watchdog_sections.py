"""Checkpoint saves are no steps: real ranks whose every save blocks longer than the step
timeout finish, save included (before, the watchdog called the save a hang and the save was
lost, the exit save too)."""
from __future__ import annotations

import os
import subprocess

import pytest

from launch.prepare import write_run_dir
from tests.conftest import REPO, make_config
from tests.integration.conftest import torchrun_argv

pytestmark = pytest.mark.slow


def test_a_save_longer_than_the_step_timeout_is_no_hang(tmp_path):
    cfg = make_config("data=synthetic", "train.steps=6", "train.warmup_steps=1",
                      "resilience.straggler.enabled=false", "resilience.watchdog.timeout_s=3",
                      f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=3",
                      run_dir=str(tmp_path / "run"))
    job = subprocess.run(torchrun_argv(str(REPO / "tests/integration/faulty_rank.py"),
                                       str(write_run_dir(cfg)), "slow_save", "5"),
                         env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-3000:]
    assert "WATCHDOG" not in log and "finished 6 steps" in log
    assert (tmp_path / "ckpt" / "step_000006" / "COMMITTED.json").is_file()  # the exit save
