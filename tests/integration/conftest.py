from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch.config import compose, to_run_config, to_yaml
from tests.conftest import REPO
from tests.unit.megatron_forward import free_port


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One working directory for the session's runs, so the demo data is built once."""
    return tmp_path_factory.mktemp("work")


def torchrun_argv(*entry: str) -> list[str]:
    """Two local ranks under torchrun (``entry``: ``-m module`` or a script, then its args)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            f"--master-port={free_port()}", *entry]


def rank_config(run_dir: Path, *overrides: str) -> Path:
    """A run folder's ``config.yaml`` written straight from the overrides, for starting the ranks
    by hand (``torchrun_argv("-m", "megatron_ext.train", ...)``) without the launcher's checks."""
    run_dir.mkdir(parents=True)
    path = run_dir / "config.yaml"
    path.write_text(to_yaml(to_run_config(compose(list(overrides), run_dir=str(run_dir)))))
    return path


def read_metrics(workdir: Path, name: str) -> list[dict]:
    """Per-step metrics of every launch of run ``name``, in step order."""
    rows = []
    for path in sorted((workdir / "runs" / name / "launches").glob("*/metrics.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["step"])


SLURM_DIR = Path("/tmp/slurm-llm-local")
SLURM_CPU = ["cluster=slurm", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1",
             "cluster.exclusive=false", "cluster.gpus_per_node_directive=false", "data=synthetic"]
"""The generic Slurm profile shrunk to the local test cluster: one node, 2 CPU ranks."""


@pytest.fixture(scope="session")
def slurm() -> Path:
    """A real one-host Slurm (slurm/local/start.sh); skipped only where it cannot run here."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root (munged, slurmctld, slurmd); CI runs as root")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(SLURM_DIR)}
    result = subprocess.run(["bash", str(REPO / "slurm" / "local" / "start.sh")], env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode == 77:
        pytest.skip(f"cannot start a local Slurm here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")  # sbatch, squeue, scontrol find it
    _cancel_leftover_jobs()
    return SLURM_DIR


@pytest.fixture(autouse=True)
def _slurm_jobs_end_with_their_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that fails while its job runs left the job holding a node, and every later
    Slurm test then waited in the queue until its own deadline: one failure became many."""
    yield
    if "slurm" in request.fixturenames:
        _cancel_leftover_jobs()


def _cancel_leftover_jobs(timeout: float = 60) -> None:
    """A job left by an aborted earlier session would hold the one node and starve these tests."""
    def queued() -> list[str]:
        return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                              check=True).stdout.split()

    if queued():
        subprocess.run(["scancel", "--full", *queued()], check=False)
    deadline = time.monotonic() + timeout
    while queued():
        assert time.monotonic() < deadline, f"leftover Slurm jobs would not end: {queued()}"
        time.sleep(0.5)
