"""Loss and gradient-norm spikes: a step far above the recent median is worth a look before a
run diverges (a bad batch, a learning rate too high, a failing GPU).

Rank 0 judges the global loss and gradient norm, which every rank shares, against the rolling
median of the last ``window`` applied steps; nothing is judged before ``MIN_HISTORY`` of them.
The median is robust to the spikes themselves, so one bad step does not hide the next.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Union

from launch.schema import RunConfig

MIN_HISTORY = 10
"""Applied steps before anything is judged: the first steps of a run move fast."""


@dataclass(frozen=True)
class Spike:
    name: str
    """``loss`` or ``grad norm``."""
    value: float
    median: float

    def describe(self, step: int) -> str:
        return (f"{self.name} {self.value:.4g} at step {step}: {self.value / self.median:.1f}x "
                f"the median of the last steps ({self.median:.4g})")


class SpikeDetector:
    def __init__(self, window: int, loss_factor: float, grad_norm_factor: float) -> None:
        self._factors = {"loss": loss_factor, "grad norm": grad_norm_factor}
        self._history = {name: deque(maxlen=window) for name in self._factors}

    @classmethod
    def from_config(cls, cfg: RunConfig, *, rank: int) -> Union["SpikeDetector", "NullSpikeDetector"]:
        s = cfg.resilience.spikes
        if not s.enabled or rank != 0:  # the values are global: rank 0 judges for everyone
            return NullSpikeDetector()
        return cls(s.window, s.loss_factor, s.grad_norm_factor)

    def step(self, loss: float, grad_norm: float, applied: bool) -> list[Spike]:
        """The spikes of this step; a step whose update was skipped is neither judged nor kept."""
        if not applied:
            return []
        spikes = []
        for name, value in (("loss", loss), ("grad norm", grad_norm)):
            history = self._history[name]
            if len(history) >= MIN_HISTORY:
                median = statistics.median(history)
                if median > 0 and value > self._factors[name] * median:
                    spikes.append(Spike(name, value, median))
            history.append(value)
        return spikes


class NullSpikeDetector:
    """Spike detection off, or not rank 0: same interface, never reports."""

    def step(self, loss: float, grad_norm: float, applied: bool) -> list[Spike]:
        return []
