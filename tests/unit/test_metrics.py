"""W&B in offline mode: the run file written to disk is read back record by record."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from launch.schema import Layout
from megatron_ext import alerts
from megatron_ext.alerts import Alerts
from megatron_ext.metrics import (MetricsLogger, NullMetricsLogger, format_progress, layout_tag,
                                  run_id, wandb_settings)
from tests.conftest import make_config

LAYOUT = Layout(tp=2, pp=1, cp=1, dp=2)
SLACK_SECRET = "https://hooks.slack.com/services/T0DISTINCT/B0SECRET/zz9plural9alpha"


def wandb_records(run_dir: Path) -> list[pb.Record]:
    """Parse the offline ``run-<id>.wandb`` files: W&B's LevelDB-style log of protobufs.

    Layout: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, parts = path.read_bytes(), 7, []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (length == 0 and kind == 0):  # block padding
                pos += left
                continue
            parts.append(data[pos + 7:pos + 7 + length])
            pos += 7 + length
            if kind in (1, 4):
                records.append(pb.Record.FromString(b"".join(parts)))
                parts = []
    return records


def of_type(records: list[pb.Record], kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list[pb.Record]) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in h.item} for h in of_type(records, "history")]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An offline config whose W&B side files (cache, settings) stay under tmp_path."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = make_config("logging.wandb.mode=offline", run_dir=str(tmp_path / "run"))
    cfg.checkpoint.dir = str(tmp_path / "ckpt")
    return cfg


def test_format_progress():
    line = format_progress(20, 300, 4.12345, 3e-3, 0.5123, 0.1234, 41234.6, 3725)
    assert line == ("step  20/300 | loss 4.1235 | lr 3.000e-03 | grad norm 0.512 | 123 ms/step "
                    "| 41,235 tokens/s | eta 1h02m")
    assert format_progress(1, 10, 1, 1, 1, 1, 1, 65).endswith("eta 1m05s")


def test_run_id_follows_the_job_so_requeues_continue_the_run(offline):
    assert run_id(offline, {"SLURM_JOB_ID": "4242"}) == "demo-local-4242"
    array = {"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"}
    assert run_id(offline, array) == "demo-local-4242_7"
    local = run_id(offline, {})
    assert local == run_id(offline, {})
    offline.checkpoint.dir += "-other"
    assert run_id(offline, {}) != local


def test_name_group_and_tags_come_from_the_config(offline):
    s = wandb_settings(offline, LAYOUT, {"SLURM_ARRAY_JOB_ID": "99", "SLURM_ARRAY_TASK_ID": "1"})
    assert s["name"] == f"demo-{offline.model.name}-tp2-dp2-local"
    assert s["group"] == "sweep-99" and "sweep-99" in s["tags"] and "tp2-dp2" in s["tags"]
    assert s["resume"] == "allow" and s["config"]["layout"]["tp"] == 2
    assert wandb_settings(offline, LAYOUT, {})["group"] == "demo"
    assert layout_tag(Layout(1, 1, 1, 1)) == "single"


def test_only_rank_0_logs(offline, tmp_path):
    assert isinstance(MetricsLogger.from_config(offline, rank=1, layout=LAYOUT,
                                                run_dir=tmp_path), NullMetricsLogger)
    offline.logging.wandb.mode = "disabled"
    assert isinstance(MetricsLogger.from_config(offline, rank=0, layout=LAYOUT,
                                                run_dir=tmp_path), NullMetricsLogger)


def test_offline_run_holds_the_metrics_config_and_a_requeue_resumes_it(offline, monkeypatch):
    run_dir = Path(offline.run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "31337")
    for first, last in ((1, 3), (4, 5)):  # the second launch is the requeued job
        m = MetricsLogger.from_config(offline, rank=0, layout=LAYOUT, run_dir=run_dir)
        assert m.run_id == "demo-local-31337"
        for step in range(first, last + 1):
            m.log(step, {"loss": 10.0 / step, "throughput/tokens_per_s": 1000.0 * step})
        m.close(exit_code=0)
    records = wandb_records(run_dir)
    runs = of_type(records, "run")
    assert {r.run_id for r in runs} == {"demo-local-31337"}
    assert runs[0].run_group == "demo" and "tp2-dp2" in runs[0].tags
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["layout"]["dp"] == 2 and config["model"]["name"] == offline.model.name
    rows = [row for row in history(records) if "loss" in row]
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["loss"] == 2.0 and rows[-1]["throughput/tokens_per_s"] == 5000.0


def test_wandb_alert_goes_into_the_run(offline):
    run_dir = Path(offline.run_dir)
    m = MetricsLogger.from_config(offline, rank=0, layout=LAYOUT, run_dir=run_dir)
    a = Alerts.from_config(offline, rank=0)  # no Slack URL: W&B alerts only
    a.send_now(alerts.NAN_LOSS, "loss=nan at step 12", rank=0, timeout_s=5.0)
    a.close()
    m.close(exit_code=1)
    sent = of_type(wandb_records(run_dir), "alert")
    assert len(sent) == 1 and "loss=nan at step 12" in sent[0].text and sent[0].level == "ERROR"


def test_no_secret_lands_under_the_run_dir(offline, monkeypatch):
    monkeypatch.setenv("SLACK_WEBHOOK_URL", SLACK_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "7" * 40)
    offline.data.tokenizer = f"/data/tok.json?{SLACK_SECRET}"  # a secret pasted into the config
    run_dir = Path(offline.run_dir)
    m = MetricsLogger.from_config(offline, rank=0, layout=LAYOUT, run_dir=run_dir)
    m.log(1, {"loss": 1.0})
    m.close()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        assert SLACK_SECRET.encode() not in data and b"zz9plural9alpha" not in data, path
        assert b"7" * 40 not in data, path
