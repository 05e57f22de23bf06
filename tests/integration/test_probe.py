"""Probe runs and calibration end to end on this machine: one local -m sweep of four layouts
(2 CPU ranks), ``tools.calibrate`` fitted to three, the calibrated planner predicting the
fourth's measured step time."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.calibration_file import with_calibration
from launch.config import load
from launch.planning.planner import step_time
from launch.schema import Layout
from tests.conftest import REPO, run_launch

pytestmark = pytest.mark.slow


def _probe_sweep(workdir: Path) -> dict[str, Path]:
    """One multirun over four layouts; each point's run folder by its parallel preset."""
    result = run_launch("-m", "name=probes", "data=synthetic", "train=probe", "train.steps=30",
                        "parallel=dp,tp2,pp2,pp2_vpp2", cwd=workdir, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {load(probe.parent / "config.yaml").parallel.name: probe.parent
            for probe in (workdir / "runs" / "probes" / "sweeps").rglob("probe.json")}


def _predicted(run: Path, calibration: str) -> float:
    cfg = load(run / "config.yaml")
    cfg, problems = with_calibration(dataclasses.replace(
        cfg, cluster=dataclasses.replace(cfg.cluster, calibration=calibration)))
    assert problems == []
    layout = Layout(**json.loads((run / "probe.json").read_text())["layout"])
    return step_time(cfg, layout, cfg.train.micro_batch_size, cfg.train.recompute)


def test_three_probes_calibrate_the_planner_to_predict_a_fourth_layout(workdir: Path,
                                                                       tmp_path: Path) -> None:
    runs = _probe_sweep(workdir)
    assert sorted(runs) == ["dp", "pp2", "pp2_vpp2", "tp2"]  # every point of the sweep ran
    for run in runs.values():
        record = json.loads((run / "probe.json").read_text())
        assert record["steady_steps"] == 20 and record["warmup_steps"] == 10
        assert record["device"] == "cpu" and record["cluster"]["gpus_per_node"] == 2
        assert not list((run / "checkpoints").glob("step_*"))  # probes save no checkpoint
    out = tmp_path / "calibration.json"
    fitted = subprocess.run([sys.executable, "-m", "tools.calibrate", "--out", str(out),
                             *(str(runs[name]) for name in ("dp", "tp2", "pp2"))],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert fitted.returncode == 0, fitted.stderr
    assert "rms error" in fitted.stdout and f"cluster.calibration={out}" in fitted.stdout
    measured = json.loads((runs["pp2_vpp2"] / "probe.json").read_text())["step_time_s"]
    assert abs(_predicted(runs["pp2_vpp2"], "") / measured - 1) > 0.5  # nominal: an H100's
    predicted = _predicted(runs["pp2_vpp2"], str(out))
    assert predicted == pytest.approx(measured, rel=0.2), fitted.stdout
