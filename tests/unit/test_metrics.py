"""W&B in offline mode: the run file written to disk is read back record by record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from launch.prepare import for_sweep_point
from launch.schema import Layout
from megatron_ext import alerts
from megatron_ext.alerts import Alerts
from megatron_ext.env import RunEnv, slurm_ids
from megatron_ext.metrics import (MetricsLogger, NullMetricsLogger, format_progress, layout_tag,
                                  panel_key, run_id, wandb_settings)
from tests.conftest import make_config
from megatron_ext.wandb_log import encode, parse_payloads, read_payloads, rewind_offline_runs
from tests.wandb_records import history, of_type, offline_runs, wandb_records

LAYOUT = Layout(tp=2, pp=1, cp=1, dp=2)
SLACK_SECRET = "https://hooks.slack.com/services/T0DISTINCT/B0SECRET/zz9plural9alpha"


def run_env(rank: int = 0, **slurm_vars: str) -> RunEnv:
    """Rank ``rank`` of a job whose Slurm variables are ``slurm_vars`` (none: a local job)."""
    return RunEnv(rank=rank, world_size=4, local_rank=rank, master_addr="127.0.0.1",
                  master_port=29500, job_id="local", hostname="node-a", **slurm_ids(slurm_vars))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An offline config whose W&B side files (cache, settings) stay under tmp_path."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    cfg = make_config("logging.wandb.mode=offline", run_dir=str(tmp_path / "run"))
    cfg.checkpoint.dir = str(tmp_path / "ckpt")
    return cfg


def test_format_progress():
    line = format_progress(20, 300, 4.12345, 3e-3, 0.5123, 0.1234, 41234.6, 3725)
    assert line == ("step  20/300 | loss 4.1235 | lr 3.000e-03 | grad norm 0.512 | 123 ms/step "
                    "| 41,235 tokens/s | eta 1h02m")
    assert format_progress(1, 10, 1, 1, 1, 1, 1, 65).endswith("eta 1m05s")


def test_run_id_follows_the_job_so_requeues_continue_the_run(offline):
    assert run_id(offline, run_env(SLURM_JOB_ID="4242")) == "demo-local-4242"
    array = run_env(SLURM_JOB_ID="4250", SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID="7")
    assert run_id(offline, array) == "demo-local-4242_7"
    local = run_id(offline, run_env())
    assert local == run_id(offline, run_env())
    offline.checkpoint.dir += "-other"
    assert run_id(offline, run_env()) != local


def test_name_group_and_tags_come_from_the_config(offline):
    array = run_env(SLURM_JOB_ID="100", SLURM_ARRAY_JOB_ID="99", SLURM_ARRAY_TASK_ID="1")
    s = wandb_settings(offline, LAYOUT, array, [])
    assert s["name"] == f"demo-{offline.model.name}-tp2-dp2-local"
    assert s["group"] == "sweep-99" and "sweep-99" in s["tags"] and "tp2-dp2" in s["tags"]
    assert s["config"]["layout"]["tp"] == 2
    assert wandb_settings(offline, LAYOUT, run_env(), [])["group"] == "demo"
    offline.sweep = "demo-2026-11-23_01-02-03"  # what launch records for `-m`
    s = wandb_settings(offline, LAYOUT, run_env(SLURM_JOB_ID="101"), [])
    assert s["group"] == "sweep-demo-2026-11-23_01-02-03" and s["id"] == "demo-local-101"
    assert layout_tag(Layout(1, 1, 1, 1)) == "single"


def test_sweep_points_are_told_apart_in_wandb_and_slack(offline):
    """Two points of ``-m train.lr=1e-4,3e-4`` had the same W&B name and Slack headline."""
    points = [for_sweep_point(offline, f"train.lr={lr}", sweep="demo-s1") for lr in ("1e-4", "3e-4")]
    names = [wandb_settings(p, LAYOUT, run_env(), [])["name"] for p in points]
    assert names == [f"demo-{offline.model.name}-tp2-dp2-local-train.lr={lr}" for lr in ("1e-4", "3e-4")]
    runs = [Alerts.from_config(p, rank=0) for p in points]  # W&B alerts only: no Slack URL
    heads = [alerts.render(alerts.START, "", run_name=a._run_name, rank=0, hostname="n1")
             for a in runs]
    assert heads == [f":rocket: *demo [train.lr={lr}]* started (rank 0 on n1)" for lr in ("1e-4", "3e-4")]


def test_each_value_lands_in_its_dashboard_section():
    assert panel_key("loss") == "train/loss" and panel_key("mfu") == "throughput/mfu"
    assert panel_key("peak_rss_gib") == "memory/peak_rss_gib"
    assert panel_key("checkpoint_blocking_s") == "checkpoint/checkpoint_blocking_s"
    assert panel_key("straggler_worst_slowdown") == "straggler/straggler_worst_slowdown"
    assert panel_key("eval/loss") == "eval/loss"


def test_only_rank_0_logs(offline, tmp_path):
    assert isinstance(MetricsLogger.from_config(offline, env=run_env(rank=1), layout=LAYOUT,
                                                run_dir=tmp_path), NullMetricsLogger)
    offline.logging.wandb.mode = "disabled"
    assert isinstance(MetricsLogger.from_config(offline, env=run_env(), layout=LAYOUT,
                                                run_dir=tmp_path), NullMetricsLogger)


def _attempt(cfg, start_step: int, last: int) -> str:
    """One launch of the job 31337 (the later ones are its requeues): steps after
    ``start_step`` up to ``last``; its W&B run id."""
    m = MetricsLogger.from_config(cfg, env=run_env(SLURM_JOB_ID="31337"), layout=LAYOUT,
                                  run_dir=Path(cfg.run_dir), start_step=start_step)
    for step in range(start_step + 1, last + 1):
        m.log(step, {"loss": 10.0 / step + start_step, "tokens_per_s": 1000.0 * step,
                     "mfu": 0.4, "peak_memory_allocated_gib": 61.5})
    m.close(exit_code=0 if last == 6 else 1)
    return m.run_id


def test_each_attempt_is_its_own_run_and_together_they_hold_each_step_once(offline):
    """Two attempts under one id made ``wandb sync`` of both keep one; the rerun steps after
    the resumed checkpoint were in the history twice, the lost timeline first."""
    ids = [_attempt(offline, 0, 5), _attempt(offline, 3, 4)]
    first_launch = Path(offline.run_dir)
    offline.run_dir = str(first_launch.with_name("relaunch"))  # a new launch folder beside it
    ids.append(_attempt(offline, 3, 6))
    assert ids == ["demo-local-31337", "demo-local-31337-a2", "demo-local-31337-a3"]
    runs = offline_runs(first_launch) + offline_runs(Path(offline.run_dir))
    assert [of_type(run, "run")[0].run_id for run in runs] == ids
    assert {of_type(run, "run")[0].run_group for run in runs} == {"demo"}
    assert "tp2-dp2" in of_type(runs[0], "run")[0].tags
    configs = [{u.key: json.loads(u.value_json) for u in of_type(run, "run")[0].config.update}
               for run in runs]
    assert configs[0]["layout"]["dp"] == 2 and configs[0]["model"]["name"] == offline.model.name
    assert [c["attempt"] for c in configs] == [
        {"run": ids[0], "number": n, "resumed_from_step": s} for n, s in ((1, 0), (2, 3), (3, 3))]
    assert [of_type(run, "run")[0].job_type for run in runs] == [
        "train", "resume-from-step-3", "resume-from-step-3"]
    steps = [[row["_step"] for row in history(run) if "train/loss" in row] for run in runs]
    assert steps == [[1, 2, 3], [], [4, 5, 6]]  # rewound: what a resume reran is the resume's
    rows = [row for row in history([r for run in runs for r in run]) if "train/loss" in row]
    assert [row["train/loss"] for row in rows[3:]] == [10.0 / s + 3 for s in (4, 5, 6)]
    assert rows[-1]["throughput/tokens_per_s"] == 6000.0 and rows[-1]["throughput/mfu"] == 0.4
    assert rows[-1]["memory/peak_memory_allocated_gib"] == 61.5
    assert [of_type(run, "exit")[0].exit_code for run in runs] == [1, 1, 0]  # kept


def test_a_rewound_run_file_is_what_wandb_core_would_have_written(offline):
    """Records longer than a 32 KiB block are split into chunks as wandb-core does."""
    _attempt(offline, 0, 5)
    offline_runs(Path(offline.run_dir))  # wandb-core may still be writing after finish()
    path = next(Path(offline.run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    payloads, header = parse_payloads(data), data[:7]
    assert encode(header, payloads) == data
    big = [pb.Record(num=n, history=pb.HistoryRecord(item=[pb.HistoryItem(
        key="x", value_json="1" * 50000)])).SerializeToString() for n in (1, 2)]
    path.write_bytes(encode(header, payloads + big))
    assert read_payloads(path) == payloads + big


def test_a_run_file_it_cannot_read_is_left_as_is(tmp_path, caplog):
    """A run file of another wandb version never stops a resume: it is kept, with a warning."""
    folder = tmp_path / "offline-run-1"
    folder.mkdir()
    (folder / "run-x.wandb").write_bytes(b":W&B\xe1\xbe\x02" + b"\x01" * 40)  # a torn chunk
    (folder / "run-y.wandb").write_bytes(b"not a run file")
    with caplog.at_level("WARNING"):
        assert rewind_offline_runs([folder], 3) == 0
    assert (folder / "run-y.wandb").read_bytes() == b"not a run file"
    assert sum("left as is" in r.message for r in caplog.records) >= 1


def test_wandb_alert_goes_into_the_run(offline):
    run_dir = Path(offline.run_dir)
    m = MetricsLogger.from_config(offline, env=run_env(), layout=LAYOUT, run_dir=run_dir)
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
    m = MetricsLogger.from_config(offline, env=run_env(), layout=LAYOUT, run_dir=run_dir)
    m.log(1, {"loss": 1.0})
    m.close()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        assert SLACK_SECRET.encode() not in data and b"zz9plural9alpha" not in data, path
        assert b"7" * 40 not in data, path
