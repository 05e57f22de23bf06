"""The real launch command against a real one-host Slurm: a job, a sweep, a requeue.

Job states come from squeue/scontrol (no slurmdbd, so no sacct) and results from the run folder.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_launch
from tests.integration.conftest import SLURM_CPU
from tests.slack_receiver import Receiver

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


def log_tail(job_id: str, run_dir: Path) -> str:
    log = run_dir / "logs" / job_id / f"{job_id}_0_log.out"
    return log.read_text()[-3000:] if log.exists() else "(no log yet)"


def wait_for_steps(job_id: str, run_dir: Path, steps: int, timeout: float = 180) -> None:
    """Poll until the job has logged ``steps`` training steps.

    The clock restarts when Slurm starts the job (time in the queue is not slow training),
    and a job that ends first fails at once, so a failure says where the job was."""
    deadline, running = time.monotonic() + timeout, False
    while len(metrics(run_dir)) < steps:
        info = job_info(job_id)
        if info["JobState"] == "RUNNING" and not running:
            deadline, running = time.monotonic() + timeout, True
        state = {key: info.get(key) for key in ("JobState", "Reason", "RunTime", "NodeList")}
        alive = info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING")
        assert alive and time.monotonic() < deadline, (state, log_tail(job_id, run_dir))
        time.sleep(0.5)


def launch(workdir: Path, *overrides: str, env: dict[str, str] | None = None
           ) -> tuple[str, Path]:
    result = run_launch(*SLURM_CPU, *overrides, cwd=workdir, timeout=120, env=env)
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
    sweeps = {re.search(r"^sweep: (.+)$", (p / "config.yaml").read_text(), re.M).group(1)
              for p in points}
    assert len(sweeps) == 1 and sweeps.pop().startswith("slurm-sweep-")  # one W&B group


def _interrupt_mid_run(workdir: Path, name: str, interrupt: list[str]) -> tuple[str, str]:
    """Start a 40-step job, run ``interrupt`` once it is mid-run; its final log and job id."""
    steps = 40
    job_id, run_dir = launch(workdir, f"name={name}", f"train.steps={steps}",
                             "train.warmup_steps=2", "checkpoint.save_interval=1000")
    wait_for_steps(job_id, run_dir, 3)  # training has started, far from done
    subprocess.run([*interrupt, job_id], check=True)
    info = wait_for(job_id)
    log = (run_dir / "logs" / job_id / f"{job_id}_0_log.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert f"job {job_id} on" in log and "restart 1" in log
    # The only checkpoint is the one saved on the signal (the interval is beyond the run), and
    # the rerun continues from it: every step exactly once, none lost, none repeated.
    resumed = [int(n) for n in re.findall(r"on 2 ranks \(CPU, gloo\) from step (\d+)", log)]
    assert len(resumed) == 2 and resumed[0] == 0 and resumed[1] >= 3, log
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, steps + 1)), log
    return job_id, log


def test_a_requeued_job_resumes_from_the_checkpoint_saved_on_sigterm(
        slurm: Path, workdir: Path) -> None:
    """Preemption and node failure look like this: Slurm sends SIGTERM and requeues the job."""
    _, log = _interrupt_mid_run(workdir, "slurm-requeue", ["scontrol", "requeue"])
    assert "stop signal: saving step" in log


def test_the_pre_timeout_signal_saves_and_requeues_the_job(slurm: Path, workdir: Path) -> None:
    """``--signal=USR1@120`` near the time limit: the ranks save, rank 0 asks
    for a requeue (a file in the run folder), the batch script requeues."""
    _, log = _interrupt_mid_run(workdir, "slurm-timeout", ["scancel", "--signal=USR1"])
    assert "stop signal: saving step" in log


def test_a_frozen_rank_ends_the_job_once_the_watchdog_fires(slurm: Path, workdir: Path) -> None:
    """A SIGSTOPped rank never exits: the watchdog of its peer does, and ``srun
    --kill-on-bad-exit`` then ends the step instead of holding the nodes to the time limit.
    The user hears of it once: the watchdog's hang alert (the batch script's job_end sees it)."""
    receiver = Receiver()
    try:
        job_id, run_dir = launch(workdir, "name=slurm-frozen", "train.steps=300",
                                 "cluster.max_restarts=0",  # restarts: test_a_hanging_job_...
                                 "resilience.watchdog.timeout_s=10",
                                 "resilience.collective_timeout_s=600",
                                 "logging.slack.enabled=true",
                                 env={"SLACK_WEBHOOK_URL": receiver.url})
        _freeze_a_rank_and_wait(job_id, run_dir)
    finally:
        receiver.close()
    assert [post.splitlines()[0].split("*")[-1] for post in receiver.posts
            if "hang" in post or "failed" in post] == [" hang detected (rank 0 on "
                                                       f"{socket.gethostname()})"], receiver.posts


def _freeze_a_rank_and_wait(job_id: str, run_dir: Path) -> None:
    wait_for_steps(job_id, run_dir, 3)
    ranks = subprocess.run(["pgrep", "-f", f"^[^ ]*python[^ ]* -m megatron_ext.train {run_dir}/"],
                           capture_output=True, text=True).stdout.split()  # not srun's own
    assert len(ranks) == 2, ranks
    subprocess.run(["kill", "-STOP", ranks[1]], check=True)
    frozen = time.monotonic()
    info = wait_for(job_id, timeout=120)
    assert info["JobState"] == "FAILED" and time.monotonic() - frozen < 10 + 30, info
    assert len(metrics(run_dir)) < 300


def _faulty_venv(tmp_path: Path, *fault: str) -> Path:
    """A ``cluster.venv`` whose python runs the ranks through faulty_rank.py with ``fault``
    (a slow or a hung rank: what a real GPU job does here only by chance); the batch script's
    other commands (job_end) run unchanged."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    faulty = REPO / "tests" / "integration" / "faulty_rank.py"
    python = venv / "bin" / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "-m megatron_ext.train" ]; then exec {sys.executable} {faulty} "$3" '
        f"{shlex.join(fault)}; fi\n"
        f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return venv


def test_the_ranks_save_and_requeue_before_the_time_limit(slurm: Path, workdir: Path,
                                                          tmp_path: Path) -> None:
    """Steps of 10 s, a 3-minute limit: the ranks stop when the next step, a save and the
    margin no longer fit, save, and the job is requeued; every step runs exactly once and no
    attempt reaches its limit. A fixed 120 s lead on this limit stops every attempt after a
    step or two (and a USR1 that beats the ranks' handler kills them)."""
    steps = 18  # 180 s of steps alone outlast the 3-minute limit: never one attempt
    job_id, run_dir = launch(workdir, "name=slurm-limit", f"train.steps={steps}",
                             "train.warmup_steps=1", "train.global_batch_size=2",
                             "train.micro_batch_size=1", "checkpoint.save_interval=1000",
                             "cluster.timeout_min=3", "cluster.time_limit_margin_s=20",
                             f"cluster.venv={_faulty_venv(tmp_path, 'slow', '1', '10')}")
    info = wait_for(job_id, timeout=600)
    log = (run_dir / "logs" / job_id / f"{job_id}_0_log.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    restarts = int(info["Restarts"])
    assert 1 <= restarts <= 2 and log.count("time limit near: saving step") == restarts, log
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, steps + 1)), log


def test_a_nan_stop_is_not_requeued(slurm: Path, workdir: Path, tmp_path: Path) -> None:
    """A rerun would meet the same NaN at the same step: the job fails once, not forever."""
    job_id, run_dir = launch(workdir, "name=slurm-nan", "train.steps=20", "train.warmup_steps=1",
                             "train.global_batch_size=2", "train.micro_batch_size=1",
                             "cluster.cpus_per_task=0",  # from sinfo: this node's 2 CPUs / 2
                             f"cluster.venv={_faulty_venv(tmp_path, 'nan', '1', '3')}")
    script = (run_dir / "logs" / job_id / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --cpus-per-task=1\n" in script
    info = wait_for(job_id)
    err = (run_dir / "logs" / job_id / f"{job_id}_0_log.err").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", err[-3000:]
    assert "not requeued, a rerun would fail the same way: loss nan at step 3" in err
    assert [row["step"] for row in metrics(run_dir)] == [1, 2]


def test_a_hanging_job_is_requeued_at_most_max_restarts_times(slurm: Path, workdir: Path,
                                                             tmp_path: Path) -> None:
    """Every attempt hangs in its first step (a rank stuck for 10 minutes): the watchdog ends
    it, the batch script requeues it once (``cluster.max_restarts=1``), then gives up with an
    alert saying so."""
    receiver = Receiver()
    try:
        job_id, run_dir = launch(workdir, "name=slurm-hang", "train.steps=20",
                                 "train.warmup_steps=1",
                                 "cluster.max_restarts=1",
                                 "resilience.watchdog.first_step_timeout_s=20",
                                 "logging.slack.enabled=true",
                                 f"cluster.venv={_faulty_venv(tmp_path, 'slow', '1', '600')}",
                                 env={"SLACK_WEBHOOK_URL": receiver.url})
        info = wait_for(job_id, timeout=400)
    finally:
        receiver.close()
    err = (run_dir / "logs" / job_id / f"{job_id}_0_log.err").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", err[-3000:]
    assert "restart 1 of cluster.max_restarts=1" in err
    assert "failed 2 times, not requeued (cluster.max_restarts=1)" in err
    assert len([p for p in receiver.posts if "is not requeued again" in p]) == 1, receiver.posts
