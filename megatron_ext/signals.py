"""Stop cleanly on Slurm's signals: a flag the training loop polls, agreed by every rank.

Slurm sends ``cluster.signal`` (``--signal=USR1@120``) to every rank shortly before the time
limit, and SIGTERM when it ends the job (preemption, ``scontrol requeue``, node failure,
scancel), KillWait seconds before SIGKILL. The handler only sets a flag; at a step boundary the
loop asks ``requested()``, which all-reduces the flag so every rank stops at the same step
(a rank saving while another runs a step would deadlock), saves, and exits with ``exit_code``.
The same all-reduce carries each rank's view of the time budget. A pre-timeout signal that
the budget explains (it came when the limit was due) stops nothing by itself: the budget
knows the end and the measured times, and uses the allocation to the last step that fits.

- 0 after the pre-timeout signal, or when the time limit is near (``deadline.TimeBudget``), with rank 0 having created ``launch.schema.REQUEUE_REQUEST``
  in the run folder: the sbatch script, on the host where ``scontrol`` exists even when ranks
  run in a container, then runs ``scontrol requeue`` (``wants_requeue``);
- 128 + SIGTERM after SIGTERM: Slurm is already ending the job and requeues it itself when the
  job has ``--requeue`` and the cause is preemption or a node failure (not scancel).
"""
from __future__ import annotations

import signal
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_ext.deadline import TimeBudget

_BUDGET, _TIMEOUT, _TERMINATE = 1, 2, 3  # ordered: when several come, Slurm's own ending wins


class StopSignals:
    """Installed once per rank before the loop; ``requested()`` is a collective call."""

    def __init__(self, cluster_signal: str = "USR1@120",
                 budget: Optional[TimeBudget] = None) -> None:
        name, _, lead = cluster_signal.partition("@")
        self.timeout_signal = signal.Signals["SIG" + name]
        self._lead_s = float(lead)  # the signal comes this long before the time limit
        self.budget = budget or TimeBudget(None, step_s=0.0, save_s=0.0, margin_s=0.0)
        self._received_at: float | None = None
        self._received_wall: float | None = None  # Unix seconds, to compare with the end time
        self._received = 0
        self._agreed = 0
        signal.signal(self.timeout_signal, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        kind = _TERMINATE if signum == signal.SIGTERM else _TIMEOUT
        self._received = max(self._received, kind)
        if self._received_at is None:
            self._received_at, self._received_wall = time.monotonic(), time.time()

    def _local_flag(self, save_pending: bool) -> int:
        received = self._received
        if received == _TIMEOUT and self.budget.explains(self._received_wall or 0.0,
                                                         self._lead_s):
            received = 0  # the budget decides when, with the measured times
        if received == 0 and self.budget.exhausted(save_pending=save_pending):
            received = _BUDGET
        return received

    def requested(self, device: torch.device | str = "cpu", *, step_s: Optional[float] = None,
                  save_s: Optional[float] = None, save_pending: bool = False) -> bool:
        """True on every rank once any rank got a signal or ran out of time (one scalar
        all-reduce per call); ``step_s`` / ``save_s``: the step just done, the last save."""
        if step_s is not None:
            self.budget.observe(step_s, save_s)
        flag = torch.tensor([self._local_flag(save_pending)], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._agreed = int(flag.item())
        return self._agreed > 0

    @property
    def wants_requeue(self) -> bool:
        """The pre-timeout signal (not Slurm's own SIGTERM) stopped the run."""
        return self._agreed in (_BUDGET, _TIMEOUT)

    @property
    def reason(self) -> str:
        """Why the ranks stopped, for the log."""
        return "time limit near" if self._agreed == _BUDGET else "stop signal"

    @property
    def exit_code(self) -> int:
        return 0 if self.wants_requeue else 128 + signal.SIGTERM

    def seconds_left(self, *, margin_s: float = 30.0) -> float:
        """After a stop for the time limit: seconds to it, less the budget's margin (or, with no
        end time known, the signal's lead less ``margin_s``) for the batch script to requeue;
        0 otherwise (after SIGTERM Slurm kills the job KillWait seconds later, and requeues it
        itself)."""
        if not self.wants_requeue:
            return 0.0
        left = self.budget.seconds_left()
        if left is not None:
            return left
        if self._received_at is None:
            return 0.0
        return max(0.0, self._lead_s - (time.monotonic() - self._received_at) - margin_s)
