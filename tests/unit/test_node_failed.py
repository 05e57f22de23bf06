"""slurm/node_failed.sh run for real after a failed node health check (PCS and other Slurm
sites): the bad nodes are named, drained where the user may, and the job is requeued without
them. ``scontrol`` is a fake on PATH that records its arguments and answers as Slurm does
("slurm_update error: Access/permission denied" to a user who may not drain); the local Slurm
of tests/integration is kept for the Slurm tests."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from launch.run_folder import BAD_NODES, FAILURES
from tests.conftest import REPO

DENIED = "slurm_update error: Access/permission denied"


def _scontrol(bin_dir: Path, drain_denied: bool = False, excluded: str = "(null)") -> Path:
    calls = bin_dir / "scontrol.calls"
    script = bin_dir / "scontrol"
    script.write_text(f"""#!/bin/bash
echo "$*" >> {calls}
case "$*" in
  "show job"*) echo "   ReqNodeList=(null) ExcNodeList={excluded}" ;;
  *state=drain*) {f'echo "{DENIED}" >&2; exit 1' if drain_denied else 'exit 0'} ;;
esac
""")
    script.chmod(0o755)
    return calls


def _node_failed(tmp_path: Path, log: str, nodes: int = 3, max_restarts: int = 3,
                 **fake) -> tuple[subprocess.CompletedProcess, list[str], str]:
    """Run it as the batch script does, with an alert command that records the report it saw
    and that scontrol had not requeued the job yet."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = _scontrol(bin_dir, **fake)
    (tmp_path / "healthcheck.log").write_text(log)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "42"}
    alert = (f"cp {tmp_path / BAD_NODES} {tmp_path / 'alerted'}; "
             f"grep -q requeuehold {calls} 2>/dev/null && echo late > {tmp_path / 'alerted'}")
    done = subprocess.run(["bash", str(REPO / "slurm" / "node_failed.sh"),
                           str(tmp_path / "healthcheck.log"), str(nodes), str(tmp_path),
                           str(max_restarts), "1", "bash", "-c", alert], env=env,
                          capture_output=True, text=True)
    made = calls.read_text().splitlines() if calls.exists() else []
    report = (tmp_path / BAD_NODES).read_text()
    assert (tmp_path / "alerted").read_text() == report  # posted whole, before any requeue
    return done, made, report


LOG = ("healthcheck on n1: 8 GPUs ok\n"
       "healthcheck FAILED on n2: fatal GPU Xid 79 in the last 3600s: [ 12.5] NVRM: Xid "
       "(PCI:0000:53:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n"
       "srun: error: n2: task 1: Exited with exit code 1\n"
       "healthcheck on n3: 8 GPUs ok\n")


def test_a_bad_node_is_named_drained_and_excluded_on_requeue(tmp_path: Path) -> None:
    done, calls, report = _node_failed(tmp_path, LOG)
    assert done.returncode == 0, done.stderr
    assert "node n2 failed the health check: fatal GPU Xid 79" in report
    assert calls[0].startswith("update nodename=n2 state=drain reason=slurm-llm healthcheck: "
                               "fatal GPU Xid 79")
    # held while its excluded nodes change, so it cannot start on n2 again in between
    assert calls[1:] == ["show job 42", "requeuehold 42", "update jobid=42 ExcNodeList=n2",
                         "release 42"]
    assert "drained n2" in report and "excluding n2" in report
    assert (tmp_path / FAILURES).read_text().strip() == "1"


def test_a_user_who_may_not_drain_is_told_and_the_job_still_avoids_the_node(
        tmp_path: Path) -> None:
    done, calls, report = _node_failed(tmp_path, LOG, drain_denied=True, excluded="n7")
    assert done.returncode == 0, done.stderr
    assert f"could not drain n2 ({DENIED}): ask an administrator to drain it" in report
    assert "update jobid=42 ExcNodeList=n7,n2" in calls  # earlier exclusions are kept
    assert "excluding n7,n2" in report


def test_when_every_node_fails_nothing_is_drained_or_requeued(tmp_path: Path) -> None:
    log = "".join(f"healthcheck FAILED on n{i}: GPU 0 has 40960 MiB, expected >= 77824 MiB\n"
                  for i in (1, 2))
    done, calls, report = _node_failed(tmp_path, log, nodes=2)
    assert done.returncode == 0 and calls == []
    assert "node n1 failed" in report and "node n2 failed" in report
    assert "every node failed: check cluster.gpus_per_node, cluster.gpu_memory_gib" in report


def test_bad_nodes_count_against_max_restarts(tmp_path: Path) -> None:
    (tmp_path / FAILURES).write_text("1\n")
    done, calls, report = _node_failed(tmp_path, LOG, max_restarts=1)
    assert done.returncode == 0
    assert "failed 2 times, not requeued (cluster.max_restarts=1)" in report
    assert not [c for c in calls if c.startswith(("requeue", "release"))]
