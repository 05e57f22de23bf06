"""A rank that dies or freezes takes the whole job down, promptly and loudly (no silent survivor)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.schema import ALERTS_SENT
from tests.slack_receiver import Receiver
from tests.wandb_records import history, wandb_records

pytestmark = pytest.mark.slow


def _rank_pids(config_marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"megatron_ext.train .*{config_marker}"],
                         capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def _rank_pid(config_marker: str, rank: int) -> int:
    """The process of one rank: submitit's local executor numbers its tasks in the env."""
    pids = _rank_pids(config_marker)
    assert len(pids) == 2, pids
    return next(pid for pid in pids
                if psutil.Process(pid).environ()["SUBMITIT_LOCAL_GLOBALID"] == str(rank))


def _launch_and_wait_for_steps(workdir: Path, name: str, *overrides: str, steps: int = 5,
                               env: dict[str, str] | None = None
                               ) -> tuple[subprocess.Popen, Path]:
    """A 2-rank local job of 300 steps, returned once ``steps`` of them are in metrics.jsonl."""
    launch = subprocess.Popen(
        [sys.executable, "-m", "launch", f"name={name}", "train.steps=300",
         "checkpoint.save_interval=0", *overrides],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})})
    launches = workdir / "runs" / name / "launches"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait until training is really under way
        files = list(launches.glob("*/metrics.jsonl"))
        if files and len(files[0].read_text().splitlines()) >= steps:
            return launch, files[0].parent
        time.sleep(0.5)
    launch.kill()
    pytest.fail(f"{name}: fewer than {steps} steps in 180 s")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_sigkill_of_one_rank_ends_the_job_non_zero(workdir: Path, receiver: Receiver) -> None:
    name = "killed-rank"
    launch, run_dir = _launch_and_wait_for_steps(
        workdir, name, "resilience.collective_timeout_s=60", "logging.slack.enabled=true",
        env={"SLACK_WEBHOOK_URL": receiver.url})
    os.kill(_rank_pid(f"runs/{name}/", rank=1), signal.SIGKILL)
    killed_at = time.monotonic()
    stdout, stderr = launch.communicate(timeout=60 + 30)  # collective timeout + 30 s
    assert launch.returncode != 0
    assert "failed" in stderr
    assert time.monotonic() - killed_at < 90
    assert _rank_pids(f"runs/{name}/") == []  # no rank left hanging
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) < 300
    # One failure alert for the job, from the launcher (megatron_ext.job_end), which saw how
    # rank 1 ended; the survivor's "Connection closed by peer" claims nothing (it used to, and
    # blamed rank 0).
    failures = [post for post in receiver.posts if " failed (" in post]
    assert len(failures) == 1, receiver.posts
    claimed_by = (run_dir / ALERTS_SENT / "failure").read_text()
    assert claimed_by.startswith("launcher on"), claimed_by
    assert claimed_by in failures[0] and "killed by SIGKILL" in failures[0]


WATCHDOG_S = 10


def test_sigstop_of_one_rank_is_caught_by_the_watchdog_and_ends_the_job(workdir: Path) -> None:
    """A frozen rank (SIGSTOP: no exit, sockets stay open) hangs its peers in a collective.

    Only the watchdog of a live peer can notice; the frozen rank itself must be killed too.
    """
    name = "stopped-rank"
    launch, run_dir = _launch_and_wait_for_steps(
        workdir, name, f"resilience.watchdog.timeout_s={WATCHDOG_S}",
        "resilience.collective_timeout_s=600",  # so the watchdog, not gloo, ends the wait
        "logging.wandb.mode=offline", env={"WANDB_DIR": str(workdir / "wandb-home"),
                                           "WANDB_CONFIG_DIR": str(workdir / "wandb-home")})
    os.kill(_rank_pid(f"runs/{name}/", rank=1), signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _, stderr = launch.communicate(timeout=WATCHDOG_S + 30)
        left = _rank_pids(f"runs/{name}/")
    finally:  # never leave a frozen process behind, even when the test fails
        for pid in _rank_pids(f"runs/{name}/"):
            os.kill(pid, signal.SIGKILL)
        launch.kill()
    assert launch.returncode != 0
    assert time.monotonic() - stopped_at < WATCHDOG_S + 30
    assert left == []  # the frozen rank was killed, not left stopped
    assert "rank 0 failed" in stderr and "rank 1 failed" in stderr
    rank0_err = next((run_dir / "logs").glob("*_0_log.err")).read_text()
    assert "WATCHDOG: rank 0" in rank0_err
    stacks = rank0_err[rank0_err.index("WATCHDOG: rank 0"):]
    assert "(most recent call first)" in stacks and "megatron_ext/train.py" in stacks
    assert "megatron_ext/train.py" in (run_dir / "hang-stacks-rank0.txt").read_text()
    # The watchdog's exit skips every cleanup; rank 0 still finished its W&B run first, so the
    # dashboard has every step the attempt ran (before, the last one or all of them were lost).
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text()
             .splitlines()]
    assert [row["_step"] for row in history(wandb_records(run_dir)) if "train/loss" in row] \
        == steps
