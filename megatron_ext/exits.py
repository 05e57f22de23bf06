"""How a failed rank ends: restart (a retry may cure it) or stop for good (it would repeat).

A rerun resumes from the same checkpoint with the same data order (data.py), so a NaN, a corrupt
checkpoint, a config a rank rejects or an out-of-memory at step k happen again at step k: the
rank records why in ``run_dir/NO_RESTART`` and the batch script does not requeue. A hang, a dead
peer or a collective timeout depend on the nodes, not the run: the rank exits
``EXIT_TRANSIENT`` and the batch script requeues, up to ``cluster.max_restarts`` times.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from launch.schema import NO_RESTART

_TRANSIENT = (dist.DistError, TimeoutError, ConnectionError)
"""torch.distributed's backend, network and store errors (NCCL's failures, a collective timed
out), and the OS's own timeouts and broken connections."""
_GLOO_TRANSPORT = "/gloo/transport/"
"""Where gloo's peer errors come from; it raises them as plain RuntimeError (seen here: "[...
gloo/transport/tcp/pair.cc:553] Connection closed by peer", a rank on the other end died)."""


def transient(err: BaseException) -> bool:
    """A failure of the nodes or the network rather than of the run itself."""
    return isinstance(err, _TRANSIENT) or (isinstance(err, RuntimeError)
                                           and _GLOO_TRANSPORT in str(err))


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")
"""What a rank's error says when the rank on the other end of a connection went away: gloo's
transport errors (seen here, after a peer's SIGKILL) and NCCL's ncclRemoteError."""


def caused_by_a_peer(err: BaseException) -> bool:
    """The error only says that another rank went away; that rank, or the launcher that saw how
    it ended (``megatron_ext.job_end``: "killed by SIGKILL"), says why."""
    return (isinstance(err, (dist.DistNetworkError, ConnectionResetError, BrokenPipeError))
            or any(text in str(err) for text in _PEER_GONE))


def refuse_restart(run_dir: str | Path, reason: str) -> None:
    """Tell the batch script that a rerun would fail the same way (first reason wins)."""
    path = Path(run_dir) / NO_RESTART
    if not path.exists():
        path.write_text(reason + "\n")
