"""Checks on the login node before anything is queued: one line naming the field, exit 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from launch.schema import NO_RESTART
from megatron_ext.exits import caused_by_a_peer, refuse_restart, transient
from tests.conftest import REPO, run_launch


def _refused(tmp_path: Path, *overrides: str) -> list[str]:
    result = run_launch(*overrides, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "submitted job" not in result.stdout
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_zero_nodes_is_refused_before_the_planner_divides_by_it(tmp_path: Path) -> None:
    assert _refused(tmp_path, "cluster=pcs_p5", "cluster.nodes=0") == [
        "error: cluster.nodes=0 must be > 0"]


def test_a_blend_without_its_files_is_refused_before_it_is_submitted(tmp_path: Path) -> None:
    errors = _refused(tmp_path, "data=blend_example", "data.tokenizer=" + str(tmp_path))
    assert errors and all(e.startswith("error: data.sources[") and "does not exist" in e
                          for e in errors)
    assert any(".bin does not exist" in e for e in errors)
    assert not list(tmp_path.glob("runs/*/launches/*/config.yaml"))  # no run folder written


def test_what_the_nodes_run_must_exist_on_the_shared_filesystem(tmp_path: Path) -> None:
    errors = _refused(tmp_path, "cluster=pcs_p5", "data=synthetic",
                      f"cluster.shared_dir={tmp_path}", f"cluster.venv={tmp_path}/venv")
    assert f"error: cluster.venv={tmp_path}/venv has no bin/python here" in "\n".join(errors)
    assert (f"error: the repo checkout={REPO} is not under cluster.shared_dir={tmp_path}"
            in "\n".join(errors))
    image = _refused(tmp_path, "cluster=hyperpod_p5", "data=synthetic", "cluster.shared_dir=")
    assert any(e.startswith("error: cluster.container_image=/fsx/apps/slurm-llm.sqsh does "
                            "not exist") for e in image)


@pytest.mark.parametrize("err, restart", [
    (dist.DistBackendError("NCCL watchdog timeout"), True),
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                  "closed by peer [127.0.0.1]:13219"), True),
    (TimeoutError("store"), True),
    (RuntimeError("CUDA out of memory"), False),
    (ValueError("train.recompute"), False),
])
def test_only_failures_of_the_nodes_are_restarted(err: Exception, restart: bool) -> None:
    assert transient(err) is restart


@pytest.mark.parametrize("err, peer", [
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                  "closed by peer [127.0.0.1]:13219"), True),
    (dist.DistBackendError("NCCL error: remote process exited or there was a network error"),
     True),
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (dist.DistBackendError("NCCL watchdog timeout"), False),  # this rank may be the stuck one
    (RuntimeError("CUDA out of memory"), False),
])
def test_errors_that_only_say_a_peer_went_away(err: Exception, peer: bool) -> None:
    """They claim no failure alert: the peer that died, or the launcher, says why."""
    assert caused_by_a_peer(err) is peer


def test_the_first_reason_not_to_restart_is_kept(tmp_path: Path) -> None:
    refuse_restart(tmp_path, "loss nan at step 3")
    refuse_restart(tmp_path, "RuntimeError: a peer's later error")
    assert (tmp_path / NO_RESTART).read_text() == "loss nan at step 3\n"
