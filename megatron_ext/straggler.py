"""Straggler detection: which rank makes everyone else wait, and on which host.

In synchronous training the slowest rank sets the step time, but the others only see longer
collectives. Each rank times its own compute (its forward passes: ``StepResult.forward_s``);
every ``report_interval`` steps one all_gather of the per-rank mean compares them to the
median rank's of the same pipeline position (``pipeline_position``: the first and last stages
do more by design; the lower median, so with 2 ranks the faster one is the yardstick). The caller
decides what to do with the reports (log on rank 0, alert). Within a tensor-parallel group
the ranks wait for each other inside the forward, so a slow GPU there shows as its group.
A rank is reported once it has been above the threshold in ``consecutive`` intervals in a row.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from launch.schema import RunConfig

log = logging.getLogger("megatron_ext.straggler")


@dataclass(frozen=True)
class StragglerReport:
    rank: int
    """Global rank."""
    hostname: str
    slowdown: float
    """Mean compute time of this rank divided by the median rank's."""
    compute_s: float
    """Mean compute seconds per step over the last interval."""
    median_s: float

    @property
    def who(self) -> str:
        return f"rank {self.rank} on {self.hostname}"

    def describe(self) -> str:
        return (f"{self.who}: {self.slowdown:.2f}x the median "
                f"({self.compute_s * 1000:.0f} ms vs {self.median_s * 1000:.0f} ms per step)")


@dataclass(frozen=True)
class StragglerCheck:
    """One interval's verdict, the same on every rank."""

    worst_slowdown: float
    """Slowest rank's mean compute time over the median rank's (1.0: perfectly even); the
    straggler score dashboards plot even when nobody crosses the threshold."""
    reports: list[StragglerReport]
    """Ranks above the threshold for ``consecutive`` intervals in a row, slowest first."""


def pipeline_position(pp_rank: int, pp_size: int) -> int:
    """A pipeline stage's role in the comparison: 0 first, 1 between, 2 last.

    The first stage embeds and the last computes the loss over the vocabulary; the stages
    between them run the same number of layers, so they are compared with each other. With
    PP=8 and a single data-parallel replica that still leaves six ranks to compare."""
    if pp_rank == 0:
        return 0
    return 2 if pp_rank == pp_size - 1 else 1


def role_medians(times: list[float], roles: list[int]) -> list[float]:
    """Each entry's yardstick: the lower median of the entries with its role
    (``pipeline_position``)."""
    by_role: dict[int, list[float]] = {}
    for t, role in zip(times, roles):
        by_role.setdefault(role, []).append(t)
    median = {role: statistics.median_low(group) for role, group in by_role.items()}
    return [median[role] for role in roles]


def comparable(roles: list[int]) -> bool:
    """Whether any two ranks share a pipeline position; PP=2 with one replica has none."""
    return len(set(roles)) < len(roles)


def persistent(slow: list[tuple[int, float]], streaks: list[int],
               consecutive: int) -> tuple[list[tuple[int, float]], list[int]]:
    """The entries of ``slow`` (``above_threshold``'s) whose streak reaches ``consecutive``
    intervals in a row, and every entry's new streak (reset where it was not slow)."""
    slow_now = dict(slow)
    streaks = [streak + 1 if i in slow_now else 0 for i, streak in enumerate(streaks)]
    return [(i, s) for i, s in slow if streaks[i] >= consecutive], streaks


def above_threshold(times: list[float], medians: list[float],
                    threshold: float) -> list[tuple[int, float]]:
    """(index, slowdown) of every entry above threshold x its median, slowest first."""
    slow = [(i, t / m) for i, (t, m) in enumerate(zip(times, medians))
            if m > 0 and t > threshold * m]
    return sorted(slow, key=lambda item: -item[1])


class StragglerDetector:
    """Accumulates this rank's compute time; compares all ranks once per interval."""

    def __init__(self, group: Optional[dist.ProcessGroup], report_interval: int,
                 threshold: float, rank: int, hostname: str, role: int = 0,
                 consecutive: int = 1) -> None:
        """``role``: ranks are compared with the ranks of the same role (``pipeline_position``);
        ``consecutive``: intervals in a row a rank must be slow before it is reported."""
        self._group, self._interval, self._threshold = group, report_interval, threshold
        self._role, self._consecutive, self._rank = role, consecutive, rank
        self._hostname = hostname
        self._hostnames: Optional[list[str]] = None  # gathered once, at the first report
        self._global_ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        assert rank in self._global_ranks, f"rank {rank} is not in the straggler group"
        self._steps, self._total_s = 0, 0.0
        self._streaks = [0] * len(self._global_ranks)
        self._said_incomparable = False

    @classmethod
    def from_config(cls, cfg: RunConfig, *, group: Optional[dist.ProcessGroup], rank: int,
                    hostname: str, role: int = 0
                    ) -> Union["StragglerDetector", "NullStragglerDetector"]:
        """``group``: the ranks to compare (None for all); every member must call ``step``."""
        s = cfg.resilience.straggler
        if not s.enabled:
            return NullStragglerDetector()
        return cls(group, s.report_interval, s.threshold, rank, hostname, role,
                   s.consecutive_reports)

    def step(self, compute_seconds: float) -> Optional[StragglerCheck]:
        """Collective every ``report_interval`` calls, which return the same check on every
        rank; the calls in between return None."""
        self._steps += 1
        self._total_s += compute_seconds
        if self._steps < self._interval:
            return None
        means, roles = self._gather(self._total_s / self._steps)
        self._steps, self._total_s = 0, 0.0  # each interval judges only its own steps
        hostnames = self._gather_hostnames()
        if not comparable(roles) and not self._said_incomparable:
            self._said_incomparable = True
            if self._rank == self._global_ranks[0]:
                log.warning("straggler detection has nothing to compare: every rank is alone in "
                            "its pipeline position (first, between, last stages differ by "
                            "design); it needs two ranks per position, e.g. two data-parallel "
                            "replicas or PP >= 4")
        medians = role_medians(means, roles)
        slow, self._streaks = persistent(above_threshold(means, medians, self._threshold),
                                         self._streaks, self._consecutive)
        reports = [StragglerReport(rank=self._global_ranks[i], hostname=hostnames[i],
                                   slowdown=slowdown, compute_s=means[i], median_s=medians[i])
                   for i, slowdown in slow]
        worst = max((t / m for t, m in zip(means, medians) if m > 0), default=1.0)
        return StragglerCheck(worst_slowdown=worst, reports=reports)

    def _gather(self, mean_s: float) -> tuple[list[float], list[int]]:
        """Every rank's (mean, role) in one float all_gather: cheaper than pickling objects."""
        device = "cuda" if dist.get_backend(self._group) == "nccl" else "cpu"
        mine = torch.tensor([mean_s, self._role], dtype=torch.float64, device=device)
        out = torch.empty(2 * len(self._global_ranks), dtype=torch.float64, device=device)
        dist.all_gather_into_tensor(out, mine, group=self._group)
        pairs = out.view(-1, 2).tolist()
        return [mean for mean, _ in pairs], [int(role) for _, role in pairs]

    def _gather_hostnames(self) -> list[str]:
        if self._hostnames is None:
            self._hostnames = [""] * len(self._global_ranks)
            dist.all_gather_object(self._hostnames, self._hostname, group=self._group)
        return self._hostnames


class NullStragglerDetector:
    """Straggler detection switched off: same interface, never reports."""

    def step(self, compute_seconds: float) -> Optional[StragglerCheck]:
        return None
