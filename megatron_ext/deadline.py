"""The time limit, watched by the ranks: stop, save and requeue while there is time to.

Slurm's pre-timeout signal comes a fixed lead before the limit and the ranks look at it only
between steps; a step or a save slower than that lead loses everything since the last save.
So the ranks read the allocation's end once per attempt (rank 0 asks Slurm, everyone gets its
answer) and, at every step boundary, stop when the next step, the stop save (after the save
still being written, or started after the next step, if any) and
``cluster.time_limit_margin_s`` no longer fit. The times are
the measured ones (the slowest of the recent steps, the last save), the launcher's predictions
(``cluster.step_time_s`` / ``save_time_s``) until a measurement exists.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

from launch.cluster_schema import ClusterConfig
from megatron_ext.env import job_end_time

_RECENT_STEPS = 5
"""Steps whose slowest decides: a data-loading stall or a save's blocking part repeats."""
SIGNAL_EARLY_S = 60.0
"""sbatch(1): the ``--signal`` "may be sent up to 60 seconds earlier than specified"."""


def out_of_time(now: float, end: float, *, step_s: float, save_s: float, saves: int,
                margin_s: float) -> bool:
    """Whether the next step, ``saves`` saves of ``save_s`` and the margin end past ``end``."""
    return now + step_s + saves * save_s + margin_s > end


class TimeBudget:
    """What the ranks know of their time limit; ``end`` None: none known (local runs)."""

    def __init__(self, end: Optional[float], *, step_s: float, save_s: float,
                 margin_s: float) -> None:
        self.end, self.margin_s = end, margin_s
        self._predicted_step_s, self.save_s = step_s, save_s
        self._steps: deque[float] = deque(maxlen=_RECENT_STEPS)

    @classmethod
    def agreed(cls, cluster: ClusterConfig, *, rank: int,
               device: torch.device | str = "cpu") -> "TimeBudget":
        """Collective: rank 0 reads the end time (``env.job_end_time``), every rank uses it."""
        end = torch.tensor([(job_end_time() or 0.0) if rank == 0 else 0.0],
                           dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(end, src=0)
        return cls(float(end.item()) or None, step_s=cluster.step_time_s,
                   save_s=cluster.save_time_s, margin_s=cluster.time_limit_margin_s)

    @property
    def step_s(self) -> float:
        return max(self._steps) if self._steps else self._predicted_step_s

    def observe(self, step_s: float, save_s: Optional[float]) -> None:
        """A finished step's seconds, and the last save's (None: none measured yet)."""
        self._steps.append(step_s)
        if save_s is not None:
            self.save_s = save_s

    def exhausted(self, *, save_pending: bool) -> bool:
        """This rank's view of whether to stop now; the ranks agree on it (signals.py).
        ``save_pending``: a save is being written or starts after the next step, and the stop
        save would wait for it."""
        if self.end is None:
            return False
        return out_of_time(time.time(), self.end, step_s=self.step_s, save_s=self.save_s,
                           saves=2 if save_pending else 1, margin_s=self.margin_s)

    def explains(self, received_at: float, lead_s: float) -> bool:
        """A pre-timeout signal received at ``received_at`` (Unix seconds) is the warning of
        the limit this budget already watches, not a preemption or a manual request."""
        return self.end is not None and self.end - received_at <= lead_s + SIGNAL_EARLY_S

    def seconds_left(self) -> Optional[float]:
        """To the end less the margin, for work after the stop save (S3 copies); None: unknown."""
        return None if self.end is None else max(0.0, self.end - time.time() - self.margin_s)
