"""The ``cluster`` section of the run configuration: where the job runs and how Slurm gets it.

Split from launch/schema.py (which re-exports ``ClusterConfig``) because it is the largest
section; stdlib only, like the schema.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from launch.problems import choice_problem, positive_problem

CLUSTER_KINDS = ("local", "slurm")
INTERCONNECTS = ("none", "efa")
SIGNAL_SPEC = re.compile(r"(USR1|USR2|TERM|INT|HUP|URG)@[0-9]{1,5}")
"""Signals a rank can catch without side effects, and seconds before the time limit."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|WEBHOOK", re.IGNORECASE)
GPU_TYPES = ("H100", "H200", "A100", "B200")
"""GPU models the planner and the MFU metric know the peak of (launch/planning/flops.py)."""


def gpus_visible_here() -> bool:
    """Whether processes started here see an NVIDIA GPU, without importing torch: the driver
    lists each GPU under /proc/driver/nvidia/gpus; ``CUDA_VISIBLE_DEVICES=''`` (or -1) hides
    them from CUDA."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    listed = Path("/proc/driver/nvidia/gpus")
    return listed.is_dir() and any(listed.iterdir())


@dataclass
class ClusterConfig:
    """Where the job runs: the local machine (default) or a Slurm cluster profile.

    The Slurm fields are rendered into the sbatch script by launch/sbatch.py; every string
    reaching it is shell-quoted, and those that become ``#SBATCH`` lines must be one line.
    """

    name: str = "local"
    kind: str = "local"
    nodes: int = 1
    gpus_per_node: int = 2
    """Ranks per node: GPUs on a GPU node, CPU processes on the local cluster."""
    gpu: str = "H100"
    """GPU model: its dense bf16 peak is the MFU denominator and the planner's compute rate."""
    gpu_memory_gib: float = 80.0
    """Memory per GPU; the planner budgets with it and the health check expects it."""
    cpus_per_task: int = 1
    """CPUs of each rank (``--cpus-per-task``); 0 on Slurm: the CPUs Slurm registered for the
    partition's smallest node, split between its ranks, asked at submit (``sinfo``). A fixed
    count that is a p5's whole vCPU count is refused where hyper-threading is off or cores are
    reserved."""
    debug: bool = False
    """Local only: run a single rank in the foreground (submitit DebugExecutor); world size 1."""
    timeout_min: int = 60
    """Wall-clock limit (``--time``); the pre-timeout signal arrives before it."""
    partition: str = ""
    """Slurm partition (a PCS queue, a HyperPod instance group's partition); empty: the default."""
    account: str = ""
    """``--account`` to charge; empty: the user's default."""
    qos: str = ""
    """``--qos``; empty: the association's default."""
    exclusive: bool = False
    """Whole nodes (``--exclusive``): GPU training never shares a node."""
    gpus_per_node_directive: bool = False
    """Request GPUs with ``--gpus-per-node``. PCS registers GPUs as GRES, so it works there;
    HyperPod registers them only with accounting on, so its profiles rely on ``--exclusive``."""
    container_image: str = ""
    """pyxis/enroot image for the ranks (``srun --container-image``), e.g. a squashfs on FSx;
    empty: ranks run on the host with ``venv``'s (or the launching) Python."""
    container_mounts: str = ""
    """``srun --container-mounts`` (``src:dst[,src:dst]``), e.g. the shared filesystem."""
    venv: str = ""
    """Virtual environment on shared storage whose ``bin/python`` runs the ranks; empty: the
    launching interpreter, or ``python`` inside ``container_image``."""
    shared_dir: str = ""
    """Filesystem every node mounts (FSx for Lustre): run folder, data and checkpoints must live
    under it; empty: not checked."""
    interconnect: str = "none"
    """Network environment sourced on each node from ``slurm/env/<interconnect>.sh`` (efa: EFA
    and NCCL settings); none: nothing."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the ranks, written into the sbatch: never secrets (those come from
    the submitter's environment, which Slurm propagates)."""
    auto_resume: bool = False
    """HyperPod only: ``srun --auto-resume=1`` re-runs the training step on a replaced node."""
    requeue: bool = True
    """``--requeue``: preemption or node failure puts the job back in the queue, and a rank
    that saved on the pre-timeout signal asks for a requeue; the rerun resumes."""
    signal: str = "USR1@120"
    """``--signal``: SIGNAL@SECONDS before the time limit, the ranks save and exit to be requeued.
    A backstop (for a time limit the ranks could not read, or a preemption that sends it): the
    ranks watch the limit themselves (megatron_ext/deadline.py). The lead given is a floor; the
    launcher raises it to two predicted steps plus a save plus a minute."""
    step_time_s: float = 0.0
    """Seconds per step the ranks assume until they have measured one, and the signal's lead is
    derived from; 0: the planner's prediction for ``gpu`` (filled in at submit, kind=slurm)."""
    save_time_s: float = 0.0
    """Seconds a checkpoint save takes (blocking part plus write) until one is measured; 0:
    predicted at submit from the checkpoint's size per node and ``storage_write_gbs``."""
    storage_write_gbs: float = 1.0
    """GB/s one node writes checkpoints at, for the save-time prediction only. An assumption, not
    a measurement: FSx for Lustre gives 125-1000 MB/s per TiB stored, shared by every client;
    set it for your file system."""
    time_limit_margin_s: float = 60.0
    """Seconds kept free at the end of the allocation after the stop save: the batch script's
    requeue, and Slurm checking time limits only every 30 s."""
    max_restarts: int = 3
    """Requeues after failures a retry may cure (a hang, a dead node, a collective timeout) before
    the job is given up, with an alert; a deterministic failure (NaN stop, a corrupt checkpoint
    with ``checkpoint.on_corrupt=error``, a rejected config, out of memory) is never requeued.
    Requeues for the time limit do not count."""
    node_hour_price: float = 0.0
    """What one node costs per hour, in your currency, for ``tools.schedule``'s cost column; 0:
    not known (no cost printed). No built-in prices: on-demand, reserved and capacity-block
    rates differ by region and contract."""
    node_mtbf_hours: float = 6300.0
    """Mean hours between job-interrupting failures of one node, for ``tools.schedule``. Default
    from Llama 3's pre-training (Meta, "The Llama 3 Herd of Models", 2024, sec. 3.3.4): 419
    unexpected interruptions in 54 days on 16,384 H100s (2,048 nodes): 54 x 24 x 2,048 / 419."""
    restart_time_s: float = 900.0
    """Seconds from a failure to training again (detection by the collective timeout, requeue,
    node replacement, startup, checkpoint load), for ``tools.schedule``. An assumption (about 15
    min): measure a requeue on your cluster and set it."""
    healthcheck: bool = True
    """Run slurm/healthcheck.sh on every node before training (a no-op without nvidia-smi):
    under ``auto_resume`` in the training step's first rank of each node, so that HyperPod
    replaces a bad node; elsewhere in a step of its own, bad nodes drained and excluded."""
    efa_devices: int = 0
    """EFA devices each node must show (``fi_info -p efa``) for the health check; 0: not
    checked. Per instance type, as AWS's EC2 specifications list them: p4d/p4de.24xlarge 4,
    p5/p5e.48xlarge 32, p5en.48xlarge 16 (EFAv3, 200 Gbps each)."""
    require_efa: bool = False
    """Stop the job, with one alert, when NCCL chose a transport other than aws-ofi-nccl's
    (sockets run a multi-node job at a fraction of its speed); on for the AWS profiles."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def healthcheck_args(self) -> list[str]:
        """slurm/healthcheck.sh's arguments, the same wherever it runs (its own step, or the
        first rank of each node under auto-resume): GPUs, GiB per GPU, EFA devices."""
        return [str(self.gpus_per_node), f"{self.gpu_memory_gib:g}", str(self.efa_devices)]

    @property
    def cpu_ranks(self) -> bool:
        """A local job's ranks run on this machine, on CPU when it shows no GPU (what their
        ``torch.cuda.is_available()`` finds); Slurm profiles are taken to be GPU nodes."""
        return self.kind == "local" and not gpus_visible_here()

    def problems(self) -> list[str]:
        out = choice_problem("cluster.kind", self.kind, CLUSTER_KINDS)
        out += choice_problem("cluster.interconnect", self.interconnect, INTERCONNECTS)
        out += choice_problem("cluster.gpu", self.gpu, GPU_TYPES)
        for name in ("nodes", "gpus_per_node", "timeout_min"):
            out += positive_problem(f"cluster.{name}", getattr(self, name))
        if self.cpus_per_task < 0 or (self.kind == "local" and self.cpus_per_task == 0):
            out.append(f"cluster.cpus_per_task={self.cpus_per_task} must be > 0 (or 0 on Slurm: "
                       "what Slurm registered for the partition's nodes)")
        out += positive_problem("cluster.gpu_memory_gib", self.gpu_memory_gib)
        out += positive_problem("cluster.storage_write_gbs", self.storage_write_gbs)
        out += positive_problem("cluster.node_mtbf_hours", self.node_mtbf_hours)
        out += [f"cluster.{name}={getattr(self, name)} must be >= 0"
                for name in ("step_time_s", "save_time_s", "time_limit_margin_s", "max_restarts",
                             "node_hour_price", "restart_time_s", "efa_devices")
                if getattr(self, name) < 0]
        if (self.efa_devices or self.require_efa) and self.interconnect != "efa":
            out.append(f"cluster.efa_devices={self.efa_devices} and cluster.require_efa="
                       f"{self.require_efa} need cluster.interconnect=efa (it is "
                       f"{self.interconnect}); use 0 and false without EFA")
        if self.debug and (self.kind != "local" or self.world_size != 1):
            out.append("cluster.debug=true runs one rank in the foreground: it needs "
                       "cluster.kind=local and cluster.gpus_per_node=1")
        if self.kind == "local" and self.nodes != 1:
            out.append(f"cluster.nodes={self.nodes} is not possible with cluster.kind=local; "
                       "use 1, or a Slurm profile such as cluster=slurm")
        for name in ("name", "partition", "account", "qos", "container_image",
                     "container_mounts", "venv", "shared_dir"):
            if any(ch in getattr(self, name) for ch in "\n\r\0"):
                out.append(f"cluster.{name}={getattr(self, name)!r} must be a single line")
        if not SIGNAL_SPEC.fullmatch(self.signal):
            out.append(f"cluster.signal={self.signal!r} must be SIGNAL@SECONDS, e.g. USR1@120")
        for key in self.env:
            if not ENV_NAME.fullmatch(key):
                out.append(f"cluster.env: {key!r} is not a valid environment variable name")
            elif SECRET_NAME.search(key):
                out.append(f"cluster.env.{key} looks like a secret; secrets are never written "
                           "into the job script: export it where you run sbatch instead")
        return out
