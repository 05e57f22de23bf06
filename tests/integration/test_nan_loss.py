"""A NaN loss in real training: exactly one alert, then the configured action (stop or skip).

Two real gloo ranks run ``megatron_ext.train`` from a config written as launch writes it; rank
0's loss is poisoned in chosen steps, so the global loss every rank sees is NaN there.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from launch.prepare import write_run_dir
from launch.schema import ALERTS_SENT
from tests.conftest import REPO, make_config
from tests.integration.conftest import torchrun_argv
from tests.slack_receiver import Receiver
from tests.wandb_records import history, of_type, offline_runs, wandb_records

pytestmark = pytest.mark.slow
MICRO_BATCHES = 2  # global batch 16 = micro-batch 4 x 2 x DP 2
COMPLETED_TITLE = f"{make_config().name}: completed"  # the W&B alert's title


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def run_ranks(tmp_path: Path, url: str, nan_steps: str, *overrides: str, fault: str = "nan"
              ) -> tuple[int, list[dict], str]:
    """The job's exit code, rank 0's metrics and the ranks' log (``fault``: ``nan`` poisons
    the loss, ``nan_grad`` only the gradients)."""
    cfg = make_config("data=synthetic", "train.steps=8", "train.warmup_steps=1",
                      "train.global_batch_size=16", "train.micro_batch_size=4",
                      "logging.slack.enabled=true", "resilience.straggler.enabled=false",
                      f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=3",
                      *overrides, run_dir=str(tmp_path / "run"))
    config = write_run_dir(cfg)
    job = subprocess.run(torchrun_argv(str(REPO / "tests/integration/faulty_rank.py"), str(config),
                                       fault, str(MICRO_BATCHES), nan_steps),
                         env={**os.environ, "SLACK_WEBHOOK_URL": url, "PYTHONPATH": str(REPO),
                              "WANDB_DIR": str(tmp_path / "wandb-home"),
                              "WANDB_CACHE_DIR": str(tmp_path / "wandb-home"),
                              "WANDB_CONFIG_DIR": str(tmp_path / "wandb-home")},
                         capture_output=True, text=True, timeout=300)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    return job.returncode, metrics, job.stdout + job.stderr


def _nan_alerts(receiver: Receiver) -> list[str]:
    return [post for post in receiver.posts if "non-finite loss or gradient" in post]


def test_nan_stops_the_run_with_one_alert_and_no_update(tmp_path, receiver):
    code, metrics, log = run_ranks(tmp_path, receiver.url, "5", "logging.wandb.mode=offline")
    assert code != 0, log
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]  # nothing after the NaN step
    assert "loss nan at step 5, 1 in a row; stopping (train.on_nan=stop); the last committed " \
           "checkpoint is step 3" in log
    assert (tmp_path / "ckpt" / "step_000003" / "COMMITTED.json").is_file()  # not cut short
    nan = _nan_alerts(receiver)
    assert len(nan) == 1 and "loss nan at step 5" in nan[0] and "stopping" in nan[0]
    assert not [p for p in receiver.posts if " failed (rank" in p]  # no failure on top of it
    assert "FloatingPointError" not in log and "NonFiniteLoss" not in log  # said in one line
    # The rerun (a requeue: same run folder) resumes from step 3; step 4 is in the file once.
    code, metrics, log = run_ranks(tmp_path, receiver.url, "99", "logging.wandb.mode=offline")
    assert code == 0, log
    assert [row["step"] for row in metrics] == list(range(1, 9))
    # Each attempt is its own W&B run; the first lost step 4, which the resume reran, so that
    # `wandb sync` of both uploads every step once (one id made one replace the other).
    runs = offline_runs(tmp_path / "run")
    assert [of_type(run, "run")[0].job_type for run in runs] == ["train", "resume-from-step-3"]
    assert len({of_type(run, "run")[0].run_id for run in runs}) == 2
    steps = [[row["_step"] for row in history(run) if "train/loss" in row] for run in runs]
    assert steps == [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert [row["train/loss"] for row in history(runs[1]) if "train/loss" in row] \
        == [row["loss"] for row in metrics[3:]]


def test_skip_goes_on_without_the_poisoned_updates_and_alerts_once(tmp_path, receiver):
    code, metrics, log = run_ranks(tmp_path, receiver.url, "4,5", "train.on_nan=skip",
                                   "logging.wandb.mode=offline")
    assert code == 0, log
    assert [row["step"] for row in metrics] == list(range(1, 9))
    skipped = [row["step"] for row in metrics if not row["update_applied"]]
    assert skipped == [4, 5]
    assert all(math.isnan(metrics[i]["loss"]) for i in (3, 4))
    # No NaN reached the weights: every later step trains on with a finite loss.
    assert all(math.isfinite(row["loss"]) for row in metrics[5:])
    assert metrics[2]["lr"] == metrics[3]["lr"] == metrics[4]["lr"]  # the schedule waited too
    nan = _nan_alerts(receiver)
    assert len(nan) == 1 and "step skipped" in nan[0]  # the second NaN is rate-limited
    # A skipped step claims no failure (the second in a row used to take the job's one FAILURE
    # alert, silencing a later stop or exception).
    assert not [p for p in receiver.posts if " failed (rank" in p]
    assert "finished 8 steps" in log
    # The W&B run (offline) holds every step in its dashboard sections.
    rows = [row for row in history(wandb_records(tmp_path / "run")) if "train/loss" in row]
    assert [row["_step"] for row in rows] == list(range(1, 9))
    for key in ("throughput/tokens_per_s_per_gpu", "throughput/tflops_per_s_per_gpu",
                "memory/peak_rss_gib", "checkpoint/checkpoint_blocking_s", "train/consumed_tokens"):
        assert all(key in row for row in rows), key
    assert rows[-1]["train/consumed_tokens"] == 8 * 16 * 128
    sent = [alert.title for alert in of_type(wandb_records(tmp_path / "run"), "alert")]
    assert sent[-1] == f"{COMPLETED_TITLE}"  # before, the run closed before this alert
    assert [row["_step"] for row in rows if row["train/update_applied"] == 0] == [4, 5]


def test_a_nan_gradient_under_a_finite_loss_is_never_applied_nor_saved(tmp_path, receiver):
    """bf16 has no grad scaler and clipping skips a NaN norm: megatron's optimizer would write
    the NaN into the weights, and the save of step 6 would poison every resume."""
    code, metrics, log = run_ranks(tmp_path, receiver.url, "4", "train.on_nan=skip",
                                   fault="nan_grad")
    assert code == 0, log
    assert [row["step"] for row in metrics] == list(range(1, 9))
    assert [row["step"] for row in metrics if not row["update_applied"]] == [4]
    assert all(math.isfinite(row["loss"]) for row in metrics)  # the loss never showed it
    assert metrics[2]["lr"] == metrics[3]["lr"]  # the schedule waited
    nan = _nan_alerts(receiver)
    assert len(nan) == 1 and "non-finite gradient" in nan[0] and "at step 4" in nan[0]
    assert (tmp_path / "ckpt" / "step_000006" / "COMMITTED.json").is_file()


def test_a_loss_and_gradient_spike_is_alerted_and_training_goes_on(tmp_path, receiver):
    """The demo's grad norm 40.4 against a median of 0.75 passed without a word."""
    code, metrics, log = run_ranks(tmp_path, receiver.url, "12", "train.steps=13",
                                   fault="spike")
    assert code == 0, log
    assert [row["step"] for row in metrics] == list(range(1, 14))
    spikes = [p for p in receiver.posts if "loss or gradient spike" in p]
    assert len(spikes) == 1, receiver.posts  # loss and grad norm: one kind, rate-limited
    assert "loss " in spikes[0] and "at step 12" in spikes[0] and "x the median" in spikes[0]
    assert "spike: grad norm" in log and "at step 12" in log


def test_a_retried_step_alerts_afresh(tmp_path, receiver):
    """HyperPod's --auto-resume reruns the srun step, not the batch script that clears the
    claims: the first attempt's claim silenced every later failure of the job."""
    cfg = make_config("data=synthetic", "train.steps=3", "train.warmup_steps=1",
                      "train.global_batch_size=16", "train.micro_batch_size=4",
                      "logging.slack.enabled=true", "resilience.straggler.enabled=false",
                      "checkpoint.save_interval=0", f"checkpoint.dir={tmp_path / 'ckpt'}",
                      run_dir=str(tmp_path / "run"))
    config = write_run_dir(cfg)
    (tmp_path / "run" / ALERTS_SENT).mkdir()
    (tmp_path / "run" / ALERTS_SENT / "nan_loss").write_text("rank 0 on the first attempt")
    job = subprocess.run(torchrun_argv(str(REPO / "tests/integration/faulty_rank.py"), str(config),
                                       "nan", str(MICRO_BATCHES), "2"),
                         env={**os.environ, "SLACK_WEBHOOK_URL": receiver.url,
                              "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert job.returncode != 0
    stops = _nan_alerts(receiver)
    assert len(stops) == 1 and "at step 2" in stops[0], receiver.posts
