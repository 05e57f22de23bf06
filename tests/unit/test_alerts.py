"""Alerts against a real HTTP endpoint on loopback standing in for Slack's webhook."""
from __future__ import annotations

import logging
import time

import pytest

from launch.prepare import write_run_dir
from launch.schema import ALERTS_SENT
from megatron_ext import alerts
from megatron_ext.alerts import Alerts, NullAlerts
from tests.conftest import make_config
from tests.slack_receiver import Receiver


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def make_alerts(url: str, **overrides) -> Alerts:
    kwargs = dict(run_name="llama-test", min_interval_s=60.0, timeout_s=1.0, retries=2,
                  backoff_s=0.01, hostname="node-a")
    return Alerts(url, **{**kwargs, **overrides})


def test_every_kind_is_posted_with_its_content(receiver):
    a = make_alerts(receiver.url)
    for kind in alerts.KINDS:
        assert a.send(kind, f"details of {kind}", rank=3, fields={"layout": "TP=2 PP=1"})
    assert a.flush(5.0)
    a.close()
    assert len(receiver.posts) == len(alerts.KINDS)
    for kind, text in zip(alerts.KINDS, receiver.posts):
        assert text.startswith(alerts.headline(kind, "llama-test", 3, "node-a"))
        assert f"details of {kind}" in text and "• layout: TP=2 PP=1" in text
    assert "hang detected (rank 3 on node-a)" in receiver.posts[alerts.KINDS.index(alerts.HANG)]


def test_one_alert_per_kind_and_rank_per_interval(receiver):
    a = make_alerts(receiver.url, min_interval_s=0.5)
    sent = [a.send(alerts.STRAGGLER, "slow", rank=1) for _ in range(3)]
    sent += [a.send(alerts.STRAGGLER, "slow", rank=2), a.send(alerts.HANG, "stuck", rank=1)]
    assert sent == [True, False, False, True, True]
    time.sleep(0.6)
    assert a.send(alerts.STRAGGLER, "still slow", rank=1)
    a.close(5.0)
    assert len(receiver.posts) == 4 and "still slow" in receiver.posts[-1]


def test_straggler_alerts_name_the_straggler_and_each_gets_its_own(receiver):
    """Rank 0 reports every straggler; before, the headline named rank 0, and a second
    straggler within the rate limit was never posted."""
    a = make_alerts(receiver.url)
    sent = [a.send(alerts.STRAGGLER, "2.00x the median", rank=0, about=f"rank {r} on node-{r}")
            for r in (5, 9, 5)]
    a.close(5.0)
    assert sent == [True, True, False]
    assert [p.splitlines()[0] for p in receiver.posts] == [
        f":snail: *llama-test* straggler detected: rank {r} on node-{r} (reported by rank 0 on "
        "node-a)" for r in (5, 9)]


def test_server_errors_are_retried_client_errors_are_not(receiver):
    receiver.statuses = [500, 503]
    a = make_alerts(receiver.url, retries=3)
    a.send(alerts.FAILURE, "RuntimeError: boom", rank=0)
    assert a.flush(5.0)
    assert len(receiver.posts) == 3  # two 5xx, then delivered
    receiver.statuses = [404]
    a.send(alerts.COMPLETE, "done", rank=0)
    a.close(5.0)
    assert len(receiver.posts) == 4


def test_a_slow_webhook_gets_each_alert_once(receiver, caplog):
    """A POST that timed out waiting for the answer may have been delivered: it is not sent
    again (before, a webhook answering after the timeout got the start alert four times)."""
    receiver.delay_s = 1.0
    a = make_alerts(receiver.url, timeout_s=0.3, retries=3)
    a.send(alerts.START, "TP=1 PP=1 DP=2", rank=0)
    a.close(5.0)
    time.sleep(1.5)  # time for any retry to arrive
    assert len(receiver.posts) == 1
    assert "not retried, since Slack may have received it" in caplog.text


def test_a_wrong_webhook_is_named_with_its_status(receiver, caplog):
    receiver.statuses = [404]
    a = make_alerts(receiver.url, retries=3)
    a.send(alerts.START, "TP=1 PP=1 DP=2", rank=0)
    a.close(5.0)
    assert len(receiver.posts) == 1
    assert "start alert not delivered: HTTP 404 (a wrong or revoked webhook" in caplog.text
    assert "TOPSECRET0042" not in caplog.text


def test_a_rate_limited_alert_waits_for_retry_after(receiver):
    receiver.statuses, receiver.retry_after_s = [429], 1
    a = make_alerts(receiver.url, retries=2)
    a.send(alerts.HANG, "no step for 600 s", rank=0)
    a.close(10.0)
    assert len(receiver.posts) == 2 and receiver.posts[0] == receiver.posts[1]
    assert receiver.times[1] - receiver.times[0] >= 1.0  # the backoff alone is 10 ms


@pytest.mark.parametrize("failure", ["errors", "never answers"])
def test_broken_endpoint_never_stalls_the_caller(receiver, failure, caplog):
    if failure == "errors":
        receiver.statuses = [500] * 100
    else:
        receiver.delay_s = 3.0
    a = make_alerts(receiver.url, timeout_s=0.3, retries=1)
    caplog.set_level(logging.DEBUG)
    slowest = 0.0
    for rank in range(20):
        start = time.perf_counter()
        a.send(alerts.NAN_LOSS, "loss=nan at step 7", rank=rank)
        slowest = max(slowest, time.perf_counter() - start)
    assert slowest < 0.005, f"send() blocked for {slowest * 1000:.1f} ms"
    start = time.perf_counter()
    a.close(timeout_s=0.2)  # gives up flushing; the thread is a daemon
    assert time.perf_counter() - start < 1.5
    assert receiver.wait_for(1)
    assert "TOPSECRET0042" not in caplog.text and receiver.url not in caplog.text


def test_from_config_reads_the_url_only_from_the_environment(receiver, monkeypatch):
    cfg = make_config()
    monkeypatch.delenv(alerts.URL_ENV, raising=False)
    assert isinstance(Alerts.from_config(cfg, rank=0), NullAlerts)  # slack disabled by default
    cfg.logging.slack.enabled = True
    assert isinstance(Alerts.from_config(cfg, rank=0), NullAlerts)  # enabled, but no URL
    monkeypatch.setenv(alerts.URL_ENV, receiver.url)
    a = Alerts.from_config(cfg, rank=1)
    a.send_now(alerts.START, "TP=1 PP=1 DP=2", rank=1, timeout_s=5.0)
    a.close()
    assert receiver.posts and f"*{cfg.name}* started (rank 1" in receiver.posts[0]


def test_null_alerts_do_nothing():
    a = NullAlerts()
    assert a.send(alerts.HANG, "x", rank=0) is False
    assert a.flush(0.0)
    a.send_now(alerts.HANG, "x", rank=0)
    a.close()


def test_a_failure_every_rank_hits_is_posted_once_per_job_attempt(receiver, tmp_path, caplog):
    claims = tmp_path / "alerts-sent"
    ranks = [make_alerts(receiver.url, claims_dir=claims, hostname=f"node-{r}") for r in range(4)]
    sent = [a.send(alerts.FAILURE, f"RuntimeError on rank {r}", rank=r)
            for r, a in enumerate(ranks)]
    sent += [a.send(alerts.HANG, "no step for 600 s", rank=r) for r, a in enumerate(ranks)]
    sent += [a.send(alerts.STRAGGLER, "rank 2 is slow", rank=r) for r, a in enumerate(ranks)]
    for a in ranks:
        a.close(5.0)
    assert sent == [True, False, False, False] * 2 + [True] * 4  # per-rank kinds unchanged
    texts = sorted(p.splitlines()[1] for p in receiver.posts)  # 4 ranks post concurrently
    assert texts == ["RuntimeError on rank 0", "no step for 600 s"] + ["rank 2 is slow"] * 4
    assert "failure alert not sent: rank 0 on node-0 sent this job's" in caplog.text


def test_without_a_shared_folder_every_rank_still_alerts(receiver, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the claims folder cannot be created under a file
    ranks = [make_alerts(receiver.url, claims_dir=blocked / "alerts-sent") for _ in range(2)]
    assert [a.send(alerts.FAILURE, "boom", rank=r) for r, a in enumerate(ranks)] == [True, True]
    for a in ranks:
        a.close(5.0)
    assert len(receiver.posts) == 2


def test_a_new_launch_into_the_same_run_folder_alerts_afresh(tmp_path):
    claims = tmp_path / ALERTS_SENT
    claims.mkdir()
    (claims / alerts.FAILURE).write_text("rank 3 on node-c")  # left by the previous attempt
    write_run_dir(make_config(run_dir=str(tmp_path)))
    assert not claims.exists()
