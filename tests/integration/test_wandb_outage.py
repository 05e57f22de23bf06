"""A W&B outage at start does not end the job: rank 0 logs offline, alerts once, says how to sync.

Two real gloo ranks run ``megatron_ext.train`` with ``logging.wandb.mode=online`` against a W&B
server address where nothing listens (loopback, a closed port).
"""
from __future__ import annotations

import os
import subprocess

import pytest

from launch.prepare import write_run_dir
from tests.conftest import make_config
from tests.integration.conftest import torchrun_argv
from tests.slack_receiver import Receiver
from tests.unit.megatron_forward import free_port
from tests.wandb_records import history, wandb_records

pytestmark = pytest.mark.slow


def test_an_unreachable_wandb_server_falls_back_to_offline(tmp_path):
    receiver = Receiver()
    cfg = make_config("data=synthetic", "train.steps=3", "train.warmup_steps=1",
                      "checkpoint.save_interval=0", "resilience.straggler.enabled=false",
                      "logging.wandb.mode=online", "logging.wandb.init_timeout_s=3",
                      "logging.slack.enabled=true", f"checkpoint.dir={tmp_path / 'ckpt'}",
                      run_dir=str(tmp_path / "run"))
    home = str(tmp_path / "wandb-home")
    env = {**os.environ, "SLACK_WEBHOOK_URL": receiver.url, "WANDB_API_KEY": "k" * 40,
           "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
           "WANDB_DIR": home, "WANDB_CACHE_DIR": home, "WANDB_CONFIG_DIR": home}
    try:
        job = subprocess.run(torchrun_argv("-m", "megatron_ext.train", str(write_run_dir(cfg))),
                             env=env, capture_output=True, text=True, timeout=300)
    finally:
        receiver.close()
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-3000:]
    assert "finished 3 steps" in log
    notices = [p for p in receiver.posts if "logs W&B offline" in p]
    assert len(notices) == 1, receiver.posts
    assert "W&B online start failed (CommError" in notices[0] and "wandb sync " in notices[0]
    assert "k" * 40 not in notices[0] + log
    steps = [row["_step"] for row in history(wandb_records(tmp_path / "run")) if "_step" in row]
    assert steps[-1] == 3  # every step reached the offline run, ready to sync
