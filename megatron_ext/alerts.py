"""Slack (and W&B) alerts that never slow or crash training.

``send`` only stamps the rate limiter and enqueues; one daemon thread posts with retries and a
timeout, so a Slack outage costs the training step microseconds. The webhook URL is read from
``$SLACK_WEBHOOK_URL`` here and nowhere else, and is never logged or written.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Union

from slack_sdk.http_retry.builtin_handlers import (ConnectionErrorRetryHandler,
                                                   RateLimitErrorRetryHandler,
                                                   ServerErrorRetryHandler)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.webhook import WebhookClient

from launch.run_folder import clear_alert_claims
from launch.schema import ALERTS_SENT, RunConfig
from megatron_ext.background import BackgroundWorker

log = logging.getLogger("megatron_ext.alerts")
# slack_sdk logs the full URL at DEBUG; its own quiet logger keeps the secret out of any log.
_slack_log = logging.getLogger("megatron_ext.alerts.slack_sdk")
_slack_log.setLevel(logging.WARNING)

URL_ENV = "SLACK_WEBHOOK_URL"

START = "start"
"""Job started; the caller puts the layout and the predicted memory in ``fields``."""
COMPLETE = "complete"
FAILURE = "failure"
"""A rank raised; the text carries the exception."""
STRAGGLER = "straggler"
HANG = "hang"
CHECKPOINT_FAILURE = "checkpoint_failure"
NAN_LOSS = "nan_loss"
"""The run stops on a non-finite loss or gradient (``train.on_nan``): why the attempt ends."""
NAN_SKIPPED = "nan_skipped"
"""A non-finite step was skipped (``train.on_nan=skip``) and training goes on: a rate-limited
warning that claims nothing, so a later stop or failure is still posted."""
SPIKE = "spike"
"""The loss or gradient norm jumped far above its rolling median (``megatron_ext.spikes``)."""
VAL_RISE = "val_rise"
"""A source's validation loss rose at ``resilience.spikes.val_rises`` evaluations in a row."""
WANDB_OFFLINE = "wandb_offline"
"""``logging.wandb.mode=online`` could not reach the server; the run logs offline."""

# kind -> (emoji, headline, W&B alert level)
_STYLE = {
    START: (":rocket:", "started", "INFO"),
    COMPLETE: (":white_check_mark:", "completed", "INFO"),
    FAILURE: (":x:", "failed", "ERROR"),
    STRAGGLER: (":snail:", "straggler detected", "WARN"),
    HANG: (":hourglass:", "hang detected", "ERROR"),
    CHECKPOINT_FAILURE: (":floppy_disk:", "checkpoint failed", "ERROR"),
    NAN_LOSS: (":warning:", "non-finite loss or gradient: stopped", "ERROR"),
    NAN_SKIPPED: (":warning:", "non-finite loss or gradient: step skipped", "WARN"),
    SPIKE: (":chart_with_upwards_trend:", "loss or gradient spike", "WARN"),
    VAL_RISE: (":chart_with_upwards_trend:", "validation loss rising", "WARN"),
    WANDB_OFFLINE: (":card_file_box:", "logs W&B offline", "WARN"),
}
KINDS = tuple(_STYLE)
ONCE_PER_JOB = (FAILURE, HANG, NAN_LOSS)
"""Kinds that say why a job attempt ends, which every rank tends to hit together (peers of a
dead rank fail in their collectives; a stuck collective trips every watchdog): only the first
sender of the attempt posts each, and their claims tell ``job_end`` the user already knows."""
_QUEUE_SIZE = 64  # alerts beyond this backlog are dropped rather than held in memory


LAUNCHER = -1
"""The ``rank`` of alerts the launcher sends about the job as a whole (``megatron_ext.job_end``)."""


def sender(rank: int, hostname: str) -> str:
    return f"{'launcher' if rank == LAUNCHER else f'rank {rank}'} on {hostname}"


def headline(kind: str, run_name: str, rank: int, hostname: str,
             about: Optional[str] = None) -> str:
    """Names what the alert is about (a straggler) when that is not the sender itself."""
    emoji, what, _ = _STYLE[kind]
    if about:
        return f"{emoji} *{run_name}* {what}: {about} (reported by {sender(rank, hostname)})"
    return f"{emoji} *{run_name}* {what} ({sender(rank, hostname)})"


def render(kind: str, text: str, *, run_name: str, rank: int, hostname: str,
           fields: Optional[dict] = None, about: Optional[str] = None) -> str:
    """The Slack message body (mrkdwn): headline, free text, then one bullet per field."""
    lines = [headline(kind, run_name, rank, hostname, about)]
    if text:
        lines.append(text)
    lines += [f"• {key}: {value}" for key, value in (fields or {}).items()]
    return "\n".join(lines)


def claims_dir(cfg: RunConfig) -> Path:
    """Where a run's ``ONCE_PER_JOB`` alerts are claimed, shared by its ranks and launcher."""
    return Path(cfg.run_dir) / ALERTS_SENT


def clear_claims(cfg: RunConfig) -> None:
    """Rank 0 calls this before the rendezvous, so no peer can have claimed yet."""
    clear_alert_claims(cfg.run_dir)


def first_to_claim(claim: Path, who: str) -> Optional[str]:
    """Claim ``claim`` for ``who``: None if this call did, else who had (O_EXCL create, atomic
    on the shared run folder, also on Lustre/FSx). Fails open: no folder to agree through means
    every rank alerts rather than none."""
    try:
        claim.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            return claim.read_text() or "another rank"
        except OSError:
            return "another rank"
    except OSError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(who)
    return None


class Alerts:
    """Rate-limited, de-duplicated alerts posted from a background thread."""

    def __init__(self, url: Optional[str], *, run_name: str, min_interval_s: float,
                 timeout_s: float, retries: int, wandb_alerts: bool = False,
                 backoff_s: float = 1.0, hostname: Optional[str] = None,
                 claims_dir: Optional[Path] = None) -> None:
        """``claims_dir``: the folder, shared by all ranks, where ``ONCE_PER_JOB`` alerts are
        claimed; None sends them from every rank."""
        self._client = (WebhookClient(url, timeout=timeout_s, logger=_slack_log,
                                      retry_handlers=retry_handlers(retries, backoff_s))
                        if url else None)
        self._run_name, self._hostname = run_name, hostname or socket.gethostname()
        self._min_interval_s = min_interval_s
        self._wandb_alerts, self._claims_dir = wandb_alerts, claims_dir
        self._last_sent: dict[tuple[str, int, Optional[str]], float] = {}
        self._lock = threading.Lock()  # send() is called from the loop and the watchdog
        self._worker = BackgroundWorker("alerts", on_error=self._not_delivered,
                                        max_backlog=_QUEUE_SIZE)

    @classmethod
    def from_config(cls, cfg: RunConfig, *, rank: int) -> Union["Alerts", "NullAlerts"]:
        """W&B alerts go through rank 0's run; Slack needs the env URL on the node."""
        slack = cfg.logging.slack
        url = os.environ.get(URL_ENV) if slack.enabled else None
        if slack.enabled and not url:
            log.warning("logging.slack.enabled=true but $%s is not set: no Slack alerts", URL_ENV)
        wandb_alerts = rank == 0 and cfg.logging.wandb.mode != "disabled"
        if not url and not wandb_alerts:
            return NullAlerts()
        return cls(url, run_name=cfg.display_name, min_interval_s=slack.min_interval_s,
                   timeout_s=slack.timeout_s, retries=slack.retries, wandb_alerts=wandb_alerts,
                   claims_dir=claims_dir(cfg))

    def send(self, kind: str, text: str, *, rank: int, fields: Optional[dict] = None,
             about: Optional[str] = None) -> bool:
        """Queue an alert unless one of this kind from this rank, about the same subject, went
        out recently.

        ``rank`` is the sending rank (the message names it and this host); ``about`` names
        another subject, such as the straggling rank and its host, in the headline.
        """
        assert kind in _STYLE, f"unknown alert kind {kind!r}; use one of {KINDS}"
        now = time.monotonic()
        with self._lock:
            last = self._last_sent.get((kind, rank, about))
            if last is not None and now - last < self._min_interval_s:
                return False
            self._last_sent[(kind, rank, about)] = now
        if kind in ONCE_PER_JOB and self._claims_dir is not None:
            first = first_to_claim(self._claims_dir / kind, sender(rank, self._hostname))
            if first is not None:
                log.warning("%s alert not sent: %s sent this job's", kind, first)
                return False
        if not self._worker.submit(kind, functools.partial(self._deliver, kind, text, rank,
                                                           fields, about)):
            log.warning("alert backlog full; dropped a %s alert", kind)
            return False
        return True

    def send_now(self, kind: str, text: str, *, rank: int, fields: Optional[dict] = None,
                 timeout_s: float = 10.0) -> None:
        """Send and wait for delivery, for paths that exit right after (hang, fatal failure)."""
        self.send(kind, text, rank=rank, fields=fields)
        self.flush(timeout_s)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued alert was posted or given up on; False on timeout."""
        return self._worker.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush, then stop; a worker stuck on a dead endpoint dies with the process."""
        self._worker.close(timeout_s)

    @staticmethod
    def _not_delivered(kind: str, exc: Exception) -> None:
        # The type only: a message could carry the webhook URL.
        log.warning("alert %s not delivered: %s", kind, type(exc).__name__)

    def _deliver(self, kind: str, text: str, rank: int, fields: Optional[dict],
                 about: Optional[str]) -> None:
        body = render(kind, text, run_name=self._run_name, rank=rank, hostname=self._hostname,
                      fields=fields, about=about)
        if self._client is not None:
            self._post(kind, body)
        wandb = sys.modules.get("wandb")  # not imported means no W&B run to alert through
        if self._wandb_alerts and wandb is not None and wandb.run is not None:
            _, what, level = _STYLE[kind]
            wandb.run.alert(title=f"{self._run_name}: {what}"[:63], text=body, level=level,
                            wait_duration=self._min_interval_s)

    def _post(self, kind: str, body: str) -> None:
        """One POST; slack_sdk's handlers retry what cannot have been delivered (``retry_handlers``)."""
        try:
            status = self._client.send(text=body).status_code
        except TimeoutError:
            log.warning("Slack %s alert: no answer within logging.slack.timeout_s; not retried, "
                        "since Slack may have received it", kind)
            return
        except Exception as e:  # refused connections after the retries; the type only (URL)
            log.warning("Slack %s alert not delivered: %s", kind, type(e).__name__)
            return
        if status >= 400:
            hint = (" (a wrong or revoked webhook: check $SLACK_WEBHOOK_URL)"
                    if status in (403, 404, 410) else "")
            log.warning("Slack %s alert not delivered: HTTP %d%s", kind, status, hint)


def retry_handlers(retries: int, backoff_s: float) -> list:
    """Retry only what Slack cannot have received: a refused or reset connection, 429 after its
    Retry-After, 500/503. Never a request that timed out waiting for the answer: Slack's webhook
    is not idempotent, and a slow endpoint would get the same alert ``retries`` + 1 times."""
    backoff = BackoffRetryIntervalCalculator(backoff_factor=backoff_s)
    return [ConnectionErrorRetryHandler(max_retry_count=retries, interval_calculator=backoff),
            RateLimitErrorRetryHandler(max_retry_count=retries),
            ServerErrorRetryHandler(max_retry_count=retries, interval_calculator=backoff)]


class NullAlerts:
    """Alerts switched off: same interface, does nothing."""

    def send(self, kind: str, text: str, *, rank: int, fields: Optional[dict] = None,
             about: Optional[str] = None) -> bool:
        return False

    def send_now(self, kind: str, text: str, *, rank: int, fields: Optional[dict] = None,
                 timeout_s: float = 10.0) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        pass
