"""The node health check inside the training step, for HyperPod's ``srun --auto-resume=1``.

HyperPod replaces failed nodes and retries the *step* that failed; a health check in a step of
its own ends the job when it fails, with no replacement (AWS's HyperPod auto-resume
documentation). So there the first rank of each node (local rank 0) runs slurm/healthcheck.sh
before any rank joins the rendezvous, and a failure fails the training step. The script is
the one beside this package: inside the container image that is the image's own version, the
same as the code the ranks run.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from launch.cluster_schema import ClusterConfig
from megatron_ext import alerts as alert_kinds

log = logging.getLogger("megatron_ext.node_check")

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "healthcheck.sh"
REPLACE_REASON = "Action:Replace"
"""The reason that asks HyperPod to replace a Slurm node (AWS: "Manually replace or reboot a
node using Slurm": ``scontrol update node=<node> state=fail reason="Action:Replace"``)."""


def in_step(cluster: ClusterConfig, local_rank: int) -> bool:
    """Whether this rank runs the check: the first of its node, under auto-resume only (other
    clusters run it in a step of its own from the batch script)."""
    return cluster.healthcheck and cluster.auto_resume and local_rank == 0


def run(cluster: ClusterConfig, script: Path = SCRIPT, timeout_s: float = 300.0
        ) -> Optional[str]:
    """None on a healthy node, else the script's failure line ("healthcheck FAILED on ...")."""
    if not script.is_file():
        return (f"healthcheck FAILED: {script} is missing: the image or venv lacks this "
                "package's slurm/ folder (see slurm/container/Dockerfile)")
    try:
        done = subprocess.run(["bash", str(script), *cluster.healthcheck_args()],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"healthcheck FAILED: no answer in {timeout_s:.0f} s (nvidia-smi hung?)"
    for line in (done.stdout + done.stderr).splitlines():
        log.warning("%s", line) if "WARNING" in line else log.info("%s", line)
    if done.returncode == 0:
        return None
    failed = [line for line in done.stderr.splitlines() if "healthcheck FAILED" in line]
    return failed[0] if failed else f"healthcheck FAILED (exit {done.returncode})"


def ask_replacement() -> str:
    """Mark this node for HyperPod's replacement where ``scontrol`` is at hand and permitted
    (on the host as root; a container usually has no scontrol). Either way the failed step
    hands the node to auto-resume, whose own health checks decide on a replacement."""
    node = os.environ.get("SLURMD_NODENAME")
    if not node or not shutil.which("scontrol"):
        return "not marked for replacement here (no scontrol or SLURMD_NODENAME in this step)"
    done = subprocess.run(["scontrol", "update", f"nodename={node}", "state=fail",
                           f"reason={REPLACE_REASON}"], capture_output=True, text=True)
    if done.returncode == 0:
        return f"{node} marked for replacement ({REPLACE_REASON})"
    why = (done.stderr or done.stdout).strip().splitlines()
    return f"could not mark {node} for replacement ({why[0] if why else done.returncode})"


def failed_in_step(cluster: ClusterConfig, local_rank: int, rank: int,
                   alerts: "alert_kinds.Alerts | alert_kinds.NullAlerts") -> bool:
    """Run the check where this rank should (``in_step``); a failure is logged and alerted
    (the job's one failure alert of the attempt), and the rank then exits for a retry."""
    if not in_step(cluster, local_rank):
        return False
    failed = run(cluster)
    if failed is None:
        return False
    what = f"{failed}; {ask_replacement()}; auto-resume retries the step on replaced nodes"
    log.error("%s", what)
    alerts.send_now(alert_kinds.FAILURE, what, rank=rank)
    return True
