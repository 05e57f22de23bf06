"""Where this process sits in the job: the one place that reads the launcher's environment.

Slurm, submitit's local executor and torchrun each describe a rank differently;
``RunEnv.from_env()`` turns any of them into the same small record.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("megatron_ext.env")

# Ports submitit also draws from when it derives a port from the job id.
_PORT_RANGE = (20000, 60000)


@dataclass(frozen=True)
class RunEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    job_id: str
    hostname: str
    slurm_job: Optional[str] = None
    """``<array job>_<task>`` for an array task, else the job id; None off Slurm. It survives a
    requeue, so whatever is keyed by it (the W&B run) continues."""
    slurm_array_job: Optional[str] = None
    """The array's job id: the tasks of one array are one sweep."""
    node: str = ""
    """The Slurm node this rank runs on (``SLURMD_NODENAME``; several may share a host), else
    the hostname."""

    @classmethod
    def from_env(cls) -> "RunEnv":
        hostname = socket.gethostname()
        slurm = {**slurm_ids(os.environ), "node": os.environ.get("SLURMD_NODENAME", hostname)}
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun or a pre-exported env
            return cls(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                       master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(os.environ.get("MASTER_PORT", 29500)),
                       job_id=os.environ.get("SLURM_JOB_ID", "local"), hostname=hostname,
                       **slurm)
        import submitit  # reads SLURM_* or SUBMITIT_LOCAL_* for us

        job = submitit.JobEnvironment()
        port = os.environ.get("MASTER_PORT")
        return cls(rank=job.global_rank, world_size=job.num_tasks, local_rank=job.local_rank,
                   master_addr=job.hostnames[0],
                   master_port=int(port) if port else random.Random(job.job_id).randint(*_PORT_RANGE),
                   job_id=str(job.job_id), hostname=hostname, **slurm)

    def export(self) -> None:
        """torch.distributed's env:// rendezvous reads these."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK=str(self.local_rank), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))


def slurm_ids(environ: Mapping[str, str]) -> dict[str, Optional[str]]:
    """``slurm_job`` and ``slurm_array_job`` from Slurm's variables (both None off Slurm)."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_array_job": array}


def job_end_time(environ: Mapping[str, str] = os.environ) -> Optional[float]:
    """When this allocation ends (Unix seconds), or None: not on Slurm, or no limit known.

    ``SLURM_JOB_END_TIME`` where Slurm (23.02+) or a test sets it; Slurm 22.05 sets none, so
    the job's record is asked (``squeue -o %e``: local time, ISO 8601). One call per rank 0 and
    job attempt: a requeued job has a new end time.
    """
    if environ.get("SLURM_JOB_END_TIME"):
        return float(environ["SLURM_JOB_END_TIME"])
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip()
        return datetime.datetime.fromisoformat(out).timestamp()
    except (OSError, subprocess.SubprocessError, ValueError) as err:  # N/A, Unknown, no squeue
        log.warning("time limit unknown (squeue -j %s: %s); only the signal will stop the job",
                    job, err)
        return None
