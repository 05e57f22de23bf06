"""Two Slurm nodes on this host (slurm/local: one slurmd per node): a job across both, and a
node that dies under it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.test_slurm import launch, metrics, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = ("slurmllm-n1", "slurmllm-n2")  # slurm/local/slurm.conf.in
TRAIN = ("train.steps=6", "train.warmup_steps=1", "train.log_interval=1",
         "train.reproducible_init=true", "checkpoint.save_interval=0")


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
