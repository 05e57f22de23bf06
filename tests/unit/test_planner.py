"""The layout planner: only valid layouts, only fitting ones, ranked by the documented model."""
from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import time

import pytest

from launch.config import validate, with_values
from launch.schema import Layout
from launch.planning.memory import SAFETY_MARGIN
from launch.config import explicit_keys
from tests.conftest import REPO, make_config, run_launch
from launch.planning.memory import predict
from launch.planning.planner import (
    Hardware,
    PlannedLayout,
    candidate_layouts,
    configure,
    explain_no_fit,
    micro_batches,
    pinned,
    plan,
    search,
    settings,
    step_time,
)

SLURM = ("train=pretrain", "cluster.kind=slurm", "cluster.gpus_per_node=8")
SLURM_256 = (*SLURM, "cluster.nodes=32")


@pytest.fixture(scope="module")
def cfg_70b():
    return make_config("model=llama3_70b", *SLURM_256)


@pytest.fixture(scope="module")
def planned_70b(cfg_70b):
    return plan(cfg_70b)


def test_every_planned_layout_passes_launch_validation(cfg_70b, planned_70b) -> None:
    assert planned_70b
    for c in planned_70b:
        assert c.tp * c.pp * c.cp * c.dp == 256
        assert c.fits and c.peak_gib < c.required_gib <= (1 - SAFETY_MARGIN) * 80  # what CUDA lets a process use
        chosen = configure(cfg_70b, c)
        assert validate(chosen, c.layout) == [], c


@pytest.mark.parametrize("extra", [(), ("train.seq_length=8",), ("model.attention_backend=unfused",),
                                   ("model.ffn_hidden_size=14338",), ("model.num_query_groups=2",)],
                         ids=["default", "sp-splits-seq-per-cp", "no-cp-backend", "ffn-only-tp2",
                              "kv-heads-fewer-than-tp"])
def test_candidates_are_exactly_the_layouts_validate_accepts(extra) -> None:
    """Brute force over every size combination on 16 GPUs, with micro_batch_size fixed; an MLP
    width only TP=2 splits, and KV heads fewer than TP=4 or 8 (megatron replicates them)."""
    cfg = make_config("model=llama3_8b", *SLURM, "cluster.nodes=2", "train.micro_batch_size=2",
                      *extra)
    planned = {layout for layout in candidate_layouts(cfg)
               if micro_batches(cfg, layout, 2) is not None}
    sizes = (1, 2, 4, 8, 16)
    accepted = set()
    for tp, pp, cp, vpp in itertools.product(sizes, sizes, sizes, (1, 2, 4, 8, 16, 32)):
        if 16 % (tp * pp * cp) or (vpp > 1 and pp == 1):
            continue
        layout = Layout(tp=tp, pp=pp, cp=cp, dp=16 // (tp * pp * cp), vpp=vpp, sp=tp > 1)
        parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, cp=cp, vpp=vpp,
                                       dp=layout.dp, sp=tp > 1)
        if not validate(dataclasses.replace(cfg, parallel=parallel), layout):
            accepted.add(layout)
    assert planned == accepted


def test_every_micro_batch_size_validate_accepts_is_tried() -> None:
    cfg = make_config("train.global_batch_size=24")
    layout = Layout(tp=1, pp=1, cp=1, dp=2)
    tried = {b for b, _ in settings(cfg, layout)}
    accepted = {b for b in range(1, 25)
                if not validate(with_values(cfg, **{"train.micro_batch_size": b}), layout)}
    assert tried == accepted == {1, 2, 3, 4, 6, 12}


@pytest.mark.parametrize("overrides", [
    ("cluster=hyperpod_p5",), ("cluster=pcs_p5", "cluster.nodes=2"),
    ("model=llama3_70b", "train=pretrain", "cluster=hyperpod_p5", "cluster.nodes=32")])
def test_the_planner_searches_context_parallelism_only_where_megatron_runs_it(overrides) -> None:
    """Transformer Engine's fused attention runs CP (the data path slices per CP rank); its
    unfused attention and megatron's local attention on GPUs do not, so none is offered."""
    assert {c.cp for c in plan(make_config(*overrides, "parallel=auto"))} > {1}
    for no_cp in ("model.attention_backend=unfused", "model.transformer_impl=local"):
        ranked = plan(make_config(*overrides, "parallel=auto", no_cp))
        assert ranked and {c.cp for c in ranked} == {1}, no_cp


def test_ranked_by_step_time_and_consistent_throughput(cfg_70b, planned_70b) -> None:
    times = [c.step_time_s for c in planned_70b]
    assert times == sorted(times)
    tokens = cfg_70b.train.global_batch_size * cfg_70b.train.seq_length
    for c in planned_70b[:20]:
        assert c.tokens_per_s_per_gpu * c.step_time_s * 256 == pytest.approx(tokens)
        assert predict(cfg_70b, c.layout, micro_batch_size=c.micro_batch_size,
                       recompute=c.recompute).peak_gib == pytest.approx(c.peak_gib)


def test_70b_on_one_node_has_no_fitting_layout() -> None:
    cfg = make_config("model=llama3_70b", *SLURM, "cluster.nodes=1")
    assert search(cfg) and plan(cfg) == []
    message = explain_no_fit(cfg, Layout(tp=8, pp=1, cp=1, dp=1, sp=True))
    assert "no layout fits" in message and "GiB" in message


def test_search_for_70b_on_256_gpus_takes_under_a_second(cfg_70b) -> None:
    start = time.perf_counter()
    search(cfg_70b)
    assert time.perf_counter() - start < 1.0


def test_step_time_model_penalises_recompute_and_bubbles(cfg_70b) -> None:
    layout = Layout(tp=8, pp=4, cp=1, dp=8, sp=True)
    none, selective, full = (step_time(cfg_70b, layout, 1, r)
                             for r in ("none", "selective", "full"))
    assert none < selective < full and full / none == pytest.approx(4 / 3, rel=0.1)
    few = dataclasses.replace(cfg_70b, train=dataclasses.replace(cfg_70b.train,
                                                                 global_batch_size=32))
    bubble_heavy = step_time(few, layout, 1, "none") / 32
    assert bubble_heavy > step_time(cfg_70b, layout, 1, "none") / 1024
    assert step_time(few, dataclasses.replace(layout, vpp=5), 1, "none") < \
        step_time(few, layout, 1, "none")


def test_explain_no_fit_names_the_memory_and_the_best_alternative(cfg_70b, planned_70b) -> None:
    too_big = Layout(tp=1, pp=1, cp=1, dp=256)
    message = explain_no_fit(cfg_70b, too_big)
    assert f"{predict(cfg_70b, too_big).required_gib:.1f} GiB" in message
    assert planned_70b[0].describe() in message
    assert explain_no_fit(configure(cfg_70b, planned_70b[0]), planned_70b[0].layout) is None


def test_hardware_comes_from_the_cluster_profile() -> None:
    """p5: 8 H100 and 3,200 Gb/s EFA (50 GB/s per GPU); p4d: 8 A100 and 400 Gb/s (6.25)."""
    p5 = Hardware.for_cluster(make_config("cluster=hyperpod_p5").cluster)
    p4d = Hardware.for_cluster(make_config("cluster=pcs_p4d").cluster)
    assert (p5.gpu, p5.internode_gb_s, p5.nvlink_gb_s, p5.peak_flops) == ("H100", 50, 360, 989e12)
    assert (p4d.gpu, p4d.internode_gb_s, p4d.nvlink_gb_s, p4d.peak_flops) == \
        ("A100", 6.25, 240, 312e12)


def test_a100_40gb_is_slower_and_fits_fewer_layouts_than_h100_80gb() -> None:
    model = ("model=llama3_8b", "train=pretrain", "cluster.nodes=4")
    h100 = make_config("cluster=hyperpod_p5", *model)
    a100 = make_config("cluster=hyperpod_p4d", *model)
    h100_ranked, a100_ranked = search(h100), search(a100)
    assert len(h100_ranked) == len(a100_ranked)  # the same candidates, judged differently
    assert 0 < sum(c.fits for c in a100_ranked) < sum(c.fits for c in h100_ranked)
    for c in a100_ranked[:10]:  # math at 312 vs 989 TFLOP/s dominates; links are slower too
        ratio = step_time(a100, c.layout, c.micro_batch_size, c.recompute) / \
            step_time(h100, c.layout, c.micro_batch_size, c.recompute)
        assert ratio > 2.5
    assert plan(a100)[0].step_time_s > 3 * plan(h100)[0].step_time_s


def test_explicit_settings_are_pinned() -> None:
    cfg = make_config("model=llama3_8b", *SLURM, "cluster.nodes=2", "parallel.tp=4",
                      "train.micro_batch_size=2", "train.recompute=full", "train.lr=1e-4")
    pins = pinned(cfg, explicit_keys(["parallel.tp=4", "train.micro_batch_size=2",
                                      "train.recompute=full", "train.lr=1e-4", "train=pretrain"]))
    assert pins == {"tp": 4, "micro_batch_size": 2, "recompute": "full"}
    ranked = search(cfg, pins)
    assert ranked and {(c.tp, c.micro_batch_size, c.recompute) for c in ranked} == {(4, 2, "full")}
    assert len(ranked) < len(search(cfg)) / 10
    unpinned_sp = search(cfg, {"tp": 4, "sp": False})
    assert unpinned_sp and not any(c.sp for c in unpinned_sp)


def test_full_recompute_only_where_its_groups_tile_the_stage() -> None:
    """megatron's uniform method indexes past the last layer otherwise."""
    cfg = make_config("model=llama3_8b", *SLURM, "cluster.nodes=2", "train.recompute_num_layers=4")
    full = [c for c in search(cfg) if c.recompute == "full"]
    assert full and all((32 // (c.pp * c.vpp)) % 4 == 0 for c in full)


def test_launch_auto_keeps_the_command_line_settings(tmp_path) -> None:
    result = run_launch("cluster=hyperpod_p5", "cluster.nodes=4", "train.micro_batch_size=2",
                        "train.recompute=full", "parallel.tp=4", "launch.dry_run=true",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("layout: TP=4 ") and "micro-batch 2, recompute full" in first
    assert "  micro_batch_size: 2\n" in result.stdout and "  recompute: full\n" in result.stdout
    refused = run_launch("cluster=hyperpod_p4d", "model=llama3_70b", "train.recompute=none",
                         "train.micro_batch_size=8", "launch.dry_run=true", cwd=tmp_path,
                         timeout=120)
    assert refused.returncode != 0
    assert "with train.micro_batch_size=8 train.recompute=none as given" in refused.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.planner", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_json_cli_prints_the_ranked_layouts_and_the_best() -> None:
    run = _cli("--json", "model=llama3_70b", *SLURM_256)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    keys = {"tp", "pp", "vpp", "cp", "dp", "sp", "micro_batch_size", "recompute", "peak_gib",
            "step_time_s", "tokens_per_s_per_gpu"}
    assert out["layouts"] and all(keys <= set(c) for c in out["layouts"])
    assert out["best"] == out["layouts"][0]
    assert PlannedLayout(**out["best"]).fits


def test_json_cli_keeps_the_given_micro_batch_size() -> None:
    run = _cli("--json", "model=llama3_8b", *SLURM, "cluster.nodes=2",
               "train.micro_batch_size=2")
    assert run.returncode == 0, run.stderr
    layouts = json.loads(run.stdout)["layouts"]
    assert layouts and {c["micro_batch_size"] for c in layouts} == {2}
    assert len({c["recompute"] for c in layouts}) > 1  # what was not given is still searched


def test_table_cli_shows_the_choice_and_refuses_bad_overrides() -> None:
    run = _cli("model=llama3_8b", *SLURM, "cluster.nodes=2")
    assert run.returncode == 0 and "chosen: TP=" in run.stdout and "tok/s/GPU" in run.stdout
    bad = _cli("model.num_layers=abc")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: model.num_layers: Value 'abc' of type 'str' could not be converted to Integer")
