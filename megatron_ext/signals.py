"""Stop cleanly on Slurm's signals: a flag the training loop polls, agreed by every rank.

Slurm sends ``cluster.signal`` (``--signal=USR1@120``) to every rank shortly before the time
limit, and SIGTERM when it ends the job (preemption, ``scontrol requeue``, node failure,
scancel), KillWait seconds before SIGKILL. The handler only sets a flag; at a step boundary the
loop asks ``requested()``, which all-reduces the flag so every rank stops at the same step
(a rank saving while another runs a step would deadlock), saves, and exits with ``exit_code``:

- 0 after the pre-timeout signal, with rank 0 having created ``launch.schema.REQUEUE_REQUEST``
  in the run folder: the sbatch script, on the host where ``scontrol`` exists even when ranks
  run in a container, then runs ``scontrol requeue`` (``wants_requeue``);
- 128 + SIGTERM after SIGTERM: Slurm is already ending the job and requeues it itself when the
  job has ``--requeue`` and the cause is preemption or a node failure (not scancel).
"""
from __future__ import annotations

import signal
import time
from typing import Any

import torch
import torch.distributed as dist

_TIMEOUT, _TERMINATE = 1, 2  # ordered: when both arrive, Slurm's own ending wins


class StopSignals:
    """Installed once per rank before the loop; ``requested()`` is a collective call."""

    def __init__(self, cluster_signal: str = "USR1@120") -> None:
        name, _, lead = cluster_signal.partition("@")
        self.timeout_signal = signal.Signals["SIG" + name]
        self._lead_s = float(lead)  # the signal comes this long before the time limit
        self._received_at: float | None = None
        self._received = 0
        self._agreed = 0
        signal.signal(self.timeout_signal, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        kind = _TERMINATE if signum == signal.SIGTERM else _TIMEOUT
        self._received = max(self._received, kind)
        if self._received_at is None:
            self._received_at = time.monotonic()

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank once any rank got a signal (one scalar all-reduce per call)."""
        flag = torch.tensor([self._received], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._agreed = int(flag.item())
        return self._agreed > 0

    @property
    def wants_requeue(self) -> bool:
        """The pre-timeout signal (not Slurm's own SIGTERM) stopped the run."""
        return self._agreed == _TIMEOUT

    @property
    def exit_code(self) -> int:
        return 0 if self.wants_requeue else 128 + signal.SIGTERM

    def seconds_left(self, *, margin_s: float = 30.0) -> float:
        """After this rank got the pre-timeout signal: seconds to the time limit, less
        ``margin_s`` for the batch script to requeue; 0 otherwise (after SIGTERM Slurm kills
        the job KillWait seconds later, and requeues it itself)."""
        if not self.wants_requeue or self._received_at is None:
            return 0.0
        return max(0.0, self._lead_s - (time.monotonic() - self._received_at) - margin_s)
