"""Which rank died first and how, in the words srun and the local launcher leave behind."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from launch import rank_exit
from launch.prepare import write_run_dir
from launch.schema import REQUEUE_REQUEST
from megatron_ext import job_end
from tests.conftest import make_config

# srun 22.05's stderr after `srun --kill-on-bad-exit=1` when task 1 was SIGKILLed (seen here)
SRUN_KILLED = """srun: error: vm: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=42.0
slurmstepd-vm: error: *** STEP 42.0 ON vm CANCELLED AT 2026-12-01T23:18:33 ***
srun: error: vm: task 0: Terminated
"""
SRUN_EXITED = "srun: error: n2: tasks 2-3: Exited with exit code 75\nsrun: error: n1: task 0: Terminated\n"


def test_the_first_srun_error_names_the_rank_the_node_and_the_signal() -> None:
    died = rank_exit.first_srun_error(SRUN_KILLED)
    assert died == rank_exit.RankExit("1", "vm", 128 + signal.SIGKILL)
    assert died.how().startswith("was killed by SIGKILL (SIGKILL is often the kernel's OOM killer")
    assert "dmesg on vm" in died.how()
    died = rank_exit.first_srun_error(SRUN_EXITED)
    assert died == rank_exit.RankExit("2-3", "n2", 75) and "exited with code 75" in died.how()
    assert rank_exit.first_srun_error("job 7 on vm, restart 0\n") is None


def test_the_report_gives_the_last_committed_step_and_how_to_resume(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    for step in (4, 8):
        (ckpt / f"step_{step:06d}").mkdir(parents=True)
        (ckpt / f"step_{step:06d}" / "config.yaml").write_text("{}")
    (ckpt / "step_000004" / "COMMITTED.json").write_text("{}")  # step 8 is not committed
    cfg = make_config(f"checkpoint.dir={ckpt}", run_dir=str(tmp_path / "run"))
    write_run_dir(cfg, "cd /home/me && python -m launch name=x")
    log = tmp_path / "err"
    log.write_text("srun: error: vm: task 0: Killed\n" + SRUN_EXITED)  # an earlier attempt first
    text = rank_exit.what_happened(cfg, 143, str(log), len("srun: error: vm: task 0: Killed\n"))
    assert text.startswith("rank 2-3 on n2 exited with code 75")
    assert f"the last committed checkpoint is {ckpt / 'step_000004'}" in text
    assert text.endswith("to resume: cd /home/me && python -m launch name=x")
    (tmp_path / "run" / REQUEUE_REQUEST).touch()
    assert rank_exit.what_happened(cfg, 143, str(log)).startswith("rank 0 on vm was killed by")
    assert rank_exit.what_happened(cfg, 143, str(log)).endswith("requeued and resumes from there")


def test_job_end_prints_the_report_into_the_batch_log(tmp_path: Path) -> None:
    cfg = make_config(f"checkpoint.dir={tmp_path / 'none'}", run_dir=str(tmp_path / "run"))
    config = write_run_dir(cfg)
    log = tmp_path / "err"
    log.write_text(SRUN_KILLED)
    out = subprocess.run([sys.executable, "-m", "megatron_ext.job_end", str(config), "137",
                          "--srun-log", str(log), "--from", "0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert ("job attempt failed: rank 1 on vm was killed by SIGKILL" in out.stderr
            and f"no checkpoint was committed in {tmp_path / 'none'}" in out.stderr), out.stderr
    assert job_end.main([str(config), "143"]) == 0  # a planned end says nothing


def test_the_next_attempt_tells_of_a_node_that_failed(tmp_path: Path) -> None:
    """Slurm kills the batch script with a job whose node failed: the requeued attempt says it."""
    cfg = make_config(f"checkpoint.dir={tmp_path / 'none'}", run_dir=str(tmp_path / "run"))
    config = write_run_dir(cfg)
    log = tmp_path / "err"
    log.write_text("srun: error: n1: task 0: Exited with exit code 75\n"
                   "srun: error: Node failure on slurmllm-n2\n")
    argv = [sys.executable, "-m", "megatron_ext.job_end", str(config), "0", "--node-failure",
            "--srun-log", str(log), "--from", "0"]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0 and ("previous attempt: node slurmllm-n2 failed and Slurm requeued "
                                    "the job; no checkpoint was committed") in out.stderr, out.stderr
    argv[-1] = str(log.stat().st_size)  # nothing failed since
    assert "previous attempt" not in subprocess.run(argv, capture_output=True, text=True).stderr
