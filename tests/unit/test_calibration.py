"""Probe records, the calibration fit, and the calibration file the planner reads."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.calibration_file import hardware_of, with_calibration, write_calibration
from launch.cluster_schema import Calibration
from launch.config import derive_layout, validate
from launch.planning.calibration import Probe, fit
from launch.planning.planner import Hardware, step_time
from launch.prepare import for_probe
from megatron_ext.probe import probe_record
from tests.conftest import REPO, make_config

TRUTH = Calibration(compute_tflops=0.02, link_gb_s=1.5, internode_gb_s=0.8, latency_s=4e-4,
                    layer_overhead_s=2e-3)
"""Rates of a made-up CPU machine: the probes' step times are what the model says on it (its
fixed costs in the nominal ratio, 1 latency to 5 layer overheads: one factor scales both)."""
LAYOUTS = {"dp": (), "tp2": ("parallel=tp2",), "pp2": ("parallel=pp2",),
           "vpp2": ("parallel=pp2_vpp2",)}


def _probe(name: str, truth: Calibration = TRUTH, *overrides: str) -> Probe:
    cfg = make_config("data=synthetic", *LAYOUTS[name], *overrides)
    layout = derive_layout(cfg)
    hw = Hardware.for_cluster(cfg.cluster).calibrated(truth)
    measured = step_time(cfg, layout, cfg.train.micro_batch_size, cfg.train.recompute, hw)
    return Probe(name, cfg, layout, measured, "cpu")


def test_the_fit_recovers_the_rates_that_made_the_step_times() -> None:
    result = fit([_probe(name) for name in ("dp", "tp2", "pp2")])
    assert result.fitted == (True, True, True)
    got = dataclasses.asdict(result.calibration)
    # the transfer factor scales both links alike: across nodes is nominal / that factor
    for rate in ("compute_tflops", "link_gb_s", "latency_s", "layer_overhead_s"):
        assert got[rate] == pytest.approx(getattr(TRUTH, rate), rel=1e-6), rate
    assert result.residuals == pytest.approx([0, 0, 0], abs=1e-9)
    fourth = _probe("vpp2")
    cfg = dataclasses.replace(fourth.cfg, cluster=dataclasses.replace(
        fourth.cfg.cluster, calibrated=result.calibration))
    assert step_time(cfg, fourth.layout, 4, "none") == pytest.approx(fourth.step_time_s, rel=1e-6)


def test_a_part_no_probe_exercises_stays_nominal_and_is_said_so() -> None:
    one_rank = [_probe("dp", TRUTH, "cluster.gpus_per_node=1", f"train.micro_batch_size={b}")
                for b in (2, 4, 8)]
    result = fit(one_rank)
    assert result.fitted == (True, False, True)  # one rank: no transfers at all
    nominal = Hardware.for_cluster(one_rank[0].cfg.cluster)
    assert result.calibration.link_gb_s == nominal.nvlink_gb_s
    assert result.calibration.compute_tflops == pytest.approx(TRUTH.compute_tflops, rel=1e-6)


def test_probes_of_different_hardware_are_refused() -> None:
    gpu = dataclasses.replace(_probe("tp2"), device="gpu")
    with pytest.raises(ValueError, match="different hardware"):
        fit([_probe("dp"), gpu])


def test_a_calibration_file_fills_cluster_calibrated_for_the_planner(tmp_path: Path) -> None:
    cfg = make_config("data=synthetic", "parallel=tp2")
    path = tmp_path / "calibration.json"
    write_calibration(path, TRUTH, hardware_of(cfg.cluster), {"probes": []})
    calibrated, problems = with_calibration(make_config(
        "data=synthetic", "parallel=tp2", f"cluster.calibration={path}"))
    assert problems == [] and calibrated.cluster.calibrated == TRUTH
    layout = derive_layout(cfg)
    nominal, measured = (step_time(c, layout, 4, "none") for c in (cfg, calibrated))
    assert measured == pytest.approx(_probe("tp2").step_time_s) and measured > 50 * nominal


def test_a_bad_or_foreign_calibration_file_is_one_line_naming_the_field(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"calibration": {"compute_tflops": 1}}')
    _, problems = with_calibration(make_config(f"cluster.calibration={broken}"))
    assert len(problems) == 1 and "cluster.calibration=" in problems[0] \
        and "link_gb_s" in problems[0]
    foreign = tmp_path / "p5.json"
    write_calibration(foreign, TRUTH, hardware_of(make_config("cluster=hyperpod_p5").cluster), {})
    _, problems = with_calibration(make_config(f"cluster.calibration={foreign}"))
    assert len(problems) == 1 and "was measured on" in problems[0]
    planner = subprocess.run([sys.executable, "-m", "tools.planner",
                              f"cluster.calibration={tmp_path / 'missing.json'}"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert planner.returncode == 2
    assert planner.stderr.strip().startswith("error: cluster.calibration=")


def test_a_probe_records_the_median_of_the_steps_after_its_warm_up() -> None:
    cfg = make_config("train=probe", "train.steps=8", "train.probe_warmup_steps=3")
    times = [5.0, 3.0, 2.0, 1.0, 1.2, 9.0, 1.1, 1.3]  # warm-up, then one disturbed step
    record = probe_record(cfg, derive_layout(cfg), times, "cpu")
    assert record["step_time_s"] == pytest.approx(1.2) and record["steady_steps"] == 5
    assert record["layout"]["dp"] == 2 and record["micro_batch_size"] == 4


def test_a_probe_saves_and_resumes_no_checkpoint() -> None:
    cfg = for_probe(make_config("train=probe", run_dir="/tmp/run"))
    c = cfg.checkpoint
    assert (c.dir, c.save_interval, c.interval_minutes, c.save_on_exit) == \
        ("/tmp/run/checkpoints", 0, 0.0, False)
    plain = make_config()
    assert for_probe(plain) == plain


def test_probe_warmup_must_leave_steps_to_measure() -> None:
    problems = validate(make_config("train=probe", "train.steps=12"))
    assert any(p.startswith("train.probe_warmup_steps=10 must be 0 (no probe) or > 0 and leave "
                            "at least 5 of train.steps=12") for p in problems)
    assert validate(make_config("train=probe")) == []


def test_the_schedule_plans_with_the_calibrated_rates_and_says_so(tmp_path: Path,
                                                                  capsys) -> None:
    from tools.schedule import main

    path = tmp_path / "calibration.json"
    write_calibration(path, TRUTH, hardware_of(make_config().cluster), {})
    runs = {}
    for given in ([], [f"cluster.calibration={path}"]):
        main(["data=synthetic", "train.tokens=100000000", *given])
        runs[bool(given)] = capsys.readouterr().out
    assert "nominal model" in runs[False]
    assert f"calibrated by {path}" in runs[True] and "nominal" not in runs[True]
    main(["--json", "data=synthetic", "train.tokens=100000000", f"cluster.calibration={path}"])
    best = json.loads(capsys.readouterr().out)[0]
    assert best["step_time_s"] > 0.1  # a CPU's step, not an H100's few milliseconds
