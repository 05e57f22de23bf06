"""Which network transport NCCL chose, from its own init output, and a stop where EFA was
expected and NCCL fell back to TCP sockets.

When NCCL cannot load the aws-ofi-nccl plugin (``libnccl-net.so`` not on ``LD_LIBRARY_PATH``:
a pip NCCL in a venv, an image without the plugin) it uses sockets with no error, and the job
runs at a fraction of its speed. NCCL names its choice at ``NCCL_DEBUG=INFO``: "Using network
Libfabric" (aws-ofi-nccl; "AWS Libfabric" in its older releases) against "Using network Socket".
Rank 0 alone logs NCCL's INIT and NET lines to a file of its own, reads it after the first
collective, logs the transport, and with ``cluster.require_efa`` stops on anything but EFA.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from launch.schema import RunConfig

log = logging.getLogger("megatron_ext.nccl_net")

_NETWORK = re.compile(r"NCCL INFO Using network (\S[^\n]*?)\s*$", re.MULTILINE)
_OFI_PROVIDER = re.compile(r"NET/OFI Selected [Pp]rovider is (\w+)")
_LIBFABRIC = "Libfabric"
"""In the name aws-ofi-nccl registers its network under ("AWS Libfabric", later "Libfabric")."""


class NotOnEfa(RuntimeError):
    """NCCL chose another transport where ``cluster.require_efa`` expects EFA; a rerun from the
    same image or venv chooses the same, so the job stops instead of restarting."""


def network(nccl_log: str) -> Optional[str]:
    """The transport NCCL's init output names: e.g. "Libfabric (efa)", "Socket"; None when the
    output says nothing (no communicator created yet, or NCCL_DEBUG below INFO)."""
    found = _NETWORK.findall(nccl_log)
    if not found:
        return None
    provider = _OFI_PROVIDER.search(nccl_log)
    return f"{found[0]} ({provider.group(1)})" if provider else found[0]


def on_efa(transport: str) -> bool:
    """aws-ofi-nccl over libfabric's EFA provider (not its tcp or shm provider)."""
    return _LIBFABRIC in transport and ("(" not in transport or transport.endswith("(efa)"))


def debug_env(environ: Mapping[str, str], log_file: Path) -> dict[str, str]:
    """What rank 0 sets before NCCL starts so that its init lines land in ``log_file``; a
    user's own INFO/TRACE level, subsystems and NCCL_DEBUG_FILE are kept."""
    out: dict[str, str] = {}
    if environ.get("NCCL_DEBUG", "").upper() in ("", "VERSION", "WARN"):
        out["NCCL_DEBUG"] = "INFO"
        if "NCCL_DEBUG_SUBSYS" not in environ:
            out["NCCL_DEBUG_SUBSYS"] = "INIT,NET"  # "Using network" is an INIT line
    if "NCCL_DEBUG_FILE" not in environ:
        out["NCCL_DEBUG_FILE"] = str(log_file)
    return out


def log_file(cfg: RunConfig) -> Path:
    """Rank 0's NCCL log of this process (one per attempt: the pid differs)."""
    return Path(cfg.run_dir) / f"nccl-rank0.{os.getpid()}.log"


def prepare(cfg: RunConfig, rank: int) -> None:
    """Before the first NCCL communicator: rank 0 logs NCCL's INIT/NET lines to its file."""
    if rank == 0:
        os.environ.update(debug_env(os.environ, log_file(cfg)))


def confirm(cfg: RunConfig, rank: int) -> None:
    """Every rank: one barrier (NCCL creates its communicator and picks its network); rank 0
    then reads which, logs it, and raises ``NotOnEfa`` where ``cluster.require_efa`` is unmet."""
    dist.barrier(device_ids=[torch.cuda.current_device()])
    if rank != 0:
        return
    # NCCL fills in %h (host name up to its first dot) and %p (pid) in NCCL_DEBUG_FILE
    path = Path(os.environ.get("NCCL_DEBUG_FILE", str(log_file(cfg))).replace(
        "%h", socket.gethostname().split(".")[0]).replace("%p", str(os.getpid())))
    transport = network(path.read_text(errors="replace")) if path.is_file() else None
    check(transport, cfg.cluster.require_efa, path)


def check(transport: Optional[str], require_efa: bool, path: Path) -> None:
    if transport is None:
        log.warning("NCCL's network transport is unknown: no 'Using network' line in %s", path)
    elif on_efa(transport):
        log.info("NCCL network transport: %s", transport)
    elif require_efa:
        raise NotOnEfa(f"NCCL uses {transport}, not EFA (cluster.require_efa=true): the "
                       "aws-ofi-nccl plugin was not loaded; check LD_LIBRARY_PATH for "
                       "/opt/amazon/ofi-nccl/lib and /opt/amazon/efa/lib (slurm/env/efa.sh) and "
                       f"the NET/Plugin lines in {path}")
    else:
        log.warning("NCCL network transport: %s (not EFA)", transport)
