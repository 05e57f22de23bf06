"""The health check inside HyperPod's auto-resumed training step: the first rank of each node
runs slurm/healthcheck.sh (for real, with fake nvidia-smi/dmesg/fi_info/scontrol on PATH, the
things that cannot exist here) and a failure alerts once and fails the step."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.prepare import write_run_dir
from launch.schema import EXIT_TRANSIENT, NO_RESTART
from megatron_ext import alerts, node_check
from tests.conftest import REPO, make_config
from tests.slack_receiver import Receiver
from tests.unit.test_healthcheck import HEALTHY_SMI, _fi_info, _tool


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GPU node's tools first on PATH: 2 healthy 80 GB GPUs, a clean kernel log, 32 EFA."""
    for name, out in (("nvidia-smi", HEALTHY_SMI), ("dmesg", ""), ("fi_info", _fi_info(32))):
        _tool(tmp_path, name, out)
    # Slurm refuses a user who is not an operator (the ranks run as the job's user)
    _tool(tmp_path, "scontrol", "slurm_update error: Access/permission denied\n", rc=1)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("SLURMD_NODENAME", "p5-node-7")
    return tmp_path


def _hyperpod(*overrides: str):
    return make_config("cluster=hyperpod_p5", "cluster.gpus_per_node=2", *overrides).cluster


def test_only_the_first_rank_of_a_node_checks_and_only_under_auto_resume() -> None:
    assert node_check.in_step(_hyperpod(), local_rank=0)
    assert not node_check.in_step(_hyperpod(), local_rank=1)
    assert not node_check.in_step(_hyperpod("cluster.healthcheck=false"), local_rank=0)
    pcs = make_config("cluster=pcs_p5").cluster  # checked in a step of its own there
    assert not node_check.in_step(pcs, local_rank=0)


def test_a_node_short_of_efa_devices_fails_the_step_with_one_alert(
        node: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert node_check.run(_hyperpod()) is None  # healthy
    _tool(node, "fi_info", _fi_info(31))
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.URL_ENV, receiver.url)
        cfg = make_config("cluster=hyperpod_p5", "cluster.gpus_per_node=2",
                          "logging.slack.enabled=true", run_dir=str(tmp_path / "run"))
        sender = alerts.Alerts.from_config(cfg, rank=8)
        assert node_check.failed_in_step(cfg.cluster, local_rank=0, rank=8, alerts=sender)
        sender.close()
        assert len(receiver.posts) == 1
        post = receiver.posts[0]
        assert "healthcheck FAILED on p5-node-7: 31 EFA devices, expected 32" in post
        # refused, the failed step still hands the node to auto-resume
        assert ("could not mark p5-node-7 for replacement (slurm_update error: Access/permission "
                "denied); auto-resume retries the step on replaced nodes") in post
        assert not node_check.failed_in_step(cfg.cluster, local_rank=1, rank=9, alerts=sender)
    finally:
        receiver.close()


def test_where_scontrol_is_at_hand_the_node_is_marked_for_replacement(
        node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = node / "scontrol.calls"
    script = node / "scontrol"
    script.write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    script.chmod(0o755)
    assert node_check.ask_replacement() == "p5-node-7 marked for replacement (Action:Replace)"
    assert calls.read_text() == "update nodename=p5-node-7 state=fail reason=Action:Replace\n"
    script.write_text('#!/bin/bash\necho "slurm_update error: Access/permission denied" >&2\n'
                      "exit 1\n")
    assert node_check.ask_replacement() == (
        "could not mark p5-node-7 for replacement (slurm_update error: Access/permission denied)")
    monkeypatch.delenv("SLURMD_NODENAME")  # not a Slurm step (or scontrol absent, as in images)
    assert node_check.ask_replacement().startswith("not marked for replacement here")


def test_an_image_without_the_check_script_fails_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "slurm" / "healthcheck.sh"
    assert f"{missing} is missing" in node_check.run(_hyperpod(), script=missing)


@pytest.mark.slow  # imports torch and megatron-core: ~30 s on 2 busy cores
def test_a_rank_on_a_bad_node_exits_for_a_retry_before_it_builds_anything(
        node: Path, tmp_path: Path) -> None:
    """``python -m megatron_ext.train`` itself, as srun starts the first rank of a node (without
    the check it would wait in the rendezvous for a rank 1 that never comes)."""
    _tool(node, "nvidia-smi", "0, 81559, 0\n")  # one of the node's GPUs is gone
    cfg = make_config("cluster=hyperpod_p5", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1",
                      "train.recompute=none", run_dir=str(tmp_path / "run"))
    config = write_run_dir(cfg)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "megatron_ext.train", str(config)], env=env,
                          capture_output=True, text=True, timeout=150, cwd=REPO)
    assert done.returncode == EXIT_TRANSIENT, done.stdout + done.stderr
    assert "healthcheck FAILED on p5-node-7: 1 GPUs visible, expected 2" in done.stdout
    assert not (tmp_path / "run" / NO_RESTART).exists()  # another node may well do
