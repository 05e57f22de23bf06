"""The ``logging`` and ``resilience`` sections: what watches a run (W&B, Slack, the watchdog,
the straggler detector). Split from launch/schema.py, which re-exports the two sections."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from launch.problems import choice_problem, positive_problem

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    mode: str = "disabled"
    project: str = "slurm-llm"
    entity: str = ""
    init_timeout_s: float = 90.0
    """How long ``mode=online`` waits for the W&B server at start (wandb's own default); past
    it rank 0 logs offline instead, alerts once, and the run goes on."""


@dataclass
class SlackConfig:
    """Slack incoming-webhook alerts; the URL is read from $SLACK_WEBHOOK_URL on the node."""

    enabled: bool = False
    min_interval_s: float = 300.0
    """At most one alert per event kind and rank within this window."""
    timeout_s: float = 5.0
    """How long one POST waits for Slack's answer; a POST that times out is not sent again."""
    retries: int = 3
    """Further attempts after a refused connection, HTTP 429 (after its Retry-After) or 500/503."""


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slack: SlackConfig = field(default_factory=SlackConfig)

    def problems(self) -> list[str]:
        out = choice_problem("logging.wandb.mode", self.wandb.mode, WANDB_MODES)
        out += positive_problem("logging.wandb.init_timeout_s", self.wandb.init_timeout_s)
        out += positive_problem("logging.slack.timeout_s", self.slack.timeout_s)
        if self.slack.min_interval_s < 0:
            out.append(f"logging.slack.min_interval_s={self.slack.min_interval_s} must be >= 0")
        return out


@dataclass
class WatchdogConfig:
    """Hang detection: no completed step within the timeout dumps stacks and exits non-zero."""

    enabled: bool = True
    timeout_s: Optional[float] = None
    """None derives it: max(min_timeout_s, step_time_factor * the slowest step seen so far)."""
    min_timeout_s: float = 300.0
    step_time_factor: float = 10.0
    first_step_timeout_s: float = 1800.0
    """Budget for start-up (process groups, model build, checkpoint load), and again for the
    first step (compilation, warm-up)."""
    save_timeout_s: float = 1800.0
    """Budget for the part of a checkpoint save the step waits for, and for the exit save with
    its commit: saves are no steps, so their time never raises the step timeout."""


@dataclass
class StragglerConfig:
    """Per-rank step timing gathered every ``report_interval`` steps."""

    enabled: bool = True
    report_interval: int = 50
    threshold: float = 1.5
    """A rank whose compute time exceeds threshold * the median rank's is reported."""
    consecutive_reports: int = 3
    """...in this many report intervals in a row: a healthy run with async saves crosses 1.5x
    now and then on alternating ranks (7 of 50 reports in one measured run); a straggler stays."""


@dataclass
class SpikeConfig:
    """Loss and gradient-norm spikes against the rolling median of the last ``window`` steps."""

    enabled: bool = True
    window: int = 100
    loss_factor: float = 1.5
    """A loss above this many times the median is a spike (the loss falls slowly; x1.5 is rare)."""
    grad_norm_factor: float = 10.0
    """A gradient norm above this many times the median is a spike (the demo's 40.4 against a
    median of 0.75 is 54x)."""
    val_rises: int = 0
    """Alert when a source's validation loss rose at this many evaluations in a row (forgetting
    in continued pre-training); 0: no such alert."""


@dataclass
class ResilienceConfig:
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    collective_timeout_s: float = 600.0
    """torch.distributed timeout: a dead peer becomes an error, not an eternal wait."""

    def problems(self) -> list[str]:
        out = positive_problem("resilience.watchdog.min_timeout_s", self.watchdog.min_timeout_s)
        out += positive_problem("resilience.collective_timeout_s", self.collective_timeout_s)
        out += positive_problem("resilience.straggler.report_interval",
                                self.straggler.report_interval)
        out += positive_problem("resilience.straggler.consecutive_reports",
                                self.straggler.consecutive_reports)
        out += positive_problem("resilience.spikes.window", self.spikes.window)
        if self.spikes.val_rises < 0:
            out.append(f"resilience.spikes.val_rises={self.spikes.val_rises} must be >= 0 (0: off)")
        for name in ("loss_factor", "grad_norm_factor"):
            if getattr(self.spikes, name) <= 1:
                out.append(f"resilience.spikes.{name}={getattr(self.spikes, name)} must be > 1")
        if self.straggler.threshold <= 1:
            out.append(f"resilience.straggler.threshold={self.straggler.threshold} must be > 1 "
                       "(a slowdown factor relative to the median rank)")
        if self.watchdog.timeout_s is not None:
            out += positive_problem("resilience.watchdog.timeout_s", self.watchdog.timeout_s)
        return out
