"""Two Slurm nodes on this host (slurm/local: one slurmd per node): a job across both, and a
node that dies under it."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launch.resume import newest_committed
from tests.conftest import REPO
from tests.integration.test_slurm import job_info, launch, metrics, wait_for, wait_for_steps
from tests.slack_receiver import Receiver

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = ("slurmllm-n1", "slurmllm-n2")  # slurm/local/slurm.conf.in
TRAIN = ("train.steps=6", "train.warmup_steps=1", "train.log_interval=1",
         "train.reproducible_init=true", "checkpoint.save_interval=0")


def test_a_first_start_leaves_the_node_names_resolving(slurm: Path) -> None:
    """The ranks rendezvous on the first node's name. A first start (no cluster, or one of
    another slurm.conf) stops the old daemons, and stop.sh removes the names from /etc/hosts:
    start.sh mapped them before that, so on a fresh machine every job's rendezvous retried an
    unresolvable name for minutes."""
    env = {**os.environ, "SLURM_LOCAL_DIR": str(slurm)}
    subprocess.run(["bash", str(REPO / "slurm" / "local" / "stop.sh")], env=env, check=True,
                   capture_output=True, timeout=60)
    (slurm / "slurm.conf").unlink()  # as on a fresh machine: start.sh writes its conf anew
    started = subprocess.run(["bash", str(REPO / "slurm" / "local" / "start.sh")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    assert [socket.gethostbyname(node) for node in NODES] == ["127.0.0.1"] * len(NODES)


def test_two_nodes_train_the_same_losses_as_one(slurm: Path, workdir: Path) -> None:
    """One rank per node, DP=2: rendezvous on the first node's name, the health check on each
    node, and exactly the losses of the same layout on one node."""
    two_id, two_dir = launch(workdir, "name=slurm-2nodes", "cluster.nodes=2",
                             "cluster.gpus_per_node=1", *TRAIN)
    one_id, one_dir = launch(workdir, "name=slurm-1node", *TRAIN)
    for job_id, run_dir in ((two_id, two_dir), (one_id, one_dir)):
        info = wait_for(job_id, timeout=300)
        log = (run_dir / "logs" / job_id / f"{job_id}_0_log.out").read_text()
        assert info["JobState"] == "COMPLETED", log[-3000:]
    out = (two_dir / "logs" / two_id / f"{two_id}_0_log.out").read_text()
    assert f"job {two_id} on slurmllm-n[1-2]," in out
    assert {f"healthcheck on {node}" for node in NODES} <= set(
        re.findall(r"healthcheck on \S+(?=:)", out)), out[-3000:]
    assert "DP=2" in out
    # one task per node (--ntasks-per-node=1); rank 0 logs how it joined: the first node's name
    rank0 = (two_dir / "logs" / two_id / f"{two_id}_0_log.err").read_text() + out
    assert f"rank 0 of 2 (local rank 0) on node {NODES[0]} joined through {NODES[0]}:" in rank0
    two, one = metrics(two_dir), metrics(one_dir)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    assert [r["loss"] for r in two] == [r["loss"] for r in one]


def _rank_on(run_dir: Path, node: str) -> psutil.Process:
    for pid in subprocess.run(["pgrep", "-f", f"^[^ ]*python[^ ]* -m megatron_ext.train {run_dir}/"],
                              capture_output=True, text=True).stdout.split():
        rank = psutil.Process(int(pid))
        if rank.environ().get("SLURMD_NODENAME") == node:
            return rank
    raise AssertionError(f"no rank of {run_dir} on {node}")


def _kill_node(slurm: Path, run_dir: Path, node: str) -> None:
    """What a node failure is here: its slurmd, its job step's slurmstepd and ranks die."""
    rank = _rank_on(run_dir, node)
    stepd = rank.parent()
    assert "slurmstepd" in stepd.name(), stepd
    os.kill(int((slurm / f"slurmd-{node}.pid").read_text()), signal.SIGKILL)
    stepd.kill()
    os.killpg(rank.pid, signal.SIGKILL)


def test_a_node_that_dies_ends_the_attempt_and_the_rerun_resumes(slurm: Path, workdir: Path
                                                                 ) -> None:
    receiver = Receiver()
    steps = 60
    try:
        job_id, run_dir = launch(workdir, "name=slurm-nodefail", "cluster.nodes=2",
                                 "cluster.gpus_per_node=1", f"train.steps={steps}",
                                 "train.warmup_steps=1", "checkpoint.save_interval=4",
                                 "resilience.collective_timeout_s=600",  # not what ends it
                                 "logging.slack.enabled=true",
                                 env={"SLACK_WEBHOOK_URL": receiver.url})
        wait_for_steps(job_id, run_dir, 10)
        _kill_node(slurm, run_dir, NODES[1])
        killed = time.monotonic()
        committed = newest_committed(workdir / "runs" / "slurm-nodefail" / "checkpoints")
        while job_info(job_id)["JobState"] == "RUNNING":
            assert time.monotonic() - killed < 120, job_info(job_id)
            time.sleep(1)
        ended_s = time.monotonic() - killed
        subprocess.run(["slurmd", "-f", str(slurm / "slurm.conf"), "-N", NODES[1]], check=True)
        info = wait_for(job_id, timeout=400)
    finally:
        receiver.close()
        subprocess.run(["bash", str(REPO / "slurm" / "local" / "start.sh")], check=False,
                       env={**os.environ, "SLURM_LOCAL_DIR": str(slurm)}, capture_output=True)
    err = (run_dir / "logs" / job_id / f"{job_id}_0_log.err").read_text()
    out = (run_dir / "logs" / job_id / f"{job_id}_0_log.out").read_text()
    # one fault, one restart: slurmctld's retried kill of the dead attempt's step (same job and
    # step id) would end the rerun's step too, again and again (slurm/settle.sh)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, err[-3000:])
    assert "cluster.max_restarts" not in err, err[-3000:]  # no failed attempt was counted
    # the attempt ends once Slurm finds the node unresponsive (SlurmdTimeout=20), not after a
    # collective timeout (600 s here); the requeued attempt says which node failed
    assert ended_s < 60, info
    assert "previous attempt: node slurmllm-n2 failed and Slurm requeued the job" in err, err[-3000:]
    assert any(f"node {NODES[1]} failed" in post for post in receiver.posts), receiver.posts
    # the rerun starts from the last checkpoint committed before the node died; the steps it
    # repeats replace the lost ones in metrics.jsonl: every step exactly once
    resumed = [int(n) for n in re.findall(r"on 2 ranks \(CPU, gloo\) from step (\d+)", out)]
    assert committed is not None and resumed[:2] == [0, int(committed.name[5:])], out[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, steps + 1))
